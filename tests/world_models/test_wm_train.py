"""Training jobs end to end on a tiny synthetic episode store: tokenizer, then dynamics, then resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from dreamrt.episodes import Normalizer, open_store
from dreamrt.errors import UserError
from dreamrt.training.checkpoint import load_checkpoint
from dreamrt.world_models.dynamics import load_dynamics, preset
from dreamrt.world_models.sampling import FrameSamplerConfig, own_rollout_context
from dreamrt.world_models.synthetic import MovingSquareConfig, write_moving_square_store
from dreamrt.world_models.tokenizer import load_tokenizer
from dreamrt.world_models.tokenizer import preset as tokenizer_preset
from dreamrt.world_models.train import (
    DynamicsTrainConfig,
    OptimConfig,
    TokenizerTrainConfig,
    run_dynamics,
    run_tokenizer,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("wm") / "squares.zarr"
    # 24x24 frames resized to the tiny tokenizer's 16x16 on load, like 96x96 -> 64x64 for real.
    write_moving_square_store(
        path, episodes=4, length=12, cfg=MovingSquareConfig(image_size=24, square=6), seed=0
    )
    return path


def test_synthetic_store(store):
    s = open_store(store)
    assert s.num_episodes == 4 and s.num_frames == 48
    assert s.features["observation.images.static"].shape == (24, 24, 3)
    ep = s.get_episode(1)
    # The square moves by the held action: state (its position) follows action[:2].
    states, actions = ep["observation.state"], ep["action"]
    assert np.abs(np.diff(states[:, :2], axis=0)).max() > 0
    assert len(set(map(tuple, actions[:4, :2].round(6)))) == 1  # held for 4 steps


def test_tokenizer_then_dynamics_jobs(store, tmp_path):
    tok_dir = tmp_path / "tok"
    tok_cfg = TokenizerTrainConfig(
        store=str(store),
        model=tokenizer_preset("tiny"),
        val_ratio=0.0,  # PSNR on the training episodes: 3 episodes do not generalise to new colours
        optim=OptimConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=5, log_every=10, save_every=15),
    )
    result = run_tokenizer(tok_cfg, tok_dir)
    s = result.summary
    assert s["steps"] == 30 and s["frames"] == 48 and s["latent_shape"] == [4, 4, 4]
    assert s["val_psnr_db"] > s["val_psnr_db_initial"]
    assert (tok_dir / "metrics.csv").read_text().count("\n") == 4  # header + 3 rows
    tokenizer = load_tokenizer(tok_dir)
    assert float(tokenizer.latent_std.min()) != 1.0  # latent statistics were fitted

    dyn_dir = tmp_path / "dyn"
    dyn_cfg = DynamicsTrainConfig(
        store=str(store),
        tokenizer=str(tok_dir),
        model=preset("tiny", action_dim=1, state_dim=1),  # dims and latent shape come from the data
        sampler=FrameSamplerConfig(steps=2),
        clip_frames=5,
        eval_clips=4,
        optim=OptimConfig(steps=6, batch_size=4, warmup_steps=2, log_every=3, save_every=3),
    )
    result = run_dynamics(dyn_cfg, dyn_dir)
    s = result.summary
    assert s["steps"] == 6 and np.isfinite(s["final_loss"])
    for key in ("eval_latent_mse", "eval_latent_mse_copy_last", "eval_psnr_db", "eval_psnr_db_copy_last"):
        assert np.isfinite(s[key])
    assert json.loads((dyn_dir / "summary.json").read_text())["steps"] == 6
    model, normalizer = load_dynamics(dyn_dir)
    assert (model.config.action_dim, model.config.state_dim, model.config.latent_size) == (7, 15, 4)
    assert sorted(Normalizer.from_dict(normalizer).keys) == ["action", "observation.state"]

    # Resume: the same directory continues from step 6 to 9.
    resumed = run_dynamics(
        DynamicsTrainConfig(
            **{**dyn_cfg.__dict__, "optim": OptimConfig(steps=9, batch_size=4, log_every=3, save_every=3)}
        ),
        dyn_dir,
    )
    assert resumed.summary["steps"] == 9 and load_checkpoint(dyn_dir).step == 9


def test_job_config_errors(store):
    with pytest.raises(UserError, match="store is required"):
        TokenizerTrainConfig()
    with pytest.raises(UserError, match="tokenizer is required"):
        DynamicsTrainConfig(store=str(store))
    with pytest.raises(UserError, match="no key 'observation.images.front'"):
        run_tokenizer(
            TokenizerTrainConfig(
                store=str(store), camera="observation.images.front", model=tokenizer_preset("tiny")
            ),
            store.parent / "never",
        )


def _tiny_tokenizer(store, tmp_path):
    """A tokenizer trained 2 steps: enough for dynamics jobs to run on its latents."""
    run_tokenizer(
        TokenizerTrainConfig(
            store=str(store),
            model=tokenizer_preset("tiny"),
            optim=OptimConfig(steps=2, batch_size=8, warmup_steps=1, save_every=2),
        ),
        tmp_path / "tok",
    )
    return tmp_path / "tok"


def test_dynamics_job_trains_on_its_own_rollouts(store, tmp_path, monkeypatch):
    import dreamrt.world_models.train as train_module
    from dreamrt.world_models.dynamics import FlowMatchingConfig

    tok_dir = _tiny_tokenizer(store, tmp_path)
    calls = []

    def spy(model, latents, actions, states, first, sampler):
        shown = own_rollout_context(model, latents, actions, states, first, sampler)
        calls.append((first, sampler.steps, bool(torch.equal(shown, latents))))
        return shown

    monkeypatch.setattr(train_module, "own_rollout_context", spy)
    cfg = DynamicsTrainConfig(
        store=str(store),
        tokenizer=str(tok_dir),
        model=preset("tiny", action_dim=1, state_dim=1),
        flow=FlowMatchingConfig(rollout_prob=1.0, rollout_steps=3, max_targets=2),
        clip_frames=5,
        eval_clips=4,
        optim=OptimConfig(steps=4, batch_size=4, warmup_steps=1, log_every=2, save_every=4),
    )
    assert np.isfinite(run_dynamics(cfg, tmp_path / "dyn").summary["final_loss"])
    # Every step drew its context from the model: starting at a real frame, ending at an anchor.
    assert len(calls) == 4 and all(
        1 <= first <= 2 and steps == 3 and not same for first, steps, same in calls
    )

    with pytest.raises(UserError, match="clip_frames >= flow.max_targets"):
        dataclasses.replace(cfg, clip_frames=3)
    with pytest.raises(UserError, match="model.source=last_frame"):
        dataclasses.replace(cfg, model=preset("tiny", action_dim=1, state_dim=1, source="noise"))
    with pytest.raises(UserError, match="rollout_steps"):
        FlowMatchingConfig(rollout_steps=0)


def test_dynamics_job_starts_from_an_actions_only_checkpoint(store, tmp_path):
    from dreamrt.world_models.dynamics import NextFrameDiT, frame_conditions
    from dreamrt.world_models.train import start_from

    tok_dir = _tiny_tokenizer(store, tmp_path)
    optim = OptimConfig(steps=3, batch_size=4, warmup_steps=1, log_every=3, save_every=3)
    actions_only = DynamicsTrainConfig(
        store=str(store),
        tokenizer=str(tok_dir),
        state_key="",
        model=preset("tiny", action_dim=1, state_dim=0),
        clip_frames=5,
        eval_clips=4,
        optim=optim,
    )
    run_dynamics(actions_only, tmp_path / "actions")
    source, _ = load_dynamics(tmp_path / "actions")
    assert source.config.state_dim == 0

    # The state's condition columns start at zero: the widened model is the source model for any state.
    widened = NextFrameDiT(dataclasses.replace(source.config, state_dim=15)).eval()
    start_from(widened, str(tmp_path / "actions"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, 4, generator=g)
    t = torch.rand(2, 3, generator=g)
    actions = torch.randn(2, 3, 7, generator=g)
    with torch.no_grad():
        expected = source(x, t, frame_conditions(actions, None))
        got = widened(x, t, frame_conditions(actions, torch.randn(2, 3, 15, generator=g)))
    torch.testing.assert_close(got, expected)

    # The job: architecture from the checkpoint (default model.* are not overrides), state read from the store.
    with_state = dataclasses.replace(
        actions_only,
        state_key="observation.state",
        model=preset("small", 1, 1),
        init=str(tmp_path / "actions"),
    )
    s = run_dynamics(with_state, tmp_path / "with_state").summary
    assert np.isfinite(s["final_loss"])
    model, _ = load_dynamics(tmp_path / "with_state")
    assert (model.config.n_emb, model.config.window, model.config.state_dim) == (32, 4, 15)

    with pytest.raises(UserError, match="model.n_emb=64 differs"):
        run_dynamics(
            dataclasses.replace(with_state, model=preset("tiny", 1, 1, n_emb=64)), tmp_path / "clash"
        )
