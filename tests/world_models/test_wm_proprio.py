"""The robot-state predictor: data rule for held dims, training job, checkpoints, and rollouts that
generate with predicted states."""

import dataclasses

import numpy as np
import pytest
import torch

from dreamrt.errors import UserError
from dreamrt.world_models.dynamics import NextFrameDiT, preset
from dreamrt.world_models.proprio import (
    StatePredictor,
    StatePredictorConfig,
    load_state_predictor,
    save_state_predictor,
    wrapping_dims,
)
from dreamrt.world_models.sampling import FrameSamplerConfig, Rollout
from dreamrt.world_models.synthetic import MovingSquareConfig, write_moving_square_store
from dreamrt.world_models.train import (
    OptimConfig,
    StatePredictorTrainConfig,
    TrainWorldModelConfig,
    run_state_predictor,
)


def test_wrapping_dims_finds_dims_that_jump_across_their_range():
    t = np.linspace(0, 1, 40)
    smooth = np.sin(6 * t)
    wrapping = np.where(np.arange(40) % 3 == 0, 0.98, -0.98)  # an angle near +-pi flipping sign
    rare_switch = np.where(t < 0.5, -1.0, 1.0)  # a gripper command: one jump
    states = np.stack([smooth, wrapping, rare_switch], 1)
    assert wrapping_dims(states, np.array([40])) == [1]
    # A jump across an episode boundary is not a step of either episode.
    two_episodes = np.concatenate([np.full((20, 1), -1.0), np.full((20, 1), 1.0)])
    assert wrapping_dims(two_episodes, np.array([20, 40])) == []


def test_held_dims_stay_and_the_rest_step_under_the_action():
    model = StatePredictor(StatePredictorConfig(state_dim=3, action_dim=2, held=[1])).eval()
    state, actions = torch.randn(4, 3), torch.randn(4, 5, 2)
    path = model.unroll(state, actions)
    assert path.shape == (4, 6, 3)
    assert torch.equal(path[:, :, 1], state[:, 1:2].expand(4, 6))
    assert not torch.equal(path[:, 1:, 0], path[:, :-1, 0])
    with pytest.raises(UserError, match="held has dims"):
        StatePredictorConfig(state_dim=3, held=[3])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("proprio") / "squares.zarr"
    # A 44-pixel range and 2-pixel steps: few moves end at a wall, as for a robot far from its limits.
    cfg = MovingSquareConfig(image_size=48, square=4, speed=2.0)
    write_moving_square_store(path, episodes=6, length=24, cfg=cfg, seed=0)
    return path


def test_job_learns_the_position_and_holds_the_noise(store, tmp_path):
    cfg = StatePredictorTrainConfig(
        store=str(store),
        model=StatePredictorConfig(step_scale=0.1),
        unroll=8,
        val_ratio=0.2,
        optim=OptimConfig(steps=300, batch_size=32, lr=3e-3, warmup_steps=20, log_every=100, save_every=300),
    )
    s = run_state_predictor(cfg, tmp_path / "state").summary
    # The squares' state: dims 0-1 the position (moved by the action), 2-14 fresh noise every frame.
    assert s["held_dims"] == list(range(2, 15))
    # Five training episodes and five noise inputs in each action: a predictor far from perfect, but
    # one that tracks the position better than holding it at every horizon.
    assert s["state_mae_h1"] < 0.7 * s["state_mae_hold_h1"]
    assert s["state_mae_h4"] < s["state_mae_hold_h4"] and s["state_mae_h8"] < s["state_mae_hold_h8"]

    model, normalizer = load_state_predictor(tmp_path / "state")
    assert model.config.held == list(range(2, 15)) and "observation.state" in normalizer["features"]
    saved = save_state_predictor(model, tmp_path / "copy", normalizer=normalizer)
    again, _ = load_state_predictor(saved)
    x, a = torch.randn(2, 15), torch.randn(2, 7)
    assert torch.equal(again(x, a), model(x, a))

    with pytest.raises(UserError, match="state_key is required"):
        dataclasses.replace(cfg, state_key="")
    with pytest.raises(UserError, match="state_key is required"):
        TrainWorldModelConfig(store=str(store), stage="state", state_key="")


def _state_model_and_predictor():
    torch.manual_seed(0)
    model = NextFrameDiT(preset("tiny", action_dim=2, state_dim=3)).eval()
    predictor = StatePredictor(StatePredictorConfig(state_dim=3, action_dim=2, held=[2])).eval()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 3, 4, 4, 4, generator=g)
    actions, states = torch.randn(1, 3, 2, generator=g), torch.randn(1, 3, 3, generator=g)
    return model, predictor, latents, actions, states


def test_rollout_conditions_generated_frames_on_predicted_states():
    model, predictor, latents, actions, states = _state_model_and_predictor()
    sampler = FrameSamplerConfig(steps=2)
    new_actions = torch.randn(4, 1, 2, generator=torch.Generator().manual_seed(2))

    predicted = Rollout(model, sampler, state_predictor=predictor)
    predicted.prefill(latents, actions, states)
    frames = [predicted.step(a) for a in new_actions]

    # The same frames from a rollout fed the predictor's chain by hand.
    by_hand = Rollout(model, sampler)
    by_hand.prefill(latents, actions, states)
    state = states[:, -1]
    with torch.no_grad():
        for a, frame in zip(new_actions, frames):
            torch.testing.assert_close(by_hand.step(a, state), frame)
            state = predictor(state, a)
    torch.testing.assert_close(predicted.current_state, state)

    # A passed state overrides the tracked one from there on.
    override = torch.zeros(1, 3)
    predicted.step(new_actions[0], override)
    with torch.no_grad():
        torch.testing.assert_close(predicted.current_state, predictor(override, new_actions[0]))


def test_speculation_follows_the_held_action_and_rollback_restores_the_state():
    model, predictor, latents, actions, states = _state_model_and_predictor()
    rollout = Rollout(
        model, FrameSamplerConfig(steps=1, solver="x0"), max_speculation=3, state_predictor=predictor
    )
    rollout.prefill(latents, actions, states)
    start = rollout.current_state
    action = torch.randn(1, 2)
    speculated = rollout.speculate(3, action)
    with torch.no_grad():
        chain = predictor.unroll(start, action[:, None].expand(1, 3, 2))
    # Speculated frames are conditioned on the chain: the first equals a single step from the start.
    single = Rollout(model, FrameSamplerConfig(steps=1, solver="x0"), state_predictor=predictor)
    single.prefill(latents, actions, states)
    torch.testing.assert_close(single.step(action), speculated[:, 0])

    rollout.accept(2)
    torch.testing.assert_close(rollout.current_state, chain[:, 2])
    snap = rollout.snapshot()
    rollout.step(action)
    rollout.restore(snap)
    torch.testing.assert_close(rollout.current_state, chain[:, 2])
    rollout.speculate(2, action)
    rollout.accept(0)
    torch.testing.assert_close(rollout.current_state, chain[:, 2])


def test_rollout_refuses_a_predictor_that_does_not_fit():
    actions_only = NextFrameDiT(preset("tiny", action_dim=2, state_dim=0))
    with pytest.raises(UserError, match="state-conditioned model"):
        Rollout(actions_only, state_predictor=StatePredictor(StatePredictorConfig(state_dim=3, action_dim=2)))
    model, predictor, latents, actions, states = _state_model_and_predictor()
    rollout = Rollout(model, state_predictor=predictor)
    rollout.prefill(latents)  # no actions, no states: nothing to predict from
    with pytest.raises(UserError, match="no state to predict from"):
        rollout.step(torch.zeros(1, 2))
