"""The fixed-rate control loop: ``run_loop(robot, policy, LoopConfig, recorder=None) -> LoopReport``.

Tick k is due at ``t0 + k * dt`` on a monotonic clock (absolute deadlines: a late tick does
not push the later ones back, so the loop never drifts). Each tick:

1. sleep until the deadline (coarse sleep, then a short spin; :mod:`dreamrt.runtime.clock`).
   A tick that wakes a whole period or more late skips the steps it missed: their actions
   belong to the past (they are counted as deadline misses);
2. ``robot.observe()``; take a finished inference result, if any, and merge its chunk into
   the action queue (:class:`~dreamrt.runtime.chunking.ChunkScheduler`);
3. if the scheduler wants a new chunk and the worker is free, submit the observation.
   Inference runs on a worker thread (:mod:`dreamrt.runtime.inference`) and never blocks
   the tick, except in the ``sync`` strategy, which waits for it (the baseline). A policy
   with an observation history (``spec.n_obs_steps > 1`` and an ``observe`` method) also
   gets the observations of the ticks in between, so its history holds consecutive steps as
   in training (see :class:`_HistoryFeed`);
4. safety (:mod:`dreamrt.runtime.safety`): a stale or broken observation, a failed
   inference, an empty queue, or a non-finite or out-of-bounds action makes the tick call
   ``robot.hold()``; otherwise ``robot.command(action)``;
5. account the tick (:class:`~dreamrt.runtime.metrics.TickRecord`) and hand the frame to
   the recorder's queue (never to the disk).

In virtual mode (``LoopConfig.mode="virtual"``, or a robot that carries a
:class:`~dreamrt.runtime.clock.VirtualClock`) the same code runs on simulated time: ticks
take no time, and each inference costs ``virtual_latency_s`` (or its measured compute
time) of simulated time, so evaluations under the loop are deterministic and run as fast
as the policy and the simulator compute.

The loop's clock is the ``clock`` argument, else the robot's ``clock`` attribute (the robot
must stamp observations on the loop's clock), else a new one for ``config.mode``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.policies.protocol import Policy
from dreamrt.runtime.chunking import ChunkScheduler, SchedulerConfig
from dreamrt.runtime.clock import CLOCK_MODES, Clock, VirtualClock, make_clock
from dreamrt.runtime.inference import InferenceResult, make_worker, set_fifo
from dreamrt.runtime.metrics import EpisodeRecorder, LoopReport, Percentiles, TickRecord
from dreamrt.runtime.robot import Robot
from dreamrt.runtime.safety import (
    REASON_CODE,
    SafetyConfig,
    SafetyLog,
    check_action,
    check_observation,
    resolve_bounds,
)

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """The control loop's settings (one per run)."""

    rate_hz: float = 30.0  # control rate
    max_ticks: int = 300  # control steps to run (duration = max_ticks / rate_hz)
    mode: str = "real"  # "real": wall clock; "virtual": simulated time, deterministic and fast
    # Virtual mode: simulated seconds each inference takes; None charges its measured compute time.
    virtual_latency_s: float | None = None
    spin_s: float = 0.001  # real mode: spin this long before each deadline instead of sleeping
    # Real mode: the interpreter's GIL switch interval while the loop runs. Python's 5 ms default
    # lets a worker thread inside Python code delay the loop's wake-up by up to 5 ms.
    switch_interval_s: float | None = 0.0005
    # Real mode: run the loop thread under SCHED_FIFO at this priority (2-99) and the inference
    # worker one below it, so other processes cannot delay the loop's wake-ups (Linux; needs
    # CAP_SYS_NICE or an rtprio limit, otherwise a warning and normal scheduling). The worker
    # must be raised too: it holds the GIL while it runs Python code, and a worker preempted by
    # another process would stall the loop through the GIL (priority inversion).
    realtime_priority: int | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_hz) and 0 < self.rate_hz <= 1000):
            raise UserError(f"LoopConfig.rate_hz={self.rate_hz!r}; expected a rate in (0, 1000] Hz, e.g. 30.")
        if isinstance(self.max_ticks, bool) or not isinstance(self.max_ticks, int) or self.max_ticks < 1:
            raise UserError(f"LoopConfig.max_ticks={self.max_ticks!r}; expected a positive int.")
        choose("loop mode", self.mode, CLOCK_MODES)
        if self.virtual_latency_s is not None and not (
            math.isfinite(self.virtual_latency_s) and self.virtual_latency_s >= 0
        ):
            raise UserError(
                f"LoopConfig.virtual_latency_s={self.virtual_latency_s!r}; expected seconds >= 0, or None to "
                "charge each inference's measured compute time."
            )
        if not 0 <= self.spin_s <= 0.05:
            raise UserError(f"LoopConfig.spin_s={self.spin_s!r}; expected seconds in [0, 0.05].")
        if self.switch_interval_s is not None and not 1e-5 <= self.switch_interval_s <= 0.1:
            raise UserError(
                f"LoopConfig.switch_interval_s={self.switch_interval_s!r}; expected seconds in [1e-5, 0.1] or None "
                "to leave the interpreter's setting alone."
            )
        if self.realtime_priority is not None and not 2 <= self.realtime_priority <= 99:
            raise UserError(
                f"LoopConfig.realtime_priority={self.realtime_priority!r}; expected a SCHED_FIFO priority in "
                "[2, 99] (e.g. 10; the worker gets one less), or None for normal scheduling."
            )

    @property
    def dt(self) -> float:
        return 1.0 / self.rate_hz


TickCallback = Callable[[TickRecord], "bool | None"]  # return True to stop the loop after this tick


def resolve_clock(config: LoopConfig, robot: Robot, clock: Clock | None) -> Clock:
    clock = clock or getattr(robot, "clock", None) or make_clock(config.mode, config.spin_s)
    virtual = isinstance(clock, VirtualClock)
    if virtual != (config.mode == "virtual"):
        raise UserError(
            f"LoopConfig.mode={config.mode!r} but the loop's clock (the clock argument or robot.clock) is a "
            f"{type(clock).__name__}. Build the robot with the clock the mode needs (make_clock(config.mode))."
        )
    return clock


@contextmanager
def _switch_interval(seconds: float | None):
    if seconds is None:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@contextmanager
def _frozen_heap(enabled: bool):
    """Move every object alive now out of the garbage collector's reach while inside.

    A full collection walks every tracked object: with torch, onnxruntime and MuJoCo loaded
    that is hundreds of thousands, tens of milliseconds with the GIL held, and it fires
    whenever enough new objects have piled up (every few minutes of ticks), stalling the loop
    and the inference thread alike. Frozen objects are skipped, so a collection during the run
    walks only what the run itself allocated.
    """
    if not enabled:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _realtime(priority: int | None):
    """SCHED_FIFO for the calling thread while inside; yields whether it was applied."""
    if priority is None:
        yield False
        return
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
    except (AttributeError, OSError) as exc:  # no POSIX scheduling calls on this OS
        log.warning("realtime_priority ignored: cannot read the thread's scheduling policy (%s)", exc)
        yield False
        return
    if not set_fifo(priority, "the control loop"):
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, *before)


def run_loop(
    robot: Robot,
    policy: Policy,
    config: LoopConfig,
    recorder: EpisodeRecorder | None = None,
    *,
    clock: Clock | None = None,
    on_tick: TickCallback | None = None,
) -> LoopReport:
    """Drive ``robot`` with ``policy`` for ``config.max_ticks`` control steps; see the module docstring.

    Call ``policy.reset(seed)`` (and reset the robot) before. ``recorder`` (started, i.e.
    entered) gets one frame per executed tick and the episode is committed at the end.
    ``on_tick(record)`` runs on the loop thread after each tick (keep it cheap); returning
    True ends the loop. Ctrl-C ends it too, holding the robot (``report.interrupted``).
    """
    clock = resolve_clock(config, robot, clock)
    feed = _HistoryFeed.wrap(policy)
    loop = _Loop(robot, policy, config, clock, recorder, on_tick, feed)
    virtual = isinstance(clock, VirtualClock)
    worker_priority = None if config.realtime_priority is None else config.realtime_priority - 1
    worker = make_worker(
        feed or policy, clock, policy.spec.action_dim, config.virtual_latency_s, worker_priority
    )
    # The worker thread starts first: it sets its own priority rather than inheriting the loop's.
    with (
        worker,
        _switch_interval(None if virtual else config.switch_interval_s),
        _frozen_heap(not virtual),
        _realtime(None if virtual else config.realtime_priority) as realtime,
    ):
        loop.run(worker)
    if recorder is not None:
        recorder.end_episode()  # after the loop: draining the writer's queue is no tick's business
    return loop.report(realtime)


class _HistoryFeed:
    """The policy as the worker calls it, for policies with an observation history (To > 1).

    The loop asks for a chunk only every few steps, but a policy like DP-T stacks its last
    To observations and was trained on consecutive control steps. The loop notes each usable
    observation it does not submit (:meth:`note`, loop thread, the newest To - 1 kept) and
    hands them over with the next request (:meth:`hand_over`, just before ``submit``); the
    worker passes them to ``policy.observe`` before ``act``. Every policy call thus stays
    on the worker's thread, in step order, and the loop never touches the policy while an
    inference runs (the handed-over list is not written again until the result was taken).
    """

    def __init__(self, policy: Policy):
        self.policy = policy
        self.spec = policy.spec
        self._backlog: deque = deque(maxlen=policy.spec.n_obs_steps - 1)
        self._handed: list = []
        if callable(getattr(policy, "act_guided", None)):
            self.act_guided = self._act_guided  # only then is it a GuidedPolicy to call_policy

    @classmethod
    def wrap(cls, policy: Policy) -> _HistoryFeed | None:
        """A feed for ``policy``, or None when it keeps no history (To = 1 or no ``observe``)."""
        if policy.spec.n_obs_steps > 1 and callable(getattr(policy, "observe", None)):
            return cls(policy)
        return None

    def note(self, observation) -> None:
        self._backlog.append(observation)

    def hand_over(self) -> None:
        self._handed = list(self._backlog)
        self._backlog.clear()

    def _catch_up(self) -> None:
        handed, self._handed = self._handed, []
        for observation in handed:
            self.policy.observe(observation)

    def reset(self, seed: int | None = None) -> None:
        self.policy.reset(seed)

    def act(self, observation):
        self._catch_up()
        return self.policy.act(observation)

    def _act_guided(self, observation, prefix_actions, weights):
        self._catch_up()
        return self.policy.act_guided(observation, prefix_actions, weights)


class _Loop:
    """One run: the schedule, the action queue, the counters and the per-tick records."""

    def __init__(self, robot, policy, config: LoopConfig, clock: Clock, recorder, on_tick, feed=None):
        spec = policy.spec
        if abs(spec.rate_hz - config.rate_hz) > 1e-6:
            log.warning(
                "policy was trained at %.3g Hz but the loop runs at %.3g Hz", spec.rate_hz, config.rate_hz
            )
        first = robot.observe()
        if "timestamp" not in first:
            raise UserError(
                f"{type(robot).__name__}.observe() returned no 'timestamp'; robots stamp each observation with "
                "its capture time on the loop's clock (seconds), which the loop needs to check its age."
            )
        self.robot, self.config, self.clock = robot, config, clock
        self.recorder, self.on_tick = recorder, on_tick
        self.feed: _HistoryFeed | None = feed
        self.dt = config.dt
        self.max_age = config.safety.max_obs_age_s
        self.sched = ChunkScheduler(config.scheduler, spec.horizon, spec.action_dim, self.dt)
        self.bounds = resolve_bounds(config.safety, getattr(robot, "action_bounds", None), spec.action_dim)
        self.safety = SafetyLog()
        self.records: list[TickRecord] = []
        self.t0 = 0.0
        self.step = 0  # the next control step to run
        self.misses = 0
        self.starved = 0
        self.inferences = 0
        self.errors = 0
        self.failed = False  # an inference failed and no good chunk has arrived since
        self.last_error: str | None = None
        self.last_latency_ms = 0.0
        self.latency_ms: list[float] = []
        self.warmup_ms: list[float] = []
        self.delays: list[int] = []
        self.interrupted = False
        self.wall_s = 0.0

    def run(self, worker) -> None:
        wall_start = time.perf_counter()
        self.t0 = self.clock.now()
        try:
            while self.step < self.config.max_ticks and self._tick(worker):
                pass
        except KeyboardInterrupt:  # stop as a safety hold would, keeping what was measured
            self.interrupted = True
            log.warning("interrupted at step %d: holding the robot and stopping", self.step)
            self.robot.hold()
        self.wall_s = time.perf_counter() - wall_start

    def _catch_up(self, now: float) -> int:
        """Move ``step`` to the period ``now`` falls in when that is later; return the steps passed over."""
        behind = math.floor((now - self.t0) / self.dt + 1e-9) - self.step
        if behind <= 0:
            return 0
        self.step += behind
        return behind

    def _tick(self, worker) -> bool:
        """Run one tick; False ends the loop."""
        clock, sched = self.clock, self.sched
        clock.sleep_until(self.t0 + self.step * self.dt)
        start = clock.now()
        missed = self._catch_up(start)  # woke a whole period late: those steps' actions are past
        if self.step >= self.config.max_ticks:
            self.misses += missed
            return False

        obs = self.robot.observe()
        result = worker.poll()
        arrived = result is not None
        if arrived:
            self._take(result)
        obs_reason = check_observation(obs, clock.now(), self.max_age)
        if obs_reason is None and not worker.busy and sched.wants_request(self.step):
            ticket = sched.request(self.step)
            if ticket.guidance is not None:
                self.delays.append(ticket.delay)
            if self.feed is not None:
                self.feed.hand_over()
            worker.submit(obs, ticket)
            if sched.blocking:  # sync: wait; the periods the wait covers are missed
                result = worker.wait()
                arrived = True
                waited = self._catch_up(clock.now())
                if waited:
                    missed += waited
                    if self.step >= self.config.max_ticks:
                        self.misses += missed
                        return False
                    start = clock.now()
                    obs = self.robot.observe()  # the robot stood still meanwhile; record it as it is now
                    obs_reason = check_observation(obs, clock.now(), self.max_age)
                self._take(result)
        elif obs_reason is None and self.feed is not None:
            self.feed.note(obs)  # the policy's history gets this step with the next request
        obs_age_ms = _age_ms(obs, clock.now())

        action = sched.action_for(self.step)
        queue_depth = sched.depth(self.step)
        reason = obs_reason or ("inference_error" if self.failed else None)
        if reason is None:
            reason = "no_action" if action is None else check_action(action, self.bounds)
            self.starved += reason == "no_action" and sched.warm
        if reason is None:
            self.robot.command(action)
            sched.mark_executed()
            sent = action
        else:
            sent = np.asarray(self.robot.hold(), np.float32)
        self.safety.tick(reason, self.step, self.last_error if reason == "inference_error" else None)
        end = clock.now()
        deadline = self.t0 + self.step * self.dt
        missed += end > deadline + self.dt  # the command went out after this tick's period ended
        self.misses += missed

        record = TickRecord(
            step=self.step,
            time_s=start - self.t0,
            jitter_ms=(start - deadline) * 1e3,
            tick_ms=(end - start) * 1e3,
            obs_age_ms=obs_age_ms,
            inference_ms=self.last_latency_ms,
            chunk_arrived=arrived,
            queue_depth=queue_depth,
            deadline_miss=missed,
            safety=REASON_CODE[reason or "ok"],
        )
        self.records.append(record)
        if self.recorder is not None:
            frame = {k: obs[k] for k in self.recorder.obs_keys if k in obs}
            frame.update(record.columns(), action=sent, timestamp=self.step * self.dt)
            self.recorder.add(frame, obs.get("task") or None)
        self.step += 1
        return not (self.on_tick is not None and self.on_tick(record))

    def _take(self, result: InferenceResult) -> None:
        """A finished inference: merge its chunk at the current step, or enter the failed state."""
        self.inferences += 1
        self.last_latency_ms = result.latency_s * 1e3
        if result.chunk is None:
            self.errors += 1
            self.failed = True
            self.last_error = result.error
            self.sched.clear()  # the old plan is not continued past a failure: hold until a good chunk
            return
        # Only successful calls time the policy (a failure can return at once).
        self.sched.latencies.add(result.latency_s)
        warmup = self.sched.latencies.seen <= self.config.scheduler.warmup_inferences
        (self.warmup_ms if warmup else self.latency_ms).append(result.latency_s * 1e3)
        self.failed = False
        self.sched.merge(result.chunk.actions, result.ticket, self.step)

    def report(self, realtime: bool) -> LoopReport:
        records, recorder = self.records, self.recorder
        warm = next((i for i, r in enumerate(records) if r.queue_depth > 0), len(records))
        return LoopReport(
            strategy=self.sched.strategy,
            mode="virtual" if isinstance(self.clock, VirtualClock) else "real",
            realtime=realtime,
            rate_hz=self.config.rate_hz,
            execute_steps=self.sched.execute_steps,
            horizon=self.sched.horizon,
            steps=min(self.step, self.config.max_ticks),
            ticks=len(records),
            commanded=sum(r.safety == 0 for r in records),
            held=sum(r.safety != 0 for r in records),
            deadline_misses=self.misses,
            starved_ticks=self.starved,
            safety_events=self.safety.events,
            inferences=self.inferences,
            inference_errors=self.errors,
            last_inference_error=self.last_error,
            jitter_ms=Percentiles.of(r.jitter_ms for r in records),
            tick_ms=Percentiles.of(r.tick_ms for r in records),
            obs_age_ms=Percentiles.of(r.obs_age_ms for r in records if r.obs_age_ms >= 0),
            inference_ms=Percentiles.of(self.latency_ms),
            warmup_inference_ms=self.warmup_ms,
            queue_depth=Percentiles.of(r.queue_depth for r in records[warm:]),
            rtc_delays=self.delays,
            wall_s=self.wall_s,
            interrupted=self.interrupted,
            frames_recorded=recorder.recorded if recorder is not None else 0,
            frames_dropped=recorder.dropped if recorder is not None else 0,
            frames_refused=recorder.refused if recorder is not None else 0,
            records=records,
        )


def _age_ms(obs: dict, now: float) -> float:
    """Milliseconds since the observation's capture; -1 without a usable timestamp."""
    try:
        age = (now - float(obs.get("timestamp"))) * 1e3
    except (TypeError, ValueError):
        return -1.0
    return age if math.isfinite(age) else -1.0


def loop_for_policy(loop: LoopConfig, horizon: int) -> LoopConfig:
    """``loop`` for a policy whose chunks hold ``horizon`` actions: a one-action policy (the scripted
    expert) runs ``sync``, with a note, since no asynchronous strategy can run ahead of it."""
    if horizon == 1 and loop.scheduler.strategy != "sync":
        print(
            f"note: the policy returns one action per call, so {loop.scheduler.strategy} cannot run ahead of it; "
            "running sync",
            flush=True,
        )
        return replace(loop, scheduler=replace(loop.scheduler, strategy="sync", execute_steps=None))
    return loop


def realtime_or_normal(loop: LoopConfig) -> LoopConfig:
    """``loop`` without ``realtime_priority`` where this process may not use SCHED_FIFO, with one note
    (the loop would otherwise warn at every subtask)."""
    if loop.realtime_priority is None or loop.mode != "real":
        return loop
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(loop.realtime_priority))
        os.sched_setscheduler(0, *before)
        return loop
    except (AttributeError, OSError) as exc:
        print(
            f"note: no real-time scheduling here ({exc}); the loop runs at normal priority and other "
            "processes may delay its ticks (grant CAP_SYS_NICE or an rtprio limit, or set loop.realtime_priority=null)",
            flush=True,
        )
        return replace(loop, realtime_priority=None)
