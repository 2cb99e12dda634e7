"""Latency accounting for the control loop: per-tick records, their summary, and their recording.

Every tick yields a :class:`TickRecord` (observation age, the newest inference latency,
queue depth, missed deadlines, wake-up jitter, tick work time, safety code). At the end
:class:`LoopReport` summarises them as percentiles; ``report.summary()`` is plain JSON.

:class:`EpisodeRecorder` streams each tick (the observation's arrays, the action sent and
the ``loop.*`` columns) into a zarr episode store through
:class:`~dreamrt.episodes.writer.EpisodeWriter`, on its own thread behind a bounded queue:
the loop only enqueues (no disk, no compression on the tick's time), and a full queue drops
the frame and counts it rather than stalling the tick. Recorded columns, one row per
executed tick, at the loop rate:

| key | dtype | meaning |
|---|---|---|
| ``observation.*`` | as observed | the observation the tick used |
| ``action`` | float32 | what was sent: the command, or ``Robot.hold()``'s action on held ticks |
| ``timestamp`` | float64 | the tick's scheduled time ``step * dt`` (s since the loop started) |
| ``loop.step`` | int64 | absolute control step (gaps are skipped ticks) |
| ``loop.obs_age_ms`` | float32 | age of the observation when checked (-1: no usable timestamp) |
| ``loop.inference_ms`` | float32 | latency of the newest finished inference (0 before the first) |
| ``loop.chunk_arrived`` | bool | an inference result arrived this tick |
| ``loop.queue_depth`` | int32 | actions queued from this step on |
| ``loop.deadline_miss`` | int32 | control periods missed at this tick (skipped ticks + this one if late) |
| ``loop.jitter_ms`` | float32 | tick start minus its deadline |
| ``loop.tick_ms`` | float32 | the tick's own work, observe to command |
| ``loop.safety`` | int8 | 0 = commanded, else the hold reason's code (:data:`dreamrt.runtime.safety.REASONS`) |
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dreamrt.errors import UserError

log = logging.getLogger(__name__)

LOOP_FEATURES: dict[str, dict[str, Any]] = {
    "loop.step": {"dtype": "int64", "shape": []},
    "loop.obs_age_ms": {"dtype": "float32", "shape": []},
    "loop.inference_ms": {"dtype": "float32", "shape": []},
    "loop.chunk_arrived": {"dtype": "bool", "shape": []},
    "loop.queue_depth": {"dtype": "int32", "shape": []},
    "loop.deadline_miss": {"dtype": "int32", "shape": []},
    "loop.jitter_ms": {"dtype": "float32", "shape": []},
    "loop.tick_ms": {"dtype": "float32", "shape": []},
    "loop.safety": {"dtype": "int8", "shape": []},
}


@dataclass
class TickRecord:
    step: int
    time_s: float  # tick start, seconds since the loop started
    jitter_ms: float
    tick_ms: float
    obs_age_ms: float  # -1 when the observation had no usable timestamp
    inference_ms: float  # newest finished inference's latency (0 before the first)
    chunk_arrived: bool
    queue_depth: int
    deadline_miss: int
    safety: int  # 0 commanded; else safety.REASONS index

    def columns(self) -> dict[str, np.ndarray]:
        """The ``loop.*`` columns of the recording."""
        return {
            "loop.step": np.int64(self.step),
            "loop.obs_age_ms": np.float32(self.obs_age_ms),
            "loop.inference_ms": np.float32(self.inference_ms),
            "loop.chunk_arrived": np.bool_(self.chunk_arrived),
            "loop.queue_depth": np.int32(self.queue_depth),
            "loop.deadline_miss": np.int32(self.deadline_miss),
            "loop.jitter_ms": np.float32(self.jitter_ms),
            "loop.tick_ms": np.float32(self.tick_ms),
            "loop.safety": np.int8(self.safety),
        }


@dataclass(frozen=True)
class Percentiles:
    count: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values) -> Percentiles:
        """Summary of ``values`` (NaN everywhere when empty)."""
        x = np.asarray(list(values), np.float64)
        if x.size == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan)
        p50, p90, p95, p99 = np.percentile(x, [50, 90, 95, 99])
        return cls(
            int(x.size), float(x.mean()), float(p50), float(p90), float(p95), float(p99), float(x.max())
        )

    def to_dict(self) -> dict[str, float | int | None]:
        # JSON has no NaN: empty summaries become nulls.
        return {
            k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()
        }


@dataclass
class LoopReport:
    """What a run of :func:`dreamrt.runtime.loop.run_loop` measured."""

    strategy: str
    mode: str  # "real" or "virtual"
    realtime: bool  # the loop thread ran under SCHED_FIFO
    rate_hz: float
    execute_steps: int  # s
    horizon: int  # the policy's chunk length H
    steps: int  # control steps the schedule covered (executed ticks + skipped ones)
    ticks: int  # ticks executed
    commanded: int  # ticks that sent an action
    held: int  # ticks that called Robot.hold()
    deadline_misses: int
    starved_ticks: int  # ticks with nothing queued after the first chunk (no safety reason)
    safety_events: dict[str, int]  # held ticks per safety reason
    inferences: int  # results received (chunks and errors)
    inference_errors: int
    last_inference_error: str | None  # "ExceptionType: message" of the newest failed inference
    jitter_ms: Percentiles
    tick_ms: Percentiles
    obs_age_ms: Percentiles
    inference_ms: Percentiles  # warm-up inferences excluded
    warmup_inference_ms: list[float]
    queue_depth: Percentiles  # over ticks after the first chunk
    rtc_delays: list[int]  # d of each rtc request
    wall_s: float  # wall-clock seconds the loop ran
    interrupted: bool = False  # stopped by Ctrl-C
    frames_recorded: int = 0
    frames_dropped: int = 0
    frames_refused: int = 0
    records: list[TickRecord] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "records":
                continue
            attr = getattr(self, key)
            out[key] = attr.to_dict() if isinstance(attr, Percentiles) else value
        return out


# ---------------------------------------------------------------------------- recording


def recording_features(observation: Mapping[str, Any], action_dim: int) -> dict[str, dict[str, Any]]:
    """Episode-store features for recording a loop: the observation's ``observation.*`` arrays, ``action``
    and the ``loop.*`` columns. Pass ``robot.observe()`` from before the loop."""
    features: dict[str, dict[str, Any]] = {}
    for key, value in observation.items():
        if key.startswith("observation."):
            arr = np.asarray(value)
            features[key] = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
    features["action"] = {"dtype": "float32", "shape": [action_dim]}
    features.update(LOOP_FEATURES)
    return features


class EpisodeRecorder:
    """Writes frames to an :class:`~dreamrt.episodes.writer.EpisodeWriter` on a background thread.

    ``add`` never blocks: it returns False and counts a drop when ``queue_size`` frames are
    waiting. ``end_episode`` waits for the queue to drain and commits the episode. The
    writer must not be used by anyone else while the recorder runs; the caller closes it.
    Use as a context manager (starts and stops the thread).
    """

    def __init__(self, writer, queue_size: int = 512, default_task: str = "unspecified"):
        if queue_size < 1:
            raise UserError(f"EpisodeRecorder queue_size={queue_size}; expected a positive number of frames.")
        self.writer = writer
        self.default_task = default_task
        self.obs_keys = [
            k for k in writer.features if k.startswith("observation.")
        ]  # what add() takes from obs
        self.recorded = 0
        self.dropped = 0
        self.refused = 0
        self.first_error: str | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._committed: list[int] = []

    def __enter__(self) -> EpisodeRecorder:
        self._thread = threading.Thread(target=self._serve, name="dreamrt-recorder", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        assert self._thread is not None
        self._thread.join()

    def add(self, frame: dict[str, Any], task: str | None) -> bool:
        """Queue one frame (keys as :func:`recording_features`, plus ``timestamp``); False if dropped."""
        try:
            self._queue.put_nowait(("frame", frame, task or self.default_task))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def end_episode(self) -> int | None:
        """Wait for every queued frame, then commit the episode; its index (None if it had no frames)."""
        done = threading.Event()
        self._queue.put(("end", done, None))
        done.wait()
        return self._committed[-1] if self._committed else None

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload, task = item
            if kind == "end":
                try:
                    if self.writer.episode_frames:
                        self._committed.append(self.writer.end_episode())
                except Exception as exc:  # never leave end_episode() waiting
                    self.first_error = self.first_error or f"end_episode failed: {exc}"
                    log.error("recorder: could not commit the episode: %s", exc)
                finally:
                    payload.set()
                continue
            try:
                self.writer.add_frame(payload, task)
                self.recorded += 1
            except UserError as exc:  # e.g. a non-finite observation: the writer refuses the frame
                self.refused += 1
                if self.first_error is None:
                    self.first_error = str(exc)
                    log.warning("recorder: frame refused: %s", exc)
