"""`dreamrt bench chunking`: the jump metric on constructed data, rows from a tiny DP-T, and the loop
handing every step's observation to a policy with an observation history."""

import math

import numpy as np
import pytest
from test_onnx_backend import make_policy

from dreamrt.errors import UserError
from dreamrt.policies.diffusion_policy import save_diffusion_policy
from dreamrt.policies.factory import PolicyConfig
from dreamrt.policies.protocol import ActionChunk, PolicySpec
from dreamrt.policies.schedulers import SamplerConfig
from dreamrt.runtime.bench_chunking import (
    BenchChunkingConfig,
    ChunkLog,
    JumpStats,
    action_jumps,
    chunk_boundaries,
    run,
)

ROW_KEYS = {"strategy", "delay_ms", "episodes", "success", "max_action_jump", "mean_boundary_jump", "ticks"}


def test_jumps_on_constructed_commands():
    # Two chunks of 3 commands; the gripper (dim 6) flips, which must not count.
    a = np.zeros((6, 7), np.float32)
    a[:3, 0] = [0.0, 0.1, 0.2]  # chunk 0 moves x by 0.1 per step
    a[3:, 0] = [0.7, 0.8, 0.9]  # chunk 1 starts 0.5 further on: the boundary jump
    a[3:, 4] = -0.2  # and turns: 0.2 in one rotation dim at the same boundary
    a[3:, 6] = 1.0
    np.testing.assert_allclose(action_jumps(a), [0.1, 0.1, 0.5, 0.1, 0.1], atol=1e-6)
    sources = [0, 0, 0, 1, 1, 1]
    arrived = np.array([True, False, True, False, False, False])  # a chunk arrived early (rtc's frozen steps)
    assert chunk_boundaries(sources, arrived).tolist() == [False, False, True, False, False]
    # Blended commands (temporal ensembling) fall back to arrivals.
    assert chunk_boundaries([None] * 6, arrived).tolist() == [False, True, False, False, False]
    assert chunk_boundaries([0, None, 1], np.array([True, False, False])).tolist() == [False, False]
    stats = JumpStats()
    stats.add(a, sources, arrived)
    stats.add(a[:1], [0], arrived[:1])  # one command: no jump
    s = stats.summary()
    assert s["boundaries"] == 1 and s["max_action_jump"] == pytest.approx(0.5, abs=1e-6)
    assert s["mean_boundary_jump"] == pytest.approx(0.5, abs=1e-6)
    assert s["mean_within_jump"] == pytest.approx(0.1, abs=1e-6)
    assert JumpStats().summary()["max_action_jump"] is None


def test_chunk_log_traces_commands_to_chunks():
    class Fixed:
        spec = PolicySpec(rate_hz=30.0, action_dim=2, horizon=3)

        def __init__(self):
            self.n = 0

        def reset(self, seed=None):
            pass

        def act(self, observation):
            self.n += 1
            return ActionChunk(self.n + np.arange(6, dtype=np.float32).reshape(3, 2) / 10)

    log = ChunkLog(Fixed())
    log.act({})
    log.act({})
    assert log.source(np.array([1.2, 1.3], np.float32)) == 0
    assert log.source(np.array([2.0, 2.1], np.float32)) == 1
    assert log.source(np.array([1.2, 1.31], np.float32)) is None
    assert not hasattr(log, "observe") and not hasattr(log, "act_guided")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    policy = make_policy(language=False, sampler=SamplerConfig(name="ddim", num_steps=2), p_drop=0.0)
    return save_diffusion_policy(policy, tmp_path_factory.mktemp("bench_chunking") / "ckpt")


def test_sync_and_rtc_rows_from_a_tiny_dpt(checkpoint, tmp_path, capsys):
    cfg = BenchChunkingConfig(
        policy=PolicyConfig(path=str(checkpoint)),
        strategies=["sync", "rtc"],
        delays_s=[0.05, 0.1],
        tasks=["move_slider_left"],
        episodes_per_task=1,
        max_ticks=45,
        num_workers=0,
        progress=False,
    )
    summary = run(cfg, tmp_path).summary
    rows = summary["rows"]
    assert [(r["strategy"], r["delay_ms"]) for r in rows] == [
        ("sync", 50),
        ("sync", 100),
        ("rtc", 50),
        ("rtc", 100),
    ]
    for r in rows:
        assert ROW_KEYS <= set(r) and r["episodes"] == 1 and 0.0 <= r["success"] <= 1.0
        for key in ("max_action_jump", "mean_boundary_jump", "mean_within_jump"):
            assert math.isfinite(r[key]) and r[key] >= 0
        assert r["max_action_jump"] >= r["max_boundary_jump"] >= r["mean_boundary_jump"]
        assert r["boundaries"] >= 1 and r["chunks"] >= 2
        assert r["ticks"] <= 45 and r["commanded"] + r["held"] + r["deadline_misses"] >= r["ticks"]
    by = {(r["strategy"], r["delay_ms"]): r for r in rows}
    # sync waits out every inference: the whole periods it covers, 1 (50 ms) or 3 (100 ms), are skipped
    # (the last wait may run past the episode's end); async strategies never wait
    for delay, skipped in ((50, 1), (100, 3)):
        r = by[("sync", delay)]
        assert skipped * (r["chunks"] - 1) <= r["deadline_misses"] <= skipped * r["chunks"]
    assert by[("rtc", 50)]["deadline_misses"] == 0 and by[("rtc", 100)]["deadline_misses"] == 0
    assert 1 <= by[("rtc", 100)]["rtc_delay_p50"] <= 3  # ceil(100 ms / 33.3 ms), clamped to what is queued
    assert by[("rtc", 100)]["held"] > by[("rtc", 50)]["held"]  # 3 steps late with 2 to spare: it starves
    assert (
        summary["horizon"] == 4 and summary["n_obs_steps"] == 2 and summary["guided"] is True
    )  # DiffusionPolicy.act_guided: RTC inpaints
    assert (tmp_path / "results.json").is_file()
    assert "bnd mean" in capsys.readouterr().out
    # Deterministic: virtual time with a fixed latency and per-episode seeds.
    again = run(BenchChunkingConfig(**{**cfg.__dict__, "strategies": ["rtc"], "delays_s": [0.1]}), None)
    assert again.summary["rows"][0] == by[("rtc", 100)]


def test_config_errors(checkpoint):
    ok = dict(policy=PolicyConfig(path=str(checkpoint)))
    with pytest.raises(UserError, match="policy.path"):
        BenchChunkingConfig()
    with pytest.raises(UserError, match="Did you mean 'naive_async'"):
        BenchChunkingConfig(**ok, strategies=["naive_asinc"])
    with pytest.raises(UserError, match="delays_s contains -0.1"):
        BenchChunkingConfig(**ok, delays_s=[-0.1])
    with pytest.raises(UserError, match="max_ticks=0"):
        BenchChunkingConfig(**ok, max_ticks=0)
    with pytest.raises(UserError, match="Unknown task"):
        BenchChunkingConfig(**ok, tasks=["open_drawr"])


def test_bench_chunking_config_composes_from_its_yaml():
    from dreamrt.cli.commands import by_name
    from dreamrt.cli.main import compose

    command = by_name()["bench chunking"]
    cfg, _ = compose(command, ["policy.path=/ckpt", "delays_s=[0.2]", "tasks=null"])
    assert (cfg.policy.path, cfg.delays_s, cfg.tasks) == ("/ckpt", [0.2], None)
    assert cfg.strategies == ["sync", "naive_async", "temporal_ensemble", "rtc"] and cfg.max_ticks == 360


# ---------------------------------------------------------------------------- the loop's history feed (runtime/loop.py)


class HistoryPolicy:
    """To = 2: records the control step of every observation it is given, through observe or act."""

    spec = PolicySpec(rate_hz=30.0, action_dim=1, horizon=4, n_obs_steps=2)

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def reset(self, seed=None):
        pass

    def observe(self, observation):
        self.calls.append(("observe", round(observation["timestamp"] * 30)))

    def act(self, observation):
        self.calls.append(("act", round(observation["timestamp"] * 30)))
        return ActionChunk(np.zeros((4, 1), np.float32))


@pytest.mark.parametrize("strategy", ["naive_async", "rtc", "sync"])
def test_the_loop_hands_a_history_policy_the_step_before_each_request(strategy):
    from dreamrt.runtime.chunking import SchedulerConfig
    from dreamrt.runtime.clock import VirtualClock
    from dreamrt.runtime.loop import LoopConfig, run_loop
    from dreamrt.runtime.robot import RecordingRobot

    policy = HistoryPolicy()
    robot = RecordingRobot(1, VirtualClock())
    cfg = LoopConfig(
        mode="virtual", max_ticks=40, virtual_latency_s=0.05, scheduler=SchedulerConfig(strategy=strategy)
    )
    run_loop(robot, policy, cfg)
    steps = [s for _, s in policy.calls]
    assert steps == sorted(set(steps))  # each step at most once, in order
    acts = [i for i, (kind, _) in enumerate(policy.calls) if kind == "act"]
    assert len(acts) >= 5
    for i in acts[1:]:
        step = policy.calls[i][1]
        assert policy.calls[i - 1][1] == step - 1, (strategy, policy.calls[: i + 1])
