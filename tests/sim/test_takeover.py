"""Expert takeover: the learner drives until the drawn step, the expert from there, and
`dreamrt record takeover_after=...` writes exactly the expert's part of each subtask."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dreamrt.episodes import open_store  # noqa: E402
from dreamrt.errors import UserError  # noqa: E402
from dreamrt.policies.factory import PolicyConfig  # noqa: E402
from dreamrt.policies.random_policy import RandomPolicy  # noqa: E402
from dreamrt.sim.env import EnvConfig  # noqa: E402
from dreamrt.sim.expert import ScriptedExpert  # noqa: E402
from dreamrt.sim.record import TASK_ID_KEY, RecordConfig, attempt_spec, run  # noqa: E402
from dreamrt.sim.rollout import run_episodes  # noqa: E402
from dreamrt.sim.takeover import EXPERT, LEARNER, ExpertTakeover, make_takeover_policy  # noqa: E402
from dreamrt.sim.tasks import task_names  # noqa: E402

STATE_ENV = EnvConfig(cameras=False)


class _Chunked(RandomPolicy):
    """Random actions in chunks of 8, as a DP-T returns them, so the cut at takeover shows."""

    def act(self, observation):
        chunk = super().act(observation)
        chunk.actions = np.repeat(chunk.actions, 8, axis=0)
        return chunk


def _drive(policy: ExpertTakeover, steps: int) -> list[str]:
    """Who produced each of ``steps`` actions, asking for chunks as the rollout driver does."""
    obs = {"task": "open the drawer"}
    actors: list[str] = []
    queue = 0
    while len(actors) < steps:
        if queue == 0:
            chunk = policy.act(obs)
            queue = len(chunk.actions)
            actor = chunk.info["actor"]
        else:
            policy.observe(obs)
        actors.append(actor)
        queue -= 1
    return actors


def test_takeover_switches_at_the_drawn_step_and_draws_per_subtask():
    # The expert is never asked to act on a real scene here: the takeover step is past the end.
    policy = ExpertTakeover(_Chunked(seed=1), ScriptedExpert(), after_steps=(30, 60))
    steps = []
    for seed in range(40):
        policy.reset(seed)
        steps.append(policy.takeover_step)
        assert 30 <= policy.takeover_step <= 60
        actors = _drive(policy, policy.takeover_step)
        assert actors == [LEARNER] * policy.takeover_step  # the last chunk is cut to end exactly there
        assert not policy.expert_acting
    assert len(set(steps)) > 10
    policy.reset(3)
    again = ExpertTakeover(_Chunked(seed=1), ScriptedExpert(), after_steps=(30, 60))
    again.reset(3)
    assert again.takeover_step == policy.takeover_step  # a function of the seed alone


def test_takeover_checks_its_inputs():
    with pytest.raises(UserError, match="first <= last"):
        ExpertTakeover(RandomPolicy(), ScriptedExpert(), after_steps=(50, 20))
    with pytest.raises(UserError, match="two step counts"):
        ExpertTakeover(RandomPolicy(), ScriptedExpert(), after_steps=(50,))
    with pytest.raises(UserError, match="action mode"):
        ExpertTakeover(RandomPolicy(), ScriptedExpert(action_mode="abs_cartesian"))
    with pytest.raises(UserError, match="learned policy"):
        RecordConfig(out="x.zarr", takeover_after=[20, 40])
    with pytest.raises(UserError, match="max_steps_per_subtask"):
        RecordConfig(out="x.zarr", policy=PolicyConfig(path="shipped:dpt_state"), takeover_after=[20, 400])


def test_record_takeover_writes_the_experts_part_of_each_subtask(tmp_path):
    # The shipped teacher fails stacking (docs/shipped_checkpoints.md), so the expert takes over
    # at step 20 in every episode and finishes the stack from wherever the teacher had got to.
    cfg = RecordConfig(
        out=str(tmp_path / "corrections.zarr"),
        env=STATE_ENV,
        policy=PolicyConfig(path="shipped:dpt_state", threads=1),
        noise=None,
        mode="single",
        tasks=["stack_block"],
        episodes=2,
        takeover_after=[20, 20],
        num_workers=0,
        progress=False,
    )
    result = run(cfg)
    assert result.exit_code == 0, result.summary
    entry = result.summary["per_task"]["stack_block"]
    assert entry["takeovers"] == entry["attempts"] >= 2 and entry["learner_successes"] == 0

    # The same attempts, driven directly: 20 learner steps, then the expert to the end.
    policy = make_takeover_policy(cfg.policy, cfg.env, None, (20, 20))
    outcomes = run_episodes(
        [attempt_spec(cfg, i) for i in range(entry["attempts"])],
        [policy],
        cfg.env,
        num_workers=0,
        max_steps_per_subtask=cfg.max_steps_per_subtask + 20,
        keep_frames=True,
    )
    outcomes = sorted((o for o in outcomes if o.num_success), key=lambda o: o.spec.index)[:2]
    store = open_store(tmp_path / "corrections.zarr")
    assert store.num_episodes == 2
    for k, outcome in enumerate(outcomes):
        actors = [f["actor"] for f in outcome.frames]
        assert actors[:20] == [LEARNER] * 20 and set(actors[20:]) == {EXPERT}
        expert_frames = outcome.frames[20 : outcome.subtask_ends[0]]
        episode = store.get_episode(k)
        assert store.episode_tasks(k) == [outcome.spec.instructions[0]]
        assert len(episode["action"]) == len(expert_frames)
        np.testing.assert_array_equal(episode["action"], np.stack([f["action"] for f in expert_frames]))
        np.testing.assert_array_equal(
            episode["observation.state"], np.stack([f["observation.state"] for f in expert_frames])
        )
        assert set(episode[TASK_ID_KEY].tolist()) == {task_names().index("stack_block")}
