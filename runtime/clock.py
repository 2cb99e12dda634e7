"""Clocks for the control loop: the real monotonic clock and a virtual one for fast, exact evaluations.

The loop only asks a clock for ``now()`` (seconds, monotonic) and to ``sleep_until(t)``; it
keeps its own schedule of absolute deadlines ``t0 + k * dt`` so that lateness never
accumulates (a loop that sleeps ``dt`` after each tick drifts by its own work every tick).

- :class:`RealClock` reads ``time.perf_counter`` (monotonic, sub-microsecond). ``sleep_until``
  sleeps coarsely with ``time.sleep`` (which releases the GIL, so the inference worker runs)
  up to ``spin_s`` before the deadline, then spins on the counter for the rest: ``time.sleep``
  alone oversleeps by the kernel's timer slack and scheduling delay, often 0.1-2 ms.
- :class:`VirtualClock` is simulated time: ``sleep_until`` jumps to the deadline at once and
  ``advance`` lets a component charge time (an inference latency, a slow tick). Nothing
  depends on the wall clock, so runs are deterministic and as fast as the computation.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

from dreamrt.errors import UserError, choose

CLOCK_MODES = ("real", "virtual")


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic time line (only differences mean anything)."""

    def sleep_until(self, deadline: float) -> None:
        """Return at ``deadline`` (at once if it has passed)."""


class RealClock:
    """The wall clock: ``perf_counter`` with coarse sleep then a spin of the last ``spin_s``."""

    virtual = False

    def __init__(self, spin_s: float = 0.001):
        if not 0.0 <= spin_s <= 0.05:
            raise UserError(f"RealClock spin_s={spin_s!r}; expected seconds in [0, 0.05] (about 0.001).")
        self.spin_s = spin_s

    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, deadline: float) -> None:
        coarse = deadline - self.spin_s - time.perf_counter()
        if coarse > 0:
            time.sleep(coarse)
        while time.perf_counter() < deadline:
            pass


class VirtualClock:
    """Simulated time starting at ``start``; thread-safe, never goes backwards."""

    virtual = True

    def __init__(self, start: float = 0.0):
        self._t = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def sleep_until(self, deadline: float) -> None:
        with self._lock:
            self._t = max(self._t, float(deadline))

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass (a component charging its cost)."""
        if seconds < 0:
            raise ValueError(f"VirtualClock.advance needs seconds >= 0, got {seconds}")
        with self._lock:
            self._t += float(seconds)


def make_clock(mode: str, spin_s: float = 0.001) -> RealClock | VirtualClock:
    """``"real"``: :class:`RealClock`; ``"virtual"``: a :class:`VirtualClock` at 0."""
    match choose("clock mode", mode, CLOCK_MODES):
        case "real":
            return RealClock(spin_s)
        case "virtual":
            return VirtualClock()
        case _:
            raise AssertionError(mode)
