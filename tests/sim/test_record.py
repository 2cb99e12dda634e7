"""`dreamrt record`: what each attempt asks for, deterministic stores that verify, per-frame task
labels in chain mode, failures dropped, appending to a store."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dreamrt.episodes import open_store  # noqa: E402
from dreamrt.episodes.inspect import VerifyConfig, run_verify  # noqa: E402
from dreamrt.errors import UserError  # noqa: E402
from dreamrt.policies.factory import PolicyConfig  # noqa: E402
from dreamrt.sim import protocol  # noqa: E402
from dreamrt.sim.env import EnvConfig  # noqa: E402
from dreamrt.sim.language import train_instructions  # noqa: E402
from dreamrt.sim.protocol import reachable_states  # noqa: E402
from dreamrt.sim.record import TASK_ID_KEY, RecordConfig, attempt_spec, run  # noqa: E402
from dreamrt.sim.tasks import task_names  # noqa: E402

# Small images keep the stores tiny; the tasks are short ones for the expert.
SMALL = EnvConfig(static_height=24, static_width=24, gripper_height=16, gripper_width=16)
QUICK = [
    "open_drawer",
    "close_drawer",
    "turn_on_led",
    "turn_off_led",
    "turn_on_lightbulb",
    "turn_off_lightbulb",
]


def _cfg(out, **kw) -> RecordConfig:
    base = dict(out=str(out), env=SMALL, episodes=2, tasks=QUICK, progress=False, num_workers=0)
    base.update(kw)
    return RecordConfig(**base)


def test_attempts_depend_only_on_seed_and_index():
    cfg = _cfg("x.zarr", tasks=None)
    a, b = attempt_spec(cfg, 7), attempt_spec(cfg, 7)
    assert a == b
    specs = [attempt_spec(cfg, i) for i in range(60)]
    assert len({s.tasks for s in specs}) > 20  # uniform over the 34 tasks
    for s in specs:
        assert len(s.tasks) == 1 and protocol.precondition_holds(s.tasks[0], s.start_state)
        assert s.instructions[0] in train_instructions(s.tasks[0])  # a paraphrase, never the eval text
    assert attempt_spec(_cfg("x.zarr", tasks=None, seed=1), 7) != a
    # Chain mode: a start state of CALVIN's, then tasks each valid where the previous ones leave.
    chain = _cfg("x.zarr", tasks=None, mode="chain", tasks_per_episode=4)
    starts = protocol.start_states()
    for i in range(20):
        s = attempt_spec(chain, i)
        assert s.start_state in starts and len(s.tasks) == 4
        state = s.start_state
        for prev, task in zip((None, *s.tasks), s.tasks):
            assert task != prev
            state = protocol.apply_task(task, state)  # raises if the precondition fails


def test_every_task_has_reachable_start_states():
    states = reachable_states()
    assert len(states) == 1744
    for task in task_names():
        assert any(protocol.precondition_holds(task, s) for s in states), task


def test_record_is_deterministic_and_the_store_verifies(tmp_path):
    import dreamrt.sim.expert  # noqa: F401  (recording needs the scripted expert)

    stores = []
    for name, workers in (("a.zarr", 0), ("b.zarr", 2)):
        result = run(_cfg(tmp_path / name, num_workers=workers))
        assert result.exit_code == 0 and result.summary["episodes_written"] == 2
        stores.append(open_store(tmp_path / name))
        assert run_verify(VerifyConfig(str(tmp_path / name))).exit_code == 0
    a, b = stores
    assert a.num_episodes == b.num_episodes == 2 and a.num_frames == b.num_frames > 0
    assert a.keys == b.keys and a.tasks == b.tasks
    assert {"observation.images.static", "observation.images.gripper", "observation.state", "action"} <= set(
        a.keys
    )
    assert a.features["observation.images.static"].shape == (24, 24, 3)
    for key in a.keys:
        assert np.array_equal(a.read(key, 0, a.num_frames), b.read(key, 0, b.num_frames)), key
    # Labels: each frame's task id names the task whose paraphrase is the frame's task string.
    names = task_names()
    for i in range(a.num_episodes):
        ep = a.get_episode(i)
        for tid, tix in zip(ep[TASK_ID_KEY], ep["task_index"]):
            assert names[int(tid)] in QUICK
            assert a.tasks[int(tix)] in train_instructions(names[int(tid)])


def test_chain_mode_labels_each_frame_with_its_subtask(tmp_path):
    import dreamrt.sim.expert  # noqa: F401

    out = tmp_path / "chain.zarr"
    result = run(_cfg(out, mode="chain", episodes=1, tasks_per_episode=2, env=EnvConfig(cameras=False)))
    assert result.exit_code == 0
    store = open_store(out)
    assert "observation.images.static" not in store.keys  # cameras off: low-dim only
    ep = store.get_episode(0)
    ids = ep[TASK_ID_KEY]
    changes = np.flatnonzero(np.diff(ids)) + 1
    assert len(changes) <= 1  # at most two subtasks, contiguous
    tasks = store.episode_tasks(0)
    assert 1 <= len(tasks) <= 2
    assert [task_names()[int(ids[0])]] + ([task_names()[int(ids[-1])]] if len(changes) else []) == [
        next(t for t in task_names() if s in train_instructions(t)) for s in tasks
    ]
    # The frames of one episode are one continuous rollout: frame_index counts up without a break.
    assert np.array_equal(ep["frame_index"], np.arange(ep.length))


def test_failed_attempts_are_dropped_and_stores_are_appended_to(tmp_path):
    out = tmp_path / "s.zarr"
    # A random policy essentially never succeeds within 10 steps: nothing is written.
    random_cfg = _cfg(
        out, policy=PolicyConfig(name="random"), episodes=1, max_attempts=2, max_steps_per_subtask=10
    )
    result = run(random_cfg)
    assert (
        result.exit_code == 1 and result.summary["episodes_written"] == 0 and result.summary["attempts"] == 2
    )
    assert open_store(out).num_episodes == 0

    import dreamrt.sim.expert  # noqa: F401

    run(_cfg(out, episodes=1, seed=3))
    run(_cfg(out, episodes=1, seed=4))
    store = open_store(out)
    assert store.num_episodes == 2
    assert run_verify(VerifyConfig(str(out))).exit_code == 0
    with pytest.raises(UserError, match="other features"):
        run(_cfg(out, env=EnvConfig(cameras=False)))
    run(_cfg(out, env=EnvConfig(cameras=False), overwrite=True, episodes=1))
    assert open_store(out).num_episodes == 1


def test_record_config_checks():
    with pytest.raises(UserError, match="out=PATH"):
        RecordConfig()
    with pytest.raises(UserError, match="Did you mean 'open_drawer'"):
        RecordConfig(out="x.zarr", tasks=["open_drawr"])
    with pytest.raises(UserError, match="chain"):
        RecordConfig(out="x.zarr", mode="chian")


def test_record_in_absolute_action_mode(tmp_path):
    import dreamrt.sim.expert  # noqa: F401

    out = tmp_path / "abs.zarr"
    env = EnvConfig(cameras=False, action_mode="abs_cartesian")
    result = run(_cfg(out, episodes=1, tasks=["turn_on_led"], env=env))
    assert result.exit_code == 0
    store = open_store(out)
    assert store.features["action"].names == ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
    actions = store.read("action", 0, store.num_frames)
    tcp = store.read("observation.state", 0, store.num_frames)[:, :3]
    # Each action is the target the tool is heading for: within the env's 3 cm lead of where it is.
    assert np.abs(actions[:, :3] - tcp).max() < 0.05
    assert np.all(np.abs(actions[:, 3] - np.pi) < 0.6)
