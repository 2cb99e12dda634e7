"""Safety holds and recovery: NaN and out-of-bounds actions, stale and broken observations, inference errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fakes import CountingPolicy

from dreamrt.errors import UserError
from dreamrt.runtime.chunking import SchedulerConfig
from dreamrt.runtime.clock import RealClock, VirtualClock
from dreamrt.runtime.loop import LoopConfig, run_loop
from dreamrt.runtime.robot import RecordingRobot
from dreamrt.runtime.safety import REASON_CODE, SafetyConfig, check_action, check_observation, resolve_bounds

DT = 1 / 30


def config(max_ticks: int, safety: SafetyConfig | None = None, mode: str = "virtual") -> LoopConfig:
    # naive_async, 4-action chunks, a request every 2 steps, results half a tick after the request.
    return LoopConfig(
        mode=mode,
        max_ticks=max_ticks,
        virtual_latency_s=0.5 * DT,
        scheduler=SchedulerConfig(strategy="naive_async", execute_steps=2),
        safety=safety or SafetyConfig(),
    )


def kinds(robot: RecordingRobot) -> str:
    return "".join("c" if c.kind == "command" else "h" for c in robot.calls)


def sent(robot: RecordingRobot) -> list[float]:
    return [float(a[0]) for a in robot.commands]


def test_nan_action_holds_for_that_step_only(caplog):
    robot = RecordingRobot(1, VirtualClock())
    with caplog.at_level(logging.WARNING, logger="dreamrt.runtime.safety"):
        report = run_loop(robot, CountingPolicy(horizon=4, nan_at={0: 2}), config(9))
    # Step 3 (the first chunk's NaN) holds; the robot did not move on, so the next chunk starts at index 0.
    assert kinds(robot) == "hcchccccc"
    assert sent(robot) == [100, 101, 200, 201, 202, 301, 302]
    assert report.safety_events == {"nonfinite_action": 1}
    assert report.records[3].safety == REASON_CODE["nonfinite_action"] and report.records[4].safety == 0
    assert "step 3: holding position: nonfinite_action" in caplog.text
    assert "step 4: recovered from nonfinite_action" in caplog.text


@pytest.mark.parametrize("source", ["config", "robot"])
def test_out_of_bounds_action_holds(source):
    bounds = (np.array([-1000.0]), np.array([1000.0]))
    robot = RecordingRobot(1, VirtualClock(), action_bounds=bounds if source == "robot" else None)
    safety = SafetyConfig(action_low=[-1000.0], action_high=[1000.0]) if source == "config" else None
    report = run_loop(robot, CountingPolicy(horizon=4, value_at={1: (1, 5000.0)}), config(8, safety))
    assert kinds(robot) == "hccchccc"
    assert sent(robot) == [100, 101, 102, 202, 301, 302]
    assert report.safety_events == {"action_out_of_bounds": 1}


def test_stale_observation_holds_and_is_never_sent_to_the_policy():
    robot = RecordingRobot(1, VirtualClock())
    policy = CountingPolicy(horizon=4)

    def on_tick(record):
        if record.step == 3:
            robot.observation_lag_s = 1.0  # ticks 4, 5, 6 see an observation a second old
        if record.step == 6:
            robot.observation_lag_s = 0.0

    report = run_loop(robot, policy, config(12, SafetyConfig(max_obs_age_s=0.1)), on_tick=on_tick)
    assert kinds(robot) == "hccchhhhcccc"
    assert sent(robot) == [100, 101, 102, 300, 301, 302, 401]
    assert report.safety_events == {"stale_observation": 3}
    assert (
        report.starved_ticks == 1
    )  # step 7: the plan ran out during the stale ticks; a fresh request went out
    assert [r.obs_age_ms for r in report.records[4:7]] == pytest.approx([1000.0] * 3)
    # No stale observation reached the policy (a second-old stamp would be negative this early).
    assert min(o["timestamp"] for o in policy.observations) >= 0
    assert len(policy.observations) == 4


def test_broken_observation_holds():
    robot = RecordingRobot(1, VirtualClock())

    def on_tick(record):
        robot.nonfinite_state = record.step in (1, 2)

    report = run_loop(robot, CountingPolicy(horizon=8), config(8), on_tick=on_tick)
    assert kinds(robot) == "hchhcccc"
    assert report.safety_events == {"bad_observation": 2}


def test_inference_error_holds_until_a_good_chunk():
    robot = RecordingRobot(1, VirtualClock())
    report = run_loop(robot, CountingPolicy(horizon=4, fail_calls={1}), config(8))
    # The failed request (step 3) reports at step 4: the old plan is dropped, the robot holds,
    # and the retry sent at step 4 takes over at step 5.
    assert kinds(robot) == "hccchccc"
    assert sent(robot) == [100, 101, 102, 300, 301, 302]
    assert report.inference_errors == 1 and report.safety_events == {"inference_error": 1}


def test_inference_errors_on_the_worker_thread_do_not_stop_the_loop():
    robot = RecordingRobot(1, RealClock())
    policy = CountingPolicy(horizon=8, fail_calls={1, 2})
    cfg = LoopConfig(mode="real", max_ticks=30, scheduler=SchedulerConfig(strategy="naive_async"))
    report = run_loop(robot, policy, cfg)
    pattern = kinds(robot)
    assert report.ticks + report.deadline_misses >= 30 and report.inference_errors == 2, (
        pattern,
        report.summary(),
    )
    assert report.last_inference_error == "RuntimeError: injected failure in call 2"
    assert report.safety_events["inference_error"] >= 1, report.summary()
    # Held after commanding, and commanding again at the end.
    assert "ch" in pattern and pattern.endswith("c"), (pattern, report.summary())


def test_checks():
    obs = {"observation.state": np.zeros(3, np.float32), "timestamp": 10.0}
    assert check_observation(obs, 10.05, 0.1) is None
    assert check_observation(obs, 10.2, 0.1) == "stale_observation"
    assert check_observation({**obs, "timestamp": None}, 10.0, 0.1) == "bad_observation"
    assert check_observation({**obs, "observation.state": np.array([np.inf])}, 10.0, 0.1) == "bad_observation"
    assert (
        check_observation({**obs, "observation.images.x": np.zeros((2, 2, 3), np.uint8)}, 10.0, 0.1) is None
    )
    bounds = (np.array([-1.0, 0.0]), np.array([1.0, 2.0]))
    assert check_action(np.array([0.5, 2.0]), bounds) is None
    assert check_action(np.array([0.5, 2.1]), bounds) == "action_out_of_bounds"
    assert check_action(np.array([np.nan, 0.0]), None) == "nonfinite_action"


def test_bounds_and_config_errors():
    assert resolve_bounds(SafetyConfig(), None, 2) is None
    low, high = resolve_bounds(
        SafetyConfig(action_low=[0, 0], action_high=[1, 1]), (np.zeros(2), np.ones(2) * 5), 2
    )
    assert high.tolist() == [1, 1]  # the config wins over the robot
    with pytest.raises(UserError, match="2 dimensions"):
        resolve_bounds(SafetyConfig(action_low=[0], action_high=[1]), None, 2)
    with pytest.raises(UserError, match="both action_low and action_high"):
        SafetyConfig(action_low=[0.0])
    with pytest.raises(UserError, match="low <= high"):
        SafetyConfig(action_low=[1.0], action_high=[0.0])
    with pytest.raises(UserError, match="max_obs_age_s"):
        SafetyConfig(max_obs_age_s=0)
