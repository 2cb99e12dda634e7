"""`dreamrt bench loop`: real-time runs with a tiny DP-T checkpoint, idle and with a CPU hog; episodes in one run."""

import json
import multiprocessing
import os

import numpy as np
import pytest

from dreamrt.errors import UserError
from dreamrt.policies.factory import PolicyConfig
from dreamrt.runtime.bench_loop import (
    BenchLoopConfig,
    EpisodePolicy,
    EpisodicRobot,
    episode_stream,
    resolve_strategy,
    run,
    start_hog,
    stop_hog,
)

ROW_KEYS = {
    "strategy",
    "load",
    "ticks",
    "deadline_misses",
    "jitter_ms_p99",
    "jitter_ms_p50",
    "jitter_ms_max",
    "inference_ms_p50",
    "inference_ms_p99",
    "held",
    "starved_ticks",
    "episodes",
    "resets",
    "reset_ms_p50",
    "misses_at_resets",
}


def test_idle_and_hog_rows_with_a_dpt_checkpoint(tiny_state_checkpoint, tmp_path, capsys):
    cfg = BenchLoopConfig(
        policy=PolicyConfig(path=str(tiny_state_checkpoint)),
        ticks=60,
        max_episode_ticks=20,  # at least two in-loop resets in 60 ticks
        tasks=["open_drawer", "turn_on_led"],
        warmup=1,
        progress=False,
    )
    summary = run(cfg, tmp_path).summary
    rows = summary["rows"]
    assert [r["load"] for r in rows] == ["idle", "hog"]
    assert summary["strategy"] == "rtc" and summary["cameras"] is False and summary["threads"] == 1
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["strategy"] == "rtc" and r["ticks"] == 60 and r["horizon"] == 4
        assert isinstance(r["deadline_misses"], int) and r["deadline_misses"] >= 0
        assert r["executed_ticks"] <= 60 and r["executed_ticks"] + r["deadline_misses"] >= 60
        assert 0 <= r["misses_at_resets"] <= r["deadline_misses"]
        assert r["jitter_ms_p50"] <= r["jitter_ms_p99"] <= r["jitter_ms_max"]
        assert r["inferences"] > 0 and r["inference_errors"] == 0 and r["inference_ms_p50"] > 0
        assert r["episodes"] >= 2 and r["resets"] == r["episodes"] and r["reset_ms_p50"] > 0
        saved = json.loads((tmp_path / f"loop_{r['load']}.json").read_text())
        assert saved["ticks"] == r["executed_ticks"] and saved["mode"] == "real"
    assert rows[0]["hog_pid"] is None
    pid = rows[1]["hog_pid"]
    assert isinstance(pid, int)
    assert pid not in [p.pid for p in multiprocessing.active_children()]
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    out = capsys.readouterr().out
    assert "jit p99" in out and "hog" in out


def test_hog_spins_on_one_core_until_stopped():
    proc = start_hog()
    try:
        assert proc.is_alive()
        if hasattr(os, "sched_getaffinity"):
            assert os.sched_getaffinity(proc.pid) == {max(os.sched_getaffinity(0))}
    finally:
        stop_hog(proc)
    assert not proc.is_alive() and proc.exitcode is not None


def test_episodes_follow_each_other_inside_one_run():
    """The expert opens the drawer again and again in one virtual-time run: success, reset, new seed."""
    from dreamrt.policies.factory import make_policy as make_builtin
    from dreamrt.runtime.chunking import SchedulerConfig
    from dreamrt.runtime.clock import VirtualClock
    from dreamrt.runtime.loop import LoopConfig, run_loop
    from dreamrt.sim.env import CalvinStyleEnv, EnvConfig

    env = CalvinStyleEnv(EnvConfig(cameras=False))
    try:
        robot = EpisodicRobot(env, VirtualClock(), episode_stream(["open_drawer"], 3), max_episode_ticks=150)
        first = robot.start()
        assert first["bench.episode"] == 0 and first["task"] == robot.episode.instruction
        expert = make_builtin(PolicyConfig(name="expert"))
        seeds = []

        def seed_of(i):
            seeds.append(i)
            return 1000 + i

        cfg = LoopConfig(
            mode="virtual", max_ticks=300, virtual_latency_s=0.0, scheduler=SchedulerConfig(strategy="sync")
        )
        report = run_loop(robot, EpisodePolicy(expert, seed_of=seed_of), cfg)
    finally:
        env.close()
    assert report.ticks == 300 and report.deadline_misses == 0
    assert robot.successes >= 2 and robot.ended == len(robot.reset_s) == len(robot.reset_ticks)
    assert robot.executed == 300 and all(0 <= t < 300 for t in robot.reset_ticks)
    assert seeds == list(range(robot.ended + 1))  # one policy reset per episode, in order
    assert np.all(np.diff(robot.reset_ticks) > 0)


def test_strategy_and_config_errors():
    assert resolve_strategy("auto", 8) == "rtc" and resolve_strategy("auto", 1) == "sync"
    assert resolve_strategy("naive_async", 1) == "naive_async"
    with pytest.raises(UserError, match="Did you mean 'rtc'"):
        BenchLoopConfig(strategy="rct")
    with pytest.raises(UserError, match="load"):
        BenchLoopConfig(loads=["idle", "busy"])
    with pytest.raises(UserError, match="ticks=0"):
        BenchLoopConfig(ticks=0)
    with pytest.raises(UserError, match="Unknown task"):
        BenchLoopConfig(tasks=["open_drawr"])
    with pytest.raises(UserError, match="twice"):
        BenchLoopConfig(loads=["hog", "hog"])
    with pytest.raises(UserError, match="realtime_priority"):
        BenchLoopConfig(realtime_priority=1)


def test_bench_loop_config_composes_from_its_yaml():
    from dreamrt.cli.commands import by_name
    from dreamrt.cli.main import compose

    command = by_name()["bench loop"]
    cfg, _ = compose(command, ["policy.path=/ckpt", "policy.steps=10", "ticks=600", "loads=[idle]"])
    assert (cfg.policy.path, cfg.policy.steps, cfg.ticks, cfg.loads) == ("/ckpt", 10, 600, ["idle"])
    assert cfg.strategy == "auto" and cfg.env.scene == "D" and cfg.cameras is None
    cfg, _ = compose(command, [])
    assert cfg.policy.name == "expert" and cfg.ticks == 10_000 and cfg.loads == ["idle", "hog"]
