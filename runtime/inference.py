"""Inference workers: run ``policy.act`` off the control loop's thread, one request at a time.

- :class:`ThreadWorker` (real time) calls the policy on its own thread. torch and
  onnxruntime release the GIL inside their kernels, so the loop thread keeps its deadlines
  while a chunk is computed; the loop never waits on it except in the ``sync`` strategy.
  Between kernels the worker runs Python and holds the GIL: the loop shortens the switch
  interval so it gets the GIL back quickly, and on a busy machine ``LoopConfig.realtime_priority``
  raises both threads (a worker preempted while holding the GIL would stall the loop).
  The observation dict goes to the worker as it is: robots return fresh arrays.
- :class:`VirtualWorker` (virtual time) calls the policy at once on the caller's thread and
  makes the result available ``latency`` seconds of simulated time later: a fixed latency
  (deterministic runs) or the measured compute time. The loop cannot tell the difference.

Both return :class:`InferenceResult` with the chunk or the error text (a policy that raises
never takes the loop down: the loop holds the robot and retries, see :mod:`dreamrt.runtime.loop`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass

from dreamrt.policies.protocol import ActionChunk, Observation, Policy
from dreamrt.runtime.chunking import Ticket
from dreamrt.runtime.clock import Clock, VirtualClock

log = logging.getLogger(__name__)


@dataclass
class InferenceResult:
    ticket: Ticket
    chunk: ActionChunk | None  # None when the call failed
    error: str | None  # "ExceptionType: message" when it failed
    latency_s: float  # request to result on the loop's clock (virtual: the latency charged)
    compute_s: float  # wall-clock seconds inside the policy call
    done_at: float  # loop-clock time the result became available


def set_fifo(priority: int, who: str) -> bool:
    """Put the calling thread under SCHED_FIFO ``priority``; warn and return False where refused."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (AttributeError, OSError) as exc:  # no such call on this OS, or not permitted
        log.warning(
            "could not run %s under SCHED_FIFO priority %d (%s); normal scheduling", who, priority, exc
        )
        return False
    return True


def call_policy(policy: Policy, observation: Observation, ticket: Ticket, action_dim: int) -> ActionChunk:
    """``act`` (or ``act_guided`` with the ticket's RTC guidance when the policy has it); check the chunk."""
    guided = getattr(policy, "act_guided", None)
    if ticket.guidance is not None and callable(guided):
        chunk = guided(observation, ticket.guidance.prefix_actions, ticket.guidance.weights)
    else:
        chunk = policy.act(observation)
    if not isinstance(chunk, ActionChunk):
        raise TypeError(f"policy returned {type(chunk).__name__}, expected an ActionChunk")
    if chunk.actions.shape[1] != action_dim:
        raise ValueError(
            f"policy returned actions of shape {chunk.actions.shape}, expected (n, {action_dim})"
        )
    return chunk


def _run(policy: Policy, observation: Observation, ticket: Ticket, action_dim: int):
    start = time.perf_counter()
    try:
        chunk, error = call_policy(policy, observation, ticket, action_dim), None
    except Exception as exc:  # the loop must survive any policy failure
        log.debug("inference failed at step %d:\n%s", ticket.step, traceback.format_exc())
        chunk, error = None, f"{type(exc).__name__}: {exc}"
    return chunk, error, time.perf_counter() - start


class ThreadWorker:
    """Runs the policy on a daemon thread; use as a context manager (starts and stops the thread).

    ``realtime_priority`` puts the thread under SCHED_FIFO (see ``LoopConfig.realtime_priority``).
    """

    def __init__(self, policy: Policy, clock: Clock, action_dim: int, realtime_priority: int | None = None):
        self.policy = policy
        self.clock = clock
        self.action_dim = action_dim
        self.realtime_priority = realtime_priority
        self._requests: queue.Queue = queue.Queue()  # one request in flight: submit() asserts it
        self._results: queue.Queue[InferenceResult] = queue.Queue()
        self._in_flight = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ThreadWorker:
        self._thread = threading.Thread(target=self._serve, name="dreamrt-inference", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._requests.put(None)
        assert self._thread is not None
        # A policy call in progress finishes first; a hung one is abandoned (daemon thread).
        self._thread.join(timeout=10.0)

    @property
    def busy(self) -> bool:
        return self._in_flight

    def submit(self, observation: Observation, ticket: Ticket) -> None:
        assert not self._in_flight, "one request at a time"
        self._in_flight = True
        self._requests.put_nowait((observation, ticket, self.clock.now()))

    def poll(self) -> InferenceResult | None:
        """The finished result, if any (never blocks)."""
        try:
            result = self._results.get_nowait()
        except queue.Empty:
            return None
        self._in_flight = False
        return result

    def wait(self) -> InferenceResult:
        """Block until the request in flight finishes (the sync strategy)."""
        assert self._in_flight, "nothing to wait for"
        result = self._results.get()
        self._in_flight = False
        return result

    def _serve(self) -> None:
        if self.realtime_priority is not None:
            set_fifo(self.realtime_priority, "the inference worker")
        while True:
            item = self._requests.get()
            if item is None:
                return
            observation, ticket, submitted = item
            chunk, error, compute = _run(self.policy, observation, ticket, self.action_dim)
            done = self.clock.now()
            self._results.put(InferenceResult(ticket, chunk, error, done - submitted, compute, done))


class VirtualWorker:
    """Computes at submission; the result appears ``latency_s`` (or the compute time) of virtual time later."""

    def __init__(self, policy: Policy, clock: VirtualClock, action_dim: int, latency_s: float | None):
        self.policy = policy
        self.clock = clock
        self.action_dim = action_dim
        self.latency_s = latency_s
        self._pending: InferenceResult | None = None

    def __enter__(self) -> VirtualWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pending = None

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def submit(self, observation: Observation, ticket: Ticket) -> None:
        assert self._pending is None, "one request at a time"
        submitted = self.clock.now()
        chunk, error, compute = _run(self.policy, observation, ticket, self.action_dim)
        latency = compute if self.latency_s is None else self.latency_s
        self._pending = InferenceResult(ticket, chunk, error, latency, compute, submitted + latency)

    def poll(self) -> InferenceResult | None:
        # The tolerance absorbs float rounding of t0 + k * dt against submitted + latency.
        if self._pending is None or self.clock.now() < self._pending.done_at - 1e-9:
            return None
        result, self._pending = self._pending, None
        return result

    def wait(self) -> InferenceResult:
        assert self._pending is not None, "nothing to wait for"
        self.clock.sleep_until(self._pending.done_at)
        result, self._pending = self._pending, None
        return result


def make_worker(
    policy: Policy,
    clock: Clock,
    action_dim: int,
    virtual_latency_s: float | None,
    realtime_priority: int | None = None,
) -> ThreadWorker | VirtualWorker:
    """The worker matching the clock: virtual time gets a :class:`VirtualWorker`, anything else a thread."""
    if isinstance(clock, VirtualClock):
        return VirtualWorker(policy, clock, action_dim, virtual_latency_s)
    return ThreadWorker(policy, clock, action_dim, realtime_priority)
