"""The action queue keyed by absolute control step, and the chunk scheduling strategies.

A policy returns a chunk of H actions for the step of the observation it saw (index 0 is
meant for that step). Inference takes time, so a chunk requested at step r arrives at a
later step a; this module decides which action each step executes.

Steps are absolute: step k is due at ``t0 + k * dt`` on the loop's schedule, whether or not
the robot moved. A chunk is placed by the actions actually CONSUMED while it was computed,
not by the time that passed: if the robot executed c actions between the request and the
arrival, the chunk's effective start is ``e = a - c``, so its first c actions (the robot
already did something for those steps) are skipped and index c runs at step a. When the
queue ran dry (the first chunk of an episode, a sync wait, a hold), c is smaller than a - r
and nothing is skipped that the robot did not do: trusting a latency estimate here instead
makes the robot jump deep into a plan from standstill (LeRobot PR #4223).

Strategies (``SchedulerConfig.strategy``), all requesting a new chunk when the step has no
action or ``s = execute_steps`` steps have run since the newest chunk's effective start:

- ``sync``: the loop blocks on the worker whenever it requests (the baseline: ticks are
  missed while the policy thinks; the chunk then starts at its first action).
- ``naive_async``: the newest chunk replaces the schedule from its arrival on.
- ``temporal_ensemble``: ACT's ensembling. Every chunk adds a prediction for each of its
  steps; a step executes the average of its predictions weighted ``exp(-m * i)``, i = 0 for
  the oldest (ACT's choice: old predictions dominate, new ones blend in). ``s`` = 1.
- ``rtc``: real-time chunking (Black et al., 2025). With the delay d (control steps, from
  the measured latency percentile), the new chunk's first d actions are frozen to the
  previous schedule's values (those steps are executed before it arrives). A policy that
  implements :class:`GuidedPolicy` also gets the previous schedule as ``prefix_actions`` and
  the soft mask W (:func:`soft_mask`) to inpaint the new chunk towards it while sampling
  (:mod:`dreamrt.policies.guidance`); others are merged with the hard freeze alone.

The delay d used for a request is ``ceil(latency / dt)`` at the configured percentile of the
recent latencies (warm-up inferences excluded: a first call compiling kernels would inflate
it for good), clamped to the actions actually queued from the request step (only those can
be consumed before the chunk arrives, and only those exist to freeze to).

Dimensions: H chunk length (horizon), A action dim, s execute steps, d delay steps.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.policies.protocol import ActionChunk, Observation, PolicySpec

STRATEGIES = ("sync", "naive_async", "temporal_ensemble", "rtc")


@dataclass
class SchedulerConfig:
    """How chunks become per-step actions; see the module docstring."""

    strategy: str = "rtc"  # one of STRATEGIES
    # s: steps of a chunk executed before the next request. None: the chunk length for sync,
    # 1 for temporal_ensemble, half the chunk length (at least 1) for naive_async and rtc.
    execute_steps: int | None = None
    ensemble_decay: float = 0.01  # temporal_ensemble: m in exp(-m * i) (ACT uses 0.01)
    delay_percentile: float = 95.0  # rtc: latency percentile the delay d is computed from
    warmup_inferences: int = 1  # first inferences left out of the latency statistics and d
    latency_window: int = 64  # recent latencies the percentile is taken over

    def __post_init__(self) -> None:
        choose("chunk scheduling strategy", self.strategy, STRATEGIES)
        if self.execute_steps is not None and (
            isinstance(self.execute_steps, bool)
            or not isinstance(self.execute_steps, int)
            or self.execute_steps < 1
        ):
            raise UserError(
                f"SchedulerConfig.execute_steps={self.execute_steps!r}; expected a positive int (actions of a "
                "chunk run before the next request) or None for the strategy's default."
            )
        if not (math.isfinite(self.ensemble_decay) and self.ensemble_decay >= 0):
            raise UserError(
                f"SchedulerConfig.ensemble_decay={self.ensemble_decay!r}; expected a finite number >= 0 (ACT: 0.01)."
            )
        if not 0.0 < self.delay_percentile <= 100.0:
            raise UserError(
                f"SchedulerConfig.delay_percentile={self.delay_percentile!r}; expected a percentile in (0, 100], "
                "e.g. 90 or 95."
            )
        if self.warmup_inferences < 0:
            raise UserError(
                f"SchedulerConfig.warmup_inferences={self.warmup_inferences}; expected an int >= 0."
            )
        if self.latency_window < 1:
            raise UserError(f"SchedulerConfig.latency_window={self.latency_window}; expected an int >= 1.")


def default_execute_steps(strategy: str, horizon: int) -> int:
    match strategy:
        case "sync":
            return horizon
        case "temporal_ensemble":
            return 1
        case "naive_async" | "rtc":
            return max(1, horizon // 2)
        case _:
            raise AssertionError(strategy)


def soft_mask(horizon: int, delay: int, execute_steps: int) -> np.ndarray:
    """RTC's guidance weights W (H,): 1 for i < d, decaying exponentially to 0 at i = H - s, 0 after.

    Between d and H - s: ``W_i = c (e^c - 1) / (e - 1)`` with ``c = (H - s - i) / (H - s - d + 1)``.
    """
    if not (0 <= delay <= horizon and 1 <= execute_steps <= horizon):
        raise UserError(
            f"soft_mask needs 0 <= delay <= horizon and 1 <= execute_steps <= horizon, got horizon={horizon}, "
            f"delay={delay}, execute_steps={execute_steps}."
        )
    i = np.arange(horizon, dtype=np.float64)
    end = horizon - execute_steps
    w = np.zeros(horizon)
    w[i < delay] = 1.0
    mid = (i >= delay) & (i < end)
    c = (end - i[mid]) / (end - delay + 1)
    w[mid] = c * np.expm1(c) / (math.e - 1.0)
    return w.astype(np.float32)


def delay_steps(latency_s: float, dt: float) -> int:
    """Control steps a result ``latency_s`` late is behind: ceil(latency / dt) (float-safe)."""
    return max(0, math.ceil(latency_s / dt - 1e-6))


class LatencyTracker:
    """Recent inference latencies without the warm-up ones; percentiles of them."""

    def __init__(self, warmup: int, window: int):
        self.warmup = warmup
        self.seen = 0
        self.recent: deque[float] = deque(maxlen=window)

    def add(self, latency_s: float) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.recent.append(float(latency_s))

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (seconds) of the recent post-warm-up latencies; None before any."""
        if not self.recent:
            return None
        return float(np.percentile(np.fromiter(self.recent, float), q))


@dataclass(frozen=True)
class Guidance:
    """What an RTC request passes to a :class:`GuidedPolicy` (indices are the new chunk's)."""

    prefix_actions: np.ndarray  # (H, A) the previous schedule's action for each step of the new chunk
    weights: np.ndarray  # (H,) soft mask W, 0 where the previous schedule has no action
    delay: int  # d: steps frozen to the previous schedule
    execute_steps: int  # s


@runtime_checkable
class GuidedPolicy(Protocol):
    """A policy that can inpaint its chunk towards a prefix (RTC's guided sampling).

    ``prefix_actions`` (H, A) are in the policy's output units and index the chunk ``act``
    would return; ``weights`` (H,) in [0, 1] say how strongly each index should match
    (the soft mask W; 0 = free). A diffusion or consistency policy normalises the prefix as
    its actions and calls :func:`dreamrt.policies.guidance.guided_sample` instead of its
    sampler's ``sample``; it embeds the weights into its full prediction horizon itself
    (e.g. zeros for the To - 1 steps before the executed part).
    """

    spec: PolicySpec

    def reset(self, seed: int | None = None) -> None: ...

    def act(self, observation: Observation) -> ActionChunk: ...

    def act_guided(
        self, observation: Observation, prefix_actions: np.ndarray, weights: np.ndarray
    ) -> ActionChunk: ...


@dataclass(frozen=True)
class Ticket:
    """The scheduler's record of one request, handed back with the result to :meth:`ChunkScheduler.merge`."""

    step: int  # r: the step of the observation the chunk is computed from
    executed: int  # the scheduler's executed-action count at the request
    delay: int  # d planned for this request (rtc; 0 otherwise)
    guidance: Guidance | None


@dataclass(frozen=True)
class Merge:
    """What merging one chunk did."""

    start: int  # e: effective start step (index 0 of the chunk)
    consumed: int  # c: actions executed between request and arrival (= first skipped indices)
    placed: int  # actions that now have a place in the schedule
    frozen: int  # steps at or after the arrival kept from the previous schedule (rtc)


class ChunkScheduler:
    """The action queue (step -> predictions) and one strategy's rules for filling and reading it."""

    def __init__(self, config: SchedulerConfig, horizon: int, action_dim: int, dt: float):
        self.config = config
        self.strategy = config.strategy
        self.horizon = horizon
        self.action_dim = action_dim
        self.dt = dt
        s = config.execute_steps or default_execute_steps(config.strategy, horizon)
        if s > horizon:
            raise UserError(
                f"execute_steps={s} is more than the policy's chunk length {horizon}; a chunk cannot run more "
                f"actions than it has. Set loop.scheduler.execute_steps <= {horizon}."
            )
        self.execute_steps = s
        self.latencies = LatencyTracker(config.warmup_inferences, config.latency_window)
        self.executed = 0  # actions executed so far (the loop calls mark_executed)
        self.anchor: int | None = None  # effective start step of the newest merged chunk
        self.chunks_merged = 0
        self._pred: dict[int, list[np.ndarray]] = {}  # step -> predictions, oldest first

    # ------------------------------------------------------------------ reading

    @property
    def blocking(self) -> bool:
        """Whether the loop waits for each result (the sync baseline)."""
        return self.strategy == "sync"

    @property
    def warm(self) -> bool:
        """Whether a chunk has been merged since the start (or the last clear)."""
        return self.anchor is not None

    def has_action(self, step: int) -> bool:
        return step in self._pred

    def depth(self, step: int) -> int:
        """Consecutive steps from ``step`` on that have an action (the queue depth)."""
        n = 0
        while step + n in self._pred:
            n += 1
        return n

    def action_for(self, step: int) -> np.ndarray | None:
        """The action step ``step`` executes (None: nothing scheduled); forgets earlier steps."""
        for old in [k for k in self._pred if k < step]:
            del self._pred[old]
        preds = self._pred.get(step)
        return None if preds is None else self._blend(preds).copy()

    def _blend(self, preds: list[np.ndarray]) -> np.ndarray:
        if len(preds) == 1:
            return preds[0]
        w = np.exp(-self.config.ensemble_decay * np.arange(len(preds)))  # oldest first, largest weight
        return (np.tensordot(w, np.stack(preds), axes=1) / w.sum()).astype(np.float32)  # (A,)

    # ------------------------------------------------------------------ requests

    def wants_request(self, step: int) -> bool:
        """Whether a new chunk should be requested at ``step`` (the caller checks the worker is free)."""
        if not self.has_action(step):
            return True
        return self.anchor is not None and step >= self.anchor + self.execute_steps

    def delay_estimate(self) -> int:
        """d from the latency percentile; ``execute_steps`` until post-warm-up latencies exist."""
        latency = self.latencies.percentile(self.config.delay_percentile)
        return self.execute_steps if latency is None else delay_steps(latency, self.dt)

    def request(self, step: int) -> Ticket:
        """Record a request made at ``step``; for rtc, compute d and the guidance."""
        if self.strategy != "rtc":
            return Ticket(step, self.executed, 0, None)
        queued = self.depth(step)
        d = min(self.delay_estimate(), queued, self.horizon)
        guidance = None
        if queued:
            prefix = np.zeros((self.horizon, self.action_dim), np.float32)
            available = np.zeros(self.horizon, np.float32)
            last = None
            for i in range(self.horizon):
                if step + i in self._pred:
                    last = self._blend(self._pred[step + i])
                    available[i] = 1.0
                prefix[i] = last  # padded with the last queued action where the schedule ends
            weights = soft_mask(self.horizon, d, self.execute_steps) * available
            guidance = Guidance(prefix, weights, d, self.execute_steps)
        return Ticket(step, self.executed, d, guidance)

    # ------------------------------------------------------------------ writing

    def merge(self, actions: np.ndarray, ticket: Ticket, arrival_step: int) -> Merge:
        """Put a chunk (n, A) computed for ``ticket`` into the schedule at ``arrival_step``."""
        actions = np.asarray(actions, np.float32)
        assert actions.ndim == 2 and actions.shape[1] == self.action_dim, actions.shape
        n = len(actions)
        consumed = self.executed - ticket.executed
        start = arrival_step - consumed
        placed = frozen = 0
        if self.strategy == "temporal_ensemble":
            for i in range(consumed, n):
                self._pred.setdefault(start + i, []).append(actions[i])
                placed += 1
        elif consumed < n:
            keep = ticket.delay if self.strategy == "rtc" else 0
            for step in [k for k in self._pred if k >= start + n]:
                del self._pred[step]  # the newest chunk supersedes what an older one planned beyond it
            for i in range(consumed, n):
                if i < keep and start + i in self._pred:
                    frozen += 1  # RTC: executed before the chunk could be, by the estimate: keep it
                else:
                    self._pred[start + i] = [actions[i]]
                placed += 1
        self.anchor = start
        self.chunks_merged += 1
        return Merge(start, consumed, placed, frozen)

    def mark_executed(self) -> None:
        """The loop executed this step's action (holds do not count: the robot did not move on)."""
        self.executed += 1

    def clear(self) -> None:
        """Forget every planned action (after an inference error the old plan is not trusted)."""
        self._pred.clear()
        self.anchor = None

    def summary(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "horizon": self.horizon,
            "execute_steps": self.execute_steps,
            "chunks_merged": self.chunks_merged,
        }
