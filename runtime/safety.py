"""Safety checks between the action queue and ``Robot.command``.

Each tick the loop asks, in order: is the observation usable (timestamped, finite, not
older than ``max_obs_age_s``)? did the inference worker just fail (or has it failed since
the last good chunk)? is there an action for this step? is it finite and inside the bounds?
The first failing check names the reason; the loop then calls ``Robot.hold()`` instead of
``command`` and keeps ticking, so it recovers on its own the first tick everything is good
again. A stale or broken observation is also never sent to the policy.

Reasons are logged when they start and end (not every tick) and counted per tick in the
loop report; each has a small integer code for the recorded ``loop.safety`` column.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from dreamrt.errors import UserError

log = logging.getLogger(__name__)

# Code (the index) recorded per tick in loop.safety; 0 = the action was sent.
REASONS = (
    "ok",
    "no_action",  # nothing scheduled for this step (before the first chunk, or the queue ran dry)
    "nonfinite_action",
    "action_out_of_bounds",
    "stale_observation",
    "bad_observation",  # no timestamp, or a non-finite value in a float observation
    "inference_error",
)
REASON_CODE = {name: i for i, name in enumerate(REASONS)}
SAFETY_EVENTS = REASONS[2:]  # the reasons that count as safety events (no_action is starvation)


@dataclass
class SafetyConfig:
    """Limits the loop enforces before commanding the robot."""

    max_obs_age_s: float = (
        0.1  # hold when the observation was captured longer ago than this (3 ticks at 30 Hz)
    )
    # Per-dimension action limits; None takes the robot's own (Robot.action_bounds) when it has them.
    action_low: list[float] | None = None
    action_high: list[float] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_obs_age_s) and self.max_obs_age_s > 0):
            raise UserError(
                f"SafetyConfig.max_obs_age_s={self.max_obs_age_s!r}; expected a positive number of seconds "
                "(e.g. 0.1: three ticks at 30 Hz)."
            )
        if (self.action_low is None) != (self.action_high is None):
            raise UserError(
                "SafetyConfig: set both action_low and action_high (per-dimension lists), or neither to use the "
                "robot's bounds."
            )
        if self.action_low is not None:
            low, high = np.asarray(self.action_low, float), np.asarray(self.action_high, float)
            if low.shape != high.shape or low.ndim != 1 or np.any(low > high):
                raise UserError(
                    f"SafetyConfig action bounds must be two lists of equal length with low <= high, got "
                    f"action_low={self.action_low}, action_high={self.action_high}."
                )


def resolve_bounds(
    config: SafetyConfig, robot_bounds: tuple[np.ndarray, np.ndarray] | None, action_dim: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The (low, high) the loop checks actions against: the config's, else the robot's, else none."""
    if config.action_low is not None:
        bounds = (np.asarray(config.action_low, np.float64), np.asarray(config.action_high, np.float64))
        source = "SafetyConfig.action_low/high"
    elif robot_bounds is not None:
        bounds = (np.asarray(robot_bounds[0], np.float64), np.asarray(robot_bounds[1], np.float64))
        source = "the robot's action_bounds"
    else:
        return None
    if bounds[0].shape != (action_dim,) or bounds[1].shape != (action_dim,):
        raise UserError(
            f"Action bounds from {source} have shapes {bounds[0].shape} and {bounds[1].shape}; the policy's actions "
            f"have {action_dim} dimensions. Give one low and one high value per action dimension."
        )
    return bounds


def check_observation(observation: dict[str, Any], now: float, max_age_s: float) -> str | None:
    """None when the observation is usable at ``now``; otherwise the reason."""
    stamp = observation.get("timestamp")
    if not isinstance(stamp, (int, float, np.floating, np.integer)) or not math.isfinite(float(stamp)):
        return "bad_observation"
    if now - float(stamp) > max_age_s:
        return "stale_observation"
    for value in observation.values():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
            return "bad_observation"
    return None


def check_action(action: np.ndarray, bounds: tuple[np.ndarray, np.ndarray] | None) -> str | None:
    """None when ``action`` may be sent; otherwise the reason."""
    if not np.isfinite(action).all():
        return "nonfinite_action"
    if bounds is not None and (np.any(action < bounds[0]) or np.any(action > bounds[1])):
        return "action_out_of_bounds"
    return None


class SafetyLog:
    """Counts held ticks per reason and logs when a reason starts and ends."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.current: str | None = None
        self.last_error: str | None = None

    def tick(self, reason: str | None, step: int, detail: str | None = None) -> None:
        if reason is not None:
            self.counts[reason] += 1
        if reason == self.current:
            return
        if reason in SAFETY_EVENTS:
            log.warning("step %d: holding position: %s%s", step, reason, f" ({detail})" if detail else "")
        elif reason is None and self.current in SAFETY_EVENTS:
            log.warning("step %d: recovered from %s, commanding again", step, self.current)
        self.current = reason

    @property
    def events(self) -> dict[str, int]:
        """Held ticks per safety reason (starvation excluded)."""
        return {r: self.counts[r] for r in SAFETY_EVENTS if self.counts[r]}
