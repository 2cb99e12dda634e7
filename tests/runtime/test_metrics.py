"""Latency accounting and recording the loop into the episode store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import CountingPolicy

from dreamrt.episodes import create_store, open_store
from dreamrt.runtime.chunking import SchedulerConfig
from dreamrt.runtime.clock import RealClock, VirtualClock
from dreamrt.runtime.loop import LoopConfig, run_loop
from dreamrt.runtime.metrics import EpisodeRecorder, Percentiles, recording_features
from dreamrt.runtime.robot import MujocoRobot, RecordingRobot
from dreamrt.runtime.safety import REASON_CODE

DT = 1 / 30


def test_percentiles():
    p = Percentiles.of(range(1, 101))
    assert (p.count, p.mean, p.p50, p.max) == (100, 50.5, 50.5, 100.0)
    assert p.p90 == pytest.approx(90.1) and p.p95 == pytest.approx(95.05) and p.p99 == pytest.approx(99.01)
    empty = Percentiles.of([])
    assert empty.count == 0 and empty.to_dict()["p50"] is None


def test_latency_percentiles_leave_out_the_warmup():
    robot = RecordingRobot(1, VirtualClock())
    # Virtual time charged with the measured compute: a 50 ms first call, then 5 ms calls.
    policy = CountingPolicy(horizon=8, compute_s=0.005, first_compute_s=0.05)
    cfg = LoopConfig(
        mode="virtual", max_ticks=60, virtual_latency_s=None, scheduler=SchedulerConfig(strategy="rtc")
    )
    report = run_loop(robot, policy, cfg)
    assert len(report.warmup_inference_ms) == 1 and report.warmup_inference_ms[0] >= 50
    assert report.inference_ms.count == report.inferences - 1
    assert 5 <= report.inference_ms.p50 < 30 and report.inference_ms.max < 50
    # The warm-up call took 2 ticks; the delay estimate follows the 5 ms calls once they are measured.
    assert report.records[0].queue_depth == 0 and report.records[2].chunk_arrived
    assert report.rtc_delays[0] == 4 and set(report.rtc_delays[1:]) == {1}
    summary = json.loads(json.dumps(report.summary()))  # plain JSON
    assert summary["inference_ms"]["count"] == report.inferences - 1 and "records" not in summary


def test_recording_every_tick_exactly(tmp_path):
    robot = RecordingRobot(1, VirtualClock(), task="count up")
    policy = CountingPolicy(horizon=4, nan_at={2: 3})
    features = recording_features(robot.observe(), action_dim=1)
    cfg = LoopConfig(
        mode="virtual",
        max_ticks=90,
        virtual_latency_s=1.5 * DT,
        scheduler=SchedulerConfig(strategy="naive_async", execute_steps=2),
    )
    with create_store(tmp_path / "run.zarr", features, fps=30) as writer, EpisodeRecorder(writer) as recorder:
        report = run_loop(robot, policy, cfg, recorder)
    assert report.frames_recorded == report.ticks == 90 and report.frames_dropped == 0
    assert report.frames_refused == 0

    store = open_store(tmp_path / "run.zarr")
    assert store.num_episodes == 1 and store.num_frames == 90
    ep = store.get_episode(0)
    assert store.episode_tasks(0) == ["count up"]
    np.testing.assert_array_equal(ep["loop.step"], [r.step for r in report.records])
    np.testing.assert_allclose(ep["timestamp"], np.arange(90) * DT)
    np.testing.assert_array_equal(ep["action"][:, 0], [c.action[0] for c in robot.calls])
    np.testing.assert_array_equal(ep["loop.safety"], [r.safety for r in report.records])
    assert (ep["loop.safety"] == REASON_CODE["nonfinite_action"]).sum() == 1
    np.testing.assert_array_equal(ep["loop.queue_depth"], [r.queue_depth for r in report.records])
    np.testing.assert_array_equal(ep["loop.chunk_arrived"], [r.chunk_arrived for r in report.records])
    np.testing.assert_allclose(ep["loop.inference_ms"], [r.inference_ms for r in report.records], rtol=1e-6)
    # The state observed at each tick is the sum of everything commanded before it.
    commanded = np.array([c.action[0] if c.kind == "command" else 0.0 for c in robot.calls])
    np.testing.assert_allclose(
        ep["observation.state"][:, 0], np.concatenate([[0], np.cumsum(commanded)[:-1]])
    )


def test_recorder_counts_drops_instead_of_blocking(tmp_path):
    features = recording_features({"observation.state": np.zeros(2, np.float32)}, action_dim=2)
    with create_store(tmp_path / "s.zarr", features, fps=30) as writer:
        recorder = EpisodeRecorder(writer, queue_size=2)  # not started: nothing drains the queue
        frame = {"observation.state": np.zeros(2, np.float32)}
        assert recorder.add(frame, "t") and recorder.add(frame, "t")
        assert not recorder.add(frame, "t") and recorder.dropped == 1


def test_real_time_mujoco_recording_with_cameras_drops_nothing(tmp_path):
    from dreamrt.sim.env import CalvinStyleEnv, EnvConfig
    from dreamrt.sim.expert import ScriptedExpert
    from dreamrt.sim.language import eval_instruction

    env = CalvinStyleEnv(EnvConfig(cameras=True))
    try:
        robot = MujocoRobot(env, RealClock())
        first = robot.reset(seed=0, options={"instruction": eval_instruction("open_drawer")})
        features = recording_features(first, action_dim=7)
        assert features["observation.images.static"] == {"dtype": "uint8", "shape": [96, 96, 3]}
        cfg = LoopConfig(mode="real", max_ticks=60, scheduler=SchedulerConfig(strategy="sync"))
        with (
            create_store(tmp_path / "sim.zarr", features, fps=30, robot_type="panda") as writer,
            EpisodeRecorder(writer, queue_size=64) as recorder,
        ):
            report = run_loop(robot, ScriptedExpert(seed=0), cfg, recorder)
    finally:
        env.close()
    assert report.frames_dropped == 0 and report.frames_refused == 0
    assert report.frames_recorded == report.ticks == robot.steps
    store = open_store(tmp_path / "sim.zarr")
    ep = store.get_episode(0)
    assert ep.length == report.ticks
    assert ep["observation.images.gripper"].shape == (report.ticks, 64, 64, 3)
    assert ep["observation.images.static"][-1].std() > 0  # real pixels
    np.testing.assert_allclose(ep["timestamp"], np.array([r.step for r in report.records]) * DT)
    assert np.all(np.diff(ep["loop.step"]) >= 1)
