"""The chunk schedulers on constructed chunks: exact action sequences, RTC's mask, delay and freezing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dreamrt.errors import UserError
from dreamrt.runtime.chunking import (
    ChunkScheduler,
    LatencyTracker,
    SchedulerConfig,
    delay_steps,
    soft_mask,
)


def chunk(n: int, horizon: int) -> np.ndarray:
    """Chunk n: 100 * n + index, one action dimension."""
    return (100.0 * n + np.arange(horizon, dtype=np.float32))[:, None]


def drive(sched: ChunkScheduler, steps: int, latency_steps, latency_s=None) -> tuple[list, list]:
    """What the loop does each step, without the loop: merge arrivals, request, execute or hold.

    ``latency_steps(n)`` is when request n arrives (steps after it was made); ``latency_s(n)``
    the latency the scheduler is told. Returns (executed action or None per step, tickets).
    """
    executed, tickets, in_flight = [], [], None
    for step in range(steps):
        if in_flight is not None and in_flight[0] == step:
            _, n, ticket = in_flight
            if latency_s is not None:
                sched.latencies.add(latency_s(n))
            sched.merge(chunk(n + 1, sched.horizon), ticket, step)
            in_flight = None
        if in_flight is None and sched.wants_request(step):
            ticket = sched.request(step)
            tickets.append(ticket)
            n = len(tickets) - 1
            in_flight = (step + latency_steps(n), n, ticket)
        action = sched.action_for(step)
        if action is None:
            executed.append(None)
        else:
            sched.mark_executed()
            executed.append(float(action[0]))
    return executed, tickets


def make(strategy: str, horizon: int, dt: float = 0.1, **kw) -> ChunkScheduler:
    return ChunkScheduler(SchedulerConfig(strategy=strategy, **kw), horizon=horizon, action_dim=1, dt=dt)


def test_naive_async_switches_to_the_newest_chunk_at_arrival():
    executed, tickets = drive(make("naive_async", 4, execute_steps=2), 10, lambda n: 1)
    # The first chunk starts at its first action (nothing was consumed while it was computed);
    # later ones skip the one action executed during their inference and replace the old plan.
    assert executed == [None, 100, 101, 102, 201, 202, 301, 302, 401, 402]
    assert [t.step for t in tickets] == [0, 3, 5, 7, 9]


def test_sync_runs_whole_chunks_from_their_first_action():
    # With the loop blocked (nothing executes during inference) every chunk starts at index 0.
    executed, tickets = drive(make("sync", 4), 12, lambda n: 2)
    assert executed == [None, None, 100, 101, 102, 103, None, None, 200, 201, 202, 203]
    assert [t.step for t in tickets] == [0, 6]


def test_temporal_ensemble_weights_overlapping_predictions_oldest_first():
    m = 0.5
    executed, tickets = drive(make("temporal_ensemble", 3, ensemble_decay=m), 6, lambda n: 1)
    w = math.exp(-m)
    blend = lambda old, new: (old + w * new) / (1 + w)  # noqa: E731
    expected = [None, 100, 101, blend(102, 201), blend(202, 301), blend(302, 401)]
    assert executed[:3] == expected[:3]
    np.testing.assert_allclose(executed[3:], expected[3:], rtol=1e-6)
    assert [t.step for t in tickets] == [0, 2, 3, 4, 5]  # a request whenever the worker is free (s = 1)


def test_temporal_ensemble_with_zero_decay_is_the_plain_mean():
    sched = make("temporal_ensemble", 4, ensemble_decay=0.0)
    t0 = sched.request(0)
    sched.merge(chunk(1, 4), t0, 0)
    t1 = sched.request(0)
    sched.merge(chunk(2, 4), t1, 0)
    assert float(sched.action_for(2)[0]) == pytest.approx((102 + 202) / 2)


def test_rtc_freezes_the_delay_prefix_and_does_not_trust_a_warmup_latency():
    sched = make("rtc", 6, dt=0.1, execute_steps=3, warmup_inferences=1)
    arrive = {0: 5}  # the warm-up inference takes 5 steps, the others 2
    executed, tickets = drive(
        sched, 15, lambda n: arrive.get(n, 2), latency_s=lambda n: 0.5 if n == 0 else 0.2
    )
    assert executed == [None] * 5 + [100, 101, 102, 103, 104, 105, 203, 204, 302, 303]
    # The first chunk arrives while the robot stands still: nothing skipped (not 5 actions deep).
    # Request 1 (step 8): no post-warm-up latency yet -> d = s = 3, the whole queued rest; the
    # chunk arrives after 2 steps, so step 10 keeps the frozen 105 instead of the new 202.
    assert [t.step for t in tickets] == [0, 8, 11, 14]
    assert tickets[0].delay == 0 and tickets[0].guidance is None
    g1 = tickets[1].guidance
    assert tickets[1].delay == 3
    np.testing.assert_array_equal(g1.prefix_actions[:, 0], [103, 104, 105, 105, 105, 105])
    np.testing.assert_array_equal(g1.weights, [1, 1, 1, 0, 0, 0])
    # Request 2 (step 11): d = ceil(0.2 s / 0.1 s) = 2 from the measured latency (warm-up excluded).
    g2 = tickets[2].guidance
    assert tickets[2].delay == 2
    np.testing.assert_array_equal(g2.prefix_actions[:3, 0], [203, 204, 205])
    c = 0.5  # (H - s - i) / (H - s - d + 1) at i = 2
    np.testing.assert_allclose(g2.weights, [1, 1, c * math.expm1(c) / (math.e - 1), 0, 0, 0], rtol=1e-6)


def test_rtc_delay_is_clamped_to_the_actions_queued():
    sched = make("rtc", 8, dt=0.1, execute_steps=4, warmup_inferences=0)
    for latency in (0.6, 0.6, 0.6):
        sched.latencies.add(latency)
    ticket = sched.request(0)
    sched.merge(chunk(1, 8), ticket, 0)
    for step in range(6):  # 2 actions left queued at step 6
        sched.action_for(step)
        sched.mark_executed()
    assert sched.delay_estimate() == 6
    assert sched.request(6).delay == 2


def test_delay_uses_the_configured_percentile():
    tracker = LatencyTracker(warmup=1, window=10)
    for latency in [9.0] + [0.1] * 8 + [0.35]:
        tracker.add(latency)
    assert list(tracker.recent) == [0.1] * 8 + [0.35]  # the warm-up 9 s is gone
    assert tracker.percentile(50) == pytest.approx(0.1)
    assert tracker.percentile(95) > 0.2
    for percentile, d in ((50.0, 1), (95.0, 3)):
        sched = make("rtc", 16, dt=0.1, delay_percentile=percentile)
        sched.latencies = tracker
        assert sched.delay_estimate() == d


def test_soft_mask_shape():
    w = soft_mask(10, 2, 3)
    assert w[:2].tolist() == [1, 1]
    assert w[7:].tolist() == [0, 0, 0]
    assert np.all(np.diff(w[1:8]) < 0) and np.all((w[2:7] > 0) & (w[2:7] < 1))
    c = (10 - 3 - 4) / (10 - 3 - 2 + 1)
    assert w[4] == pytest.approx(c * math.expm1(c) / (math.e - 1))
    assert soft_mask(6, 4, 3).tolist() == [1, 1, 1, 1, 0, 0]  # d beyond H - s: no decay region


def test_delay_steps_rounds_up_without_float_noise():
    dt = 1 / 30
    assert delay_steps(0.1, dt) == 3  # 0.1 / (1/30) = 3.0000000000000004
    assert delay_steps(0.1001, dt) == 4
    assert delay_steps(0.0, dt) == 0


def test_queue_depth_and_clear():
    sched = make("naive_async", 4)
    sched.merge(chunk(1, 4), sched.request(0), 0)
    assert sched.depth(0) == 4 and sched.depth(2) == 2 and sched.depth(4) == 0
    assert sched.warm
    sched.clear()
    assert sched.depth(0) == 0 and not sched.warm and sched.wants_request(0)


def test_a_chunk_entirely_in_the_past_keeps_the_old_plan():
    sched = make("naive_async", 4)
    sched.merge(chunk(1, 4), sched.request(0), 0)
    ticket = sched.request(0)
    for step in range(3):
        sched.action_for(step)
        sched.mark_executed()
    merge = sched.merge(chunk(2, 4)[:2], ticket, 3)  # 3 actions consumed: the 2-action chunk is all past
    assert merge.placed == 0 and merge.consumed == 3
    assert float(sched.action_for(3)[0]) == 103


def test_config_errors_name_the_fix():
    with pytest.raises(UserError, match="Did you mean 'rtc'"):
        SchedulerConfig(strategy="rtcc")
    with pytest.raises(UserError, match="execute_steps"):
        SchedulerConfig(execute_steps=0)
    with pytest.raises(UserError, match="execute_steps <= 4"):
        make("rtc", 4, execute_steps=5)
    with pytest.raises(UserError, match="percentile"):
        SchedulerConfig(delay_percentile=0)
