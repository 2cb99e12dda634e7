"""The control loop: exact schedules on virtual time, timing with a slow real DP-T on the real clock,
and the MuJoCo robot adapter."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import CountingPolicy, TinyDPTPolicy, one_torch_thread  # noqa: F401 (a fixture)

from dreamrt.errors import UserError
from dreamrt.runtime.chunking import SchedulerConfig
from dreamrt.runtime.clock import RealClock, VirtualClock, make_clock
from dreamrt.runtime.loop import LoopConfig, run_loop
from dreamrt.runtime.robot import MujocoRobot, RecordingRobot

DT = 1 / 30
ASYNC = ("naive_async", "temporal_ensemble", "rtc")


def virtual(strategy: str, max_ticks: int, latency_s: float, **scheduler) -> LoopConfig:
    return LoopConfig(
        mode="virtual",
        max_ticks=max_ticks,
        virtual_latency_s=latency_s,
        scheduler=SchedulerConfig(strategy=strategy, **scheduler),
    )


def kinds(robot: RecordingRobot) -> str:
    return "".join("c" if c.kind == "command" else "h" for c in robot.calls)


# ---------------------------------------------------------------------------- virtual time: exact schedules


def test_naive_async_on_virtual_time_sends_the_exact_schedule():
    robot = RecordingRobot(1, VirtualClock())
    report = run_loop(robot, CountingPolicy(horizon=4), virtual("naive_async", 10, 0.5 * DT, execute_steps=2))
    assert [float(a[0]) for a in robot.commands] == [100, 101, 102, 201, 202, 301, 302, 401, 402]
    assert kinds(robot) == "h" + "c" * 9  # one hold before the first chunk
    assert report.deadline_misses == 0 and report.starved_ticks == 0
    assert (
        report.inferences == 4 and report.ticks == report.steps == 10
    )  # the 5th request is in flight at the end
    assert [r.step for r in report.records] == list(range(10))
    assert report.jitter_ms.max == 0.0  # virtual ticks take no time
    assert report.inference_ms.p50 == pytest.approx(0.5 * DT * 1e3)


def test_sync_blocks_and_misses_ticks_on_virtual_time():
    robot = RecordingRobot(1, VirtualClock())
    report = run_loop(robot, CountingPolicy(horizon=4), virtual("sync", 18, 2.5 * DT))
    # Every request waits 2.5 periods: two ticks are lost, then the chunk runs from its first action.
    assert [float(a[0]) for a in robot.commands] == [
        100,
        101,
        102,
        103,
        200,
        201,
        202,
        203,
        300,
        301,
        302,
        303,
    ]
    assert kinds(robot) == "c" * 12
    assert [r.step for r in report.records] == [2, 3, 4, 5, 8, 9, 10, 11, 14, 15, 16, 17]
    assert [r.deadline_miss for r in report.records] == [2, 0, 0, 0] * 3
    assert report.deadline_misses == 6 and report.steps == 18 and report.ticks == 12
    assert report.records[0].jitter_ms == pytest.approx(0.5 * DT * 1e3)


@pytest.mark.parametrize("strategy", ["sync", *ASYNC])
@pytest.mark.usefixtures("one_torch_thread")
def test_slow_dpt_on_virtual_time(strategy):
    """A real DP-T whose inference costs 3 ticks of simulated time: async strategies never starve."""
    policy = TinyDPTPolicy(num_steps=5)
    robot = RecordingRobot(2, VirtualClock())
    report = run_loop(robot, policy, virtual(strategy, 60, 3 * DT - 1e-4))
    if strategy == "sync":
        # Each wait ends just before the third period: two ticks lost per chunk, nothing held.
        assert report.deadline_misses == 2 * report.inferences
        assert report.ticks == 60 - report.deadline_misses and report.held == 0
    else:
        assert report.deadline_misses == 0 and report.starved_ticks == 0
        assert kinds(robot) == "hhh" + "c" * 57  # hold only until the first chunk arrives
        assert report.queue_depth.count == 57 and min(r.queue_depth for r in report.records[3:]) >= 1
    if strategy == "rtc":
        assert (
            policy.guided_calls == len(report.rtc_delays) >= 5
        )  # every request after the first is inpainted
        # d: s = 8 while only the warm-up latency is known, then ceil(latency / dt) = 3.
        assert report.rtc_delays == [8] + [3] * (len(report.rtc_delays) - 1)


@pytest.mark.usefixtures("one_torch_thread")
def test_virtual_runs_are_deterministic():
    def commands():
        robot = RecordingRobot(2, VirtualClock())
        run_loop(robot, TinyDPTPolicy(num_steps=5, seed=3), virtual("rtc", 40, 0.05))
        return np.stack(robot.commands)

    np.testing.assert_array_equal(commands(), commands())


def test_a_slow_tick_skips_the_steps_it_missed():
    clock = VirtualClock()
    robot = RecordingRobot(1, clock)
    report = run_loop(
        robot,
        CountingPolicy(horizon=16),
        virtual("naive_async", 12, 0.5 * DT),
        on_tick=lambda r: setattr(robot, "command_cost_s", 2.5 * DT if r.step == 4 else 0.0),
    )
    # Tick 5's command takes 2.5 periods: it misses its own deadline and ends in period 7, so
    # step 6 is skipped (its action is past) and tick 7 runs half a period late.
    assert [r.step for r in report.records] == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    assert report.records[5].deadline_miss == 1 and report.records[6].deadline_miss == 1
    assert report.records[6].jitter_ms == pytest.approx(0.5 * DT * 1e3)
    assert report.deadline_misses == 2
    assert [float(a[0]) for a in robot.commands][3:6] == [103, 104, 106]


# ---------------------------------------------------------------------------- real clock


def real(strategy: str, max_ticks: int, **scheduler) -> LoopConfig:
    # SCHED_FIFO for the loop and the worker where the OS allows it: the development machine is
    # shared, and a loop thread (or a GIL-holding worker) preempted by other processes misses
    # deadlines no design could keep.
    return LoopConfig(
        mode="real",
        max_ticks=max_ticks,
        realtime_priority=10,
        scheduler=SchedulerConfig(strategy=strategy, **scheduler),
    )


def _steps_taking(seconds: float, guided: bool) -> int:
    """Sampling steps for which the 6-layer tiny DP-T's inference takes about ``seconds`` on this
    machine: the test needs inference slower than a tick yet short enough for a 16-step chunk to
    hide, and machines here differ 3x in speed. rtc backpropagates through the denoiser at every
    step (about 3x the work per step)."""
    import time

    probe_steps = 10
    policy = TinyDPTPolicy(num_steps=probe_steps, n_layer=6)
    obs = {"observation.state": np.zeros(2, np.float32)}
    prefix, weights = np.zeros((16, 2), np.float32), np.ones(16, np.float32)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        policy.act_guided(obs, prefix, weights) if guided else policy.act(obs)
        times.append(time.perf_counter() - start)
    return int(np.clip(round(seconds / (min(times) / probe_steps)), 10, 100))


@pytest.mark.parametrize("strategy", ["sync", *ASYNC])
@pytest.mark.usefixtures("one_torch_thread")
def test_slow_dpt_on_the_real_clock(strategy):
    """60 real ticks at 30 Hz with a 6-layer tiny DP-T whose sampling takes about three ticks."""
    s = None if strategy in ("sync", "temporal_ensemble") else 4
    target_ms = 3 * DT * 1e3
    num_steps = _steps_taking(target_ms / 1e3, guided=strategy == "rtc")
    failures = []
    # Up to three runs: without real-time scheduling on a loaded machine one run can lose the CPU.
    for _ in range(3):
        policy = TinyDPTPolicy(num_steps=num_steps, n_layer=6)
        robot = RecordingRobot(2, RealClock())
        report = run_loop(robot, policy, real(strategy, 60, execute_steps=s))
        assert report.inference_ms.p50 > DT * 1e3  # the premise: inference is slower than a tick
        if strategy == "sync":
            assert report.deadline_misses > 0
            assert report.steps == 60 and report.ticks < 60
            return
        first = next(i for i, r in enumerate(report.records) if r.queue_depth > 0)
        warm = report.records[first:]
        if report.deadline_misses == 0 and report.starved_ticks == 0:
            assert all(r.queue_depth >= 1 and r.safety == 0 for r in warm)
            assert report.inferences >= 3
            if strategy == "rtc":
                assert policy.guided_calls >= 2
            return
        failures.append(report.summary())
        # The probe can run in a quiet moment and the loop in a busy one (CI measured 1.7x the
        # probe's time): temporal_ensemble then starves once two inferences outlast its 16-step
        # chunk. Bring the next run back to the target instead of asserting on a slower premise.
        if report.inference_ms.p50 > target_ms:
            num_steps = max(10, round(num_steps * target_ms / report.inference_ms.p50))
    pytest.fail(f"deadline misses or an empty queue in all three runs: {failures}")


def test_real_clock_holds_no_drift():
    clock = RealClock()
    robot = RecordingRobot(1, clock)
    report = run_loop(robot, CountingPolicy(horizon=8), real("naive_async", 45))
    starts = np.array([r.time_s for r in report.records])
    # Absolute deadlines: tick k starts k * dt after the first, up to its own jitter (no accumulation).
    lateness = starts - np.arange(45) * DT
    assert np.all(lateness >= 0) and np.median(lateness[-15:]) < 0.003
    assert report.wall_s == pytest.approx(45 * DT, abs=0.05)


def test_real_time_runs_keep_the_heap_out_of_the_garbage_collector():
    # A full collection over everything torch and MuJoCo allocated stalls both threads for tens
    # of ms; the loop freezes what exists before its first tick and unfreezes at the end.
    import gc

    frozen_during: list[int] = []
    robot = RecordingRobot(1, RealClock())
    run_loop(
        robot,
        CountingPolicy(horizon=8),
        real("naive_async", 6),
        on_tick=lambda r: frozen_during.append(gc.get_freeze_count()),
    )
    assert min(frozen_during) > 1000 and gc.get_freeze_count() == 0
    run_loop(
        RecordingRobot(1, VirtualClock()),
        CountingPolicy(horizon=8),
        virtual("naive_async", 6, 0.0),
        on_tick=lambda r: frozen_during.append(-gc.get_freeze_count()),
    )
    assert frozen_during[-1] == 0  # virtual time is no real-time run: nothing frozen


# ---------------------------------------------------------------------------- clocks and config


def test_clock_must_match_the_mode():
    robot = RecordingRobot(1, VirtualClock())
    with pytest.raises(UserError, match="mode='real'"):
        run_loop(robot, CountingPolicy(), LoopConfig(mode="real", max_ticks=2))
    with pytest.raises(UserError, match="Did you mean 'virtual'"):
        LoopConfig(mode="virtul")
    with pytest.raises(UserError, match="rate_hz"):
        LoopConfig(rate_hz=0)


def test_robot_without_timestamps_is_refused():
    class NoStamp(RecordingRobot):
        def observe(self):
            obs = super().observe()
            del obs["timestamp"]
            return obs

    with pytest.raises(UserError, match="timestamp"):
        run_loop(NoStamp(1, VirtualClock()), CountingPolicy(), virtual("sync", 2, 0.0))


def test_real_clock_sleeps_to_the_deadline():
    clock = make_clock("real")
    t = clock.now()
    clock.sleep_until(t + 0.02)
    assert 0.02 <= clock.now() - t < 0.03
    v = make_clock("virtual")
    v.sleep_until(1.5)
    v.sleep_until(1.0)  # never backwards
    v.advance(0.25)
    assert v.now() == 1.75


# ---------------------------------------------------------------------------- the MuJoCo robot


@pytest.fixture(scope="module")
def env():
    from dreamrt.sim.env import CalvinStyleEnv, EnvConfig

    env = CalvinStyleEnv(EnvConfig(cameras=False))
    yield env
    env.close()


def test_mujoco_robot_with_the_expert_on_virtual_time(env):
    from dreamrt.sim.expert import ScriptedExpert
    from dreamrt.sim.language import eval_instruction

    def run():
        clock = VirtualClock()
        robot = MujocoRobot(env, clock)
        robot.reset(seed=1, options={"instruction": eval_instruction("open_drawer")})
        start = robot.observe()["observation.state"][:3].copy()
        expert = ScriptedExpert(scene="D", seed=0)
        report = run_loop(robot, expert, virtual("sync", 40, 0.001))
        return robot, start, report

    robot, start, report = run()
    assert robot.steps == 40 == report.ticks
    assert report.deadline_misses == 0 and report.held == 0
    tcp = robot.observe()["observation.state"][:3]
    assert np.linalg.norm(tcp - start) > 0.02  # the arm went somewhere
    robot2, _, _ = run()
    np.testing.assert_array_equal(robot2.observe()["observation.state"], robot.observe()["observation.state"])


def test_mujoco_robot_hold_keeps_the_target(env):
    robot = MujocoRobot(env, VirtualClock())
    robot.reset(seed=0)
    for _ in range(3):
        robot.command(np.array([1, 0, 0, 0, 0, 0, -1], np.float32))
    target = env.target_pose[0].copy()
    action = robot.hold()
    np.testing.assert_array_equal(action, [0, 0, 0, 0, 0, 0, -1])
    assert robot.steps == 4
    np.testing.assert_allclose(env.target_pose[0], target, atol=1e-9)
    assert robot.action_bounds[0].shape == (7,)
