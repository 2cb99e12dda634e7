"""Append episodes to a zarr store, safely against crashes and with bounded memory.

Usage::

    with create_store("demo.zarr", {"observation.state": {"dtype": "float32", "shape": [7]},
                                    "action": {"dtype": "float32", "shape": [7]}}, fps=30) as w:
        for t in range(T):
            w.add_frame({"observation.state": s[t], "action": a[t]}, task="push the block")
        w.end_episode()

How it stays safe:
- Frames are validated whole before anything is buffered, so a refused frame leaves no trace.
- Rows of the episode in progress are buffered up to ``flush_frames`` and then written to
  ``data/`` past the committed end (flushes end on multiples of ``flush_frames``, so they
  write whole chunks); ``meta/partial.json`` records how many rows are fully on disk.
- ``end_episode`` flushes the rest, appends to ``meta/episode_ends`` and then replaces the
  commit record atomically (temporary file, fsync, rename). That rename is the commit.
- zarr 3.1's LocalStore writes every chunk to a temporary file and renames it into place, so
  a chunk file is always an old or a new version, never torn. A chunk shared by the last
  committed episode and the new one is rewritten with the committed rows unchanged. Hence a
  process killed at any point leaves every committed row as it was.
- On opening, a writer takes an fcntl lock, then repairs: removes temporary files, truncates
  rows and ``episode_ends`` entries past the commit (or, with ``keep_partial=True``, commits
  the fully flushed rows of an interrupted episode), rebuilds ``episode_ends`` from
  ``data/episode_index`` if it disagrees with the commit, and rewrites stale derived files.

Durability against power loss needs more than this: pass ``durable=True`` to ``os.sync()``
before each commit (slow); otherwise the guarantee covers process crashes.

Casting rules for frame values: float features accept float and integer input (float64 ->
float32 included; a value that overflows to inf is refused); integer features accept integer
input whose values fit the declared type (so uint8 images refuse floats); bool features
accept only bools. Anything else, and any NaN or inf, is refused with a UserError naming the
key.
"""

from __future__ import annotations

import fcntl
import numbers
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from dreamrt.episodes import stats as st
from dreamrt.episodes.format import (
    AUTO_FEATURES,
    COMMIT_FILE,
    FORMAT,
    FORMAT_VERSION,
    INFO_FILE,
    LOCK_FILE,
    PARTIAL_FILE,
    STATS_FILE,
    ZARR_TEMP_RE,
    Feature,
    all_features,
    check_commit,
    check_is_store,
    empty_commit,
    ends_from_episode_index,
    ends_valid,
    features_from_info,
    is_visual,
    parse_feature,
    read_json,
    write_json_atomic,
)
from dreamrt.errors import UserError, did_you_mean


def create_store(
    path: str | os.PathLike,
    features: Mapping[str, Feature | Mapping[str, Any]],
    fps: float,
    *,
    robot_type: str = "unknown",
    overwrite: bool = False,
    chunk_frames: int = 16,
    lowdim_chunk_frames: int = 1024,
    flush_frames: int = 64,
    durable: bool = False,
) -> EpisodeWriter:
    """Create an empty store and return its writer.

    ``features`` maps keys (``action``, ``observation.*``) to ``Feature`` or
    ``{"dtype", "shape", "names"}``. Images and depth maps are chunked ``chunk_frames`` frames
    at a time, other features ``lowdim_chunk_frames``. ``overwrite`` replaces an existing
    dreamrt store (or an empty directory) at ``path``; anything else there is refused.
    """
    path = Path(path)
    if not (isinstance(fps, numbers.Real) and fps > 0 and np.isfinite(fps)):
        raise UserError(f"fps must be a positive number, got {fps!r}.")
    if chunk_frames < 1 or lowdim_chunk_frames < 1:
        raise UserError(
            f"chunk_frames and lowdim_chunk_frames must be >= 1, got {chunk_frames}, {lowdim_chunk_frames}."
        )
    if flush_frames < 1 or flush_frames % chunk_frames:
        raise UserError(
            f"flush_frames={flush_frames} must be a positive multiple of chunk_frames={chunk_frames} so that "
            f"flushes write whole chunks."
        )
    if not features:
        raise UserError("No features declared. Declare at least 'action' or one 'observation.*' key.")
    user = {key: parse_feature(key, spec) for key, spec in features.items()}
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise UserError(
                f"'{path}' already exists. Open it with open_writer() to append, or pass overwrite=True "
                f"to replace it."
            )
        # A dreamrt store, possibly half-created (the lock file is made first).
        if (
            not ((path / "zarr.json").is_file() and (path / "meta").is_dir())
            and not (path / LOCK_FILE).exists()
        ):
            raise UserError(
                f"Refusing to overwrite '{path}': it is not a dreamrt episode store. Choose another path."
            )
        _release_lock(_acquire_lock(path))  # refuse to delete a store another writer is using
        shutil.rmtree(path)

    (path / "meta").mkdir(parents=True, exist_ok=True)
    lock_fd = _acquire_lock(path)
    try:
        # create_group, not open_group(mode="w"): "w" would empty the directory, lock file included.
        root = zarr.create_group(
            path, attributes={"dreamrt": {"format": FORMAT, "format_version": FORMAT_VERSION}}
        )
        data = root.create_group("data")
        meta = root.create_group("meta")
        for key, feature in all_features(user).items():
            visual = is_visual(key, feature)
            t_chunk = chunk_frames if visual else lowdim_chunk_frames
            data.create_array(
                key,
                shape=(0, *feature.shape),
                dtype=feature.dtype,
                chunks=(t_chunk, *feature.shape),
                # bitshuffle suits pixels; byte shuffle suits low-dim floats.
                compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle" if visual else "shuffle"),
                fill_value=0,
            )
        meta.create_array("episode_ends", shape=(0,), dtype="int64", chunks=(1024,), fill_value=0)
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fps": float(fps),
            "robot_type": str(robot_type),
            "features": {key: f.to_json() for key, f in all_features(user).items()},
            "tasks": [],
            "total_episodes": 0,
            "total_frames": 0,
        }
        write_json_atomic(path / INFO_FILE, info)
        write_json_atomic(path / STATS_FILE, {})
        # The commit record comes last: a store without one is an unfinished creation.
        write_json_atomic(path / COMMIT_FILE, empty_commit(), fsync=True)
        return EpisodeWriter(path, lock_fd, keep_partial=False, flush_frames=flush_frames, durable=durable)
    except BaseException:
        _release_lock(lock_fd)
        raise


def open_writer(
    path: str | os.PathLike, *, keep_partial: bool = False, flush_frames: int = 64, durable: bool = False
) -> EpisodeWriter:
    """Open an existing store to append episodes (repairing it after a crash, see module doc).

    ``keep_partial=True`` commits the fully flushed rows of an episode a crash interrupted as an
    episode of its own; by default they are discarded.
    """
    path = Path(path)
    check_is_store(path)
    lock_fd = _acquire_lock(path)
    try:
        return EpisodeWriter(
            path, lock_fd, keep_partial=keep_partial, flush_frames=flush_frames, durable=durable
        )
    except BaseException:
        _release_lock(lock_fd)
        raise


def _acquire_lock(path: Path) -> int:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"Another writer holds '{path}' (pid {holder}). One writer at a time: close the other writer "
            f"first; readers (open_store) may open it concurrently."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _release_lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class EpisodeWriter:
    """The one writer of a store. Create it with :func:`create_store` or :func:`open_writer`."""

    def __init__(self, path: Path, lock_fd: int, *, keep_partial: bool, flush_frames: int, durable: bool):
        # The caller owns lock_fd until this constructor succeeds (it releases it if we raise).
        self._lock_fd: int | None = None
        self.path = path
        self._durable = durable
        self._root = zarr.open_group(path, mode="r+")
        self.info: dict[str, Any] = read_json(path / INFO_FILE)
        self.features = features_from_info(self.info)
        self.fps = float(self.info["fps"])
        self._user_keys = [k for k in self.features if k not in AUTO_FEATURES]
        self._arrays: dict[str, zarr.Array] = {k: self._root[f"data/{k}"] for k in self.features}
        self._ends = self._root["meta/episode_ends"]
        visual_chunks = [a.chunks[0] for k, a in self._arrays.items() if is_visual(k, self.features[k])]
        if flush_frames < 1 or any(flush_frames % c for c in visual_chunks):
            raise UserError(
                f"flush_frames={flush_frames} must be a positive multiple of the image chunk length "
                f"{sorted(set(visual_chunks))} so that flushes write whole chunks."
            )
        self.flush_frames = flush_frames
        self._commit: dict[str, Any] = {}
        self._acc: dict[str, st.Accumulator] = {}
        self._recover(keep_partial)
        self._buffer = {k: np.zeros((flush_frames, *f.shape), f.dtype) for k, f in self.features.items()}
        self._reset_episode()
        self._lock_fd = lock_fd

    # ------------------------------------------------------------------ public API

    @property
    def num_episodes(self) -> int:
        """Committed episodes."""
        return self._commit["num_episodes"]

    @property
    def num_frames(self) -> int:
        """Committed frames."""
        return self._commit["num_frames"]

    @property
    def tasks(self) -> list[str]:
        """Committed task strings (index = task_index)."""
        return list(self._commit["tasks"])

    @property
    def episode_frames(self) -> int:
        """Frames added to the episode in progress."""
        return self._flushed + self._buffered

    def add_frame(self, frame: Mapping[str, Any], task: str) -> None:
        """Append one frame to the episode in progress. A refused frame changes nothing."""
        self._check_open()
        if not isinstance(task, str) or not task:
            raise UserError(f"task must be a non-empty string (the instruction), got {task!r}.")
        if not isinstance(frame, Mapping):
            raise UserError(f"frame must be a dict of feature key -> array, got {type(frame).__name__}.")
        values = self._validate(frame)
        frame_index = self.episode_frames
        timestamp = self._validate_timestamp(frame.get("timestamp", frame_index / self.fps))
        task_index = self._task_to_index.get(task)
        if task_index is None:
            task_index = len(self._all_tasks)
            self._all_tasks.append(task)
            self._task_to_index[task] = task_index
        row = self._buffered
        for key, value in values.items():
            self._buffer[key][row] = value
        self._buffer["timestamp"][row] = timestamp
        self._buffer["frame_index"][row] = frame_index
        self._buffer["episode_index"][row] = self.num_episodes
        self._buffer["task_index"][row] = task_index
        self._buffered += 1
        self._last_timestamp = timestamp
        if (self.num_frames + self.episode_frames) % self.flush_frames == 0:
            self._flush()

    def end_episode(self) -> int:
        """Commit the episode in progress; return its index."""
        self._check_open()
        if self.episode_frames == 0:
            raise UserError("end_episode() called with no frames added. Add frames with add_frame() first.")
        self._flush()
        self._commit_rows(
            np.array([self.num_frames + self._flushed]), self._episode_acc, list(self._all_tasks)
        )
        self._remove_partial()
        self._reset_episode()
        return self.num_episodes - 1

    def add_episodes(
        self, columns: Mapping[str, Any], episode_lengths: Any, tasks: list[str] | tuple[str, ...]
    ) -> int:
        """Append whole, already recorded episodes with one write per key and commit them together;
        return how many the store then holds. For copying and converting stores: ``add_frame``
        costs a buffered write per frame, this a few writes per call.

        ``columns`` maps every declared key, plus ``task_index`` (int per frame, into ``tasks``, the
        instruction strings) and optionally ``timestamp`` (seconds, strictly increasing within each
        episode; default frame_index / fps), to an array of ``sum(episode_lengths)`` rows, the
        episodes one after another. Values follow ``add_frame``'s casting rules. Everything is
        checked before anything is written, so a refused call changes nothing.
        """
        self._check_open()
        if self.episode_frames:
            raise UserError(
                f"add_episodes() called with an episode in progress ({self.episode_frames} frames); call "
                f"end_episode() or discard_episode() first."
            )
        lengths = np.asarray(episode_lengths)
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or len(lengths) == 0 or (lengths < 1).any():
            raise UserError(
                f"episode_lengths must be a non-empty list of positive ints, got {episode_lengths!r}."
            )
        lengths = lengths.astype(np.int64)
        n = int(lengths.sum())
        if not isinstance(columns, Mapping):
            raise UserError(f"columns must be a dict of key -> array, got {type(columns).__name__}.")
        expected = [*self._user_keys, "task_index"]
        missing = [k for k in expected if k not in columns]
        extra = [k for k in columns if k not in expected and k != "timestamp"]
        if missing or extra:
            raise UserError(
                f"columns has missing key(s) {missing} and undeclared key(s) {extra}; it needs every declared "
                f"feature {self._user_keys}, 'task_index' and optionally 'timestamp'."
            )
        values: dict[str, np.ndarray] = {}
        for key in self._user_keys:
            column = np.asarray(columns[key])
            if column.shape != (n, *self.features[key].shape):
                raise UserError(
                    f"columns['{key}'] has shape {column.shape}; expected {(n, *self.features[key].shape)} "
                    f"(episode_lengths sum to {n} rows of the declared shape {self.features[key].shape})."
                )
            values[key] = _convert(
                key, Feature(self.features[key].dtype, (n, *self.features[key].shape)), column
            )
        if not all(isinstance(t, str) and t for t in tasks):
            raise UserError(f"tasks must be non-empty instruction strings, got {tasks!r}.")
        task_index = np.asarray(columns["task_index"])
        if task_index.shape != (n,) or task_index.dtype.kind not in "iu":
            raise UserError(
                f"columns['task_index'] must be {n} ints, got {task_index.dtype}{task_index.shape}."
            )
        if task_index.min() < 0 or task_index.max() >= len(tasks):
            raise UserError(f"columns['task_index'] indexes past the {len(tasks)} strings in tasks.")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        frame_index = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
        if "timestamp" in columns:
            timestamp = np.asarray(columns["timestamp"], dtype=np.float64).reshape(-1)
            if timestamp.shape != (n,) or not np.isfinite(timestamp).all():
                raise UserError(f"columns['timestamp'] must be {n} finite numbers.")
            if (np.diff(timestamp)[frame_index[1:] > 0] <= 0).any():
                raise UserError("columns['timestamp'] must strictly increase within each episode.")
        else:
            timestamp = frame_index / self.fps

        all_tasks = list(self._commit["tasks"])
        to_index = {t: i for i, t in enumerate(all_tasks)}
        for t in tasks:
            if t not in to_index:
                to_index[t] = len(all_tasks)
                all_tasks.append(t)
        remap = np.array([to_index[t] for t in tasks], dtype=np.int64)
        values["task_index"] = remap[task_index]
        values["frame_index"] = frame_index
        values["episode_index"] = self.num_episodes + np.repeat(np.arange(len(lengths)), lengths)
        values["timestamp"] = timestamp
        rows = {k: values[k].astype(self.features[k].dtype, copy=False) for k in self.features}

        start = self.num_frames
        for key, arr in self._arrays.items():
            self._write_rows(key, arr, start, rows[key])
        block = {key: st.block_stats(key, self.features[key], rows[key]) for key in self.features}
        self._commit_rows(start + np.cumsum(lengths), block, all_tasks)
        self._reset_episode()
        return self.num_episodes

    def discard_episode(self) -> None:
        """Drop the episode in progress (its flushed rows are truncated from disk)."""
        self._check_open()
        if self._flushed:
            self._truncate_data(self.num_frames)
        self._remove_partial()
        self._reset_episode()

    def close(self) -> None:
        """Release the store. An episode in progress is NOT committed: its rows are flushed and left
        as a partial episode, which ``open_writer(path, keep_partial=True)`` commits and a plain
        ``open_writer`` discards."""
        if self._lock_fd is None:
            return
        try:
            if self.episode_frames:
                warnings.warn(
                    f"EpisodeWriter closed with an episode in progress ({self.episode_frames} frames) that "
                    f"was not committed: call end_episode() or discard_episode() before closing. Its rows "
                    f"stay on disk as a partial episode: open_writer('{self.path}', keep_partial=True) "
                    f"commits them, a plain open_writer discards them.",
                    stacklevel=2,
                )
                self._flush()
        finally:
            _release_lock(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:
        # A writer dropped without close(): free the lock (nothing is flushed or committed).
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            self._lock_fd = None
            try:
                os.close(fd)  # closing the descriptor drops the flock
            except OSError:
                pass

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ frame checks

    def _validate(self, frame: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [k for k in self._user_keys if k not in frame]
        if missing:
            raise UserError(
                f"Frame is missing key(s) {missing}. Every frame needs all declared features: "
                f"{self._user_keys}."
            )
        extra = [k for k in frame if k not in self._user_keys and k != "timestamp"]
        if extra:
            hint = did_you_mean(str(extra[0]), self._user_keys)
            raise UserError(
                f"Frame has undeclared key(s) {extra}.{hint} Declared features: {self._user_keys}"
                f" (plus optional 'timestamp'; frame_index, episode_index and task_index are filled by the writer)."
            )
        return {key: _convert(key, self.features[key], frame[key]) for key in self._user_keys}

    def _validate_timestamp(self, value: Any) -> float:
        arr = np.asarray(value)
        if arr.size != 1 or arr.dtype.kind not in "fiu":
            raise UserError(f"Frame key 'timestamp' must be one real number (seconds), got {value!r}.")
        ts = float(arr.reshape(()))
        if not np.isfinite(ts):
            raise UserError(f"Frame key 'timestamp' is {ts}; timestamps must be finite.")
        if self.episode_frames and ts <= self._last_timestamp:
            raise UserError(
                f"Frame key 'timestamp' is {ts}, not after the previous frame's {self._last_timestamp}. "
                f"Timestamps must strictly increase within an episode."
            )
        return ts

    # ------------------------------------------------------------------ disk writes

    def _flush(self) -> None:
        """Write the buffered rows past the committed end and record the progress."""
        n = self._buffered
        if n == 0:
            return
        start = self.num_frames + self._flushed
        for key, arr in self._arrays.items():
            self._write_rows(key, arr, start, self._buffer[key][:n])
        block = {key: st.block_stats(key, self.features[key], self._buffer[key][:n]) for key in self.features}
        self._episode_acc = st.merge_all(self._episode_acc, block)
        self._flushed += n
        self._buffered = 0
        partial = {
            "commit_id": self._commit["commit_id"],
            "episode_index": self.num_episodes,
            "start": self.num_frames,
            "flushed_frames": self._flushed,
            "tasks": self._all_tasks,
        }
        write_json_atomic(self.path / PARTIAL_FILE, partial)

    def _write_rows(self, key: str, arr: zarr.Array, start: int, rows: np.ndarray) -> None:
        end = start + len(rows)
        if arr.shape[0] != end:
            arr.resize((end, *arr.shape[1:]))
        arr[start:end] = rows

    def _commit_rows(
        self, ends: np.ndarray, episode_acc: dict[str, st.Accumulator], tasks: list[str]
    ) -> None:
        """Commit the rows up to ``ends[-1]``, already on disk, as episodes ending at ``ends``."""
        e, k, end = self.num_episodes, len(ends), int(ends[-1])
        if self._ends.shape[0] != e + k:
            self._ends.resize((e + k,))
        self._ends[e : e + k] = ends
        commit = {
            **self._commit,
            "commit_id": self._commit["commit_id"] + 1,
            "num_episodes": e + k,
            "num_frames": end,
            "tasks": tasks,
            "stats_accumulators": st.accumulators_to_json(st.merge_all(self._acc, episode_acc)),
        }
        if self._durable:
            os.sync()  # data chunks reach the disk before the record that makes them count
        write_json_atomic(self.path / COMMIT_FILE, commit, fsync=True)
        self._set_commit(commit)
        self._write_derived()

    def _truncate_data(self, n: int) -> None:
        for arr in self._arrays.values():
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))

    def _remove_partial(self) -> None:
        (self.path / PARTIAL_FILE).unlink(missing_ok=True)

    def _write_derived(self) -> None:
        """Rewrite stats.json and info.json from the commit record (they only mirror it)."""
        stats, info = self._derived()
        write_json_atomic(self.path / STATS_FILE, stats)
        write_json_atomic(self.path / INFO_FILE, info)
        self.info = info

    def _derived(self) -> tuple[dict[str, Any], dict[str, Any]]:
        stats = st.stats_to_json(st.finish(self._acc))
        info = {
            **self.info,
            "tasks": list(self._commit["tasks"]),
            "total_episodes": self.num_episodes,
            "total_frames": self.num_frames,
        }
        return stats, info

    # ------------------------------------------------------------------ state

    def _set_commit(self, commit: dict[str, Any]) -> None:
        self._commit = commit
        self._acc = st.accumulators_from_json(commit["stats_accumulators"])

    def _reset_episode(self) -> None:
        self._flushed = 0  # rows of this episode on disk past the committed end
        self._buffered = 0  # rows of this episode in self._buffer
        self._episode_acc: dict[str, st.Accumulator] = {}
        self._all_tasks = list(self._commit["tasks"])  # committed + those new in this episode
        self._task_to_index = {t: i for i, t in enumerate(self._all_tasks)}
        self._last_timestamp = -np.inf

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise UserError(f"This writer of '{self.path}' is closed. Open it again with open_writer().")

    # ------------------------------------------------------------------ recovery

    def _recover(self, keep_partial: bool) -> None:
        commit = read_json(self.path / COMMIT_FILE)
        check_commit(commit, self.path)
        self._set_commit(commit)
        _remove_temporaries(self.path)
        n, e = self.num_frames, self.num_episodes
        for key, arr in self._arrays.items():
            if arr.shape[0] < n:
                raise UserError(
                    f"Store '{self.path}' is damaged: data/{key} has {arr.shape[0]} rows but {n} are committed. "
                    f"Run `dreamrt episodes verify {self.path}` for details."
                )
        self._repair_episode_ends()
        partial_rows, partial_tasks = self._usable_partial() if keep_partial else (0, None)
        self._truncate_data(n + partial_rows)
        if self._ends.shape[0] != e:
            self._ends.resize((e,))
        if partial_rows:
            assert partial_tasks is not None
            self._commit_rows(
                np.array([n + partial_rows]), self._stats_of_rows(n, n + partial_rows), partial_tasks
            )
        stats, info = self._derived()
        on_disk_stats = _read_json_or_none(self.path / STATS_FILE)
        if on_disk_stats != stats or self.info != info:
            self._write_derived()
        self._remove_partial()

    def _repair_episode_ends(self) -> None:
        e, n = self.num_episodes, self.num_frames
        ends = np.asarray(self._ends[: min(e, self._ends.shape[0])], dtype=np.int64)
        if len(ends) == e and ends_valid(ends, n):
            return
        # Rebuild from the per-frame episode index, which was written with the rows themselves.
        rebuilt = ends_from_episode_index(np.asarray(self._arrays["episode_index"][:n]), e)
        if rebuilt is None:
            raise UserError(
                f"Store '{self.path}' is damaged: meta/episode_ends and data/episode_index disagree with the "
                f"commit record ({e} episodes, {n} frames). Run `dreamrt episodes verify {self.path}`."
            )
        self._ends.resize((e,))
        if e:
            self._ends[:] = rebuilt

    def _usable_partial(self) -> tuple[int, list[str] | None]:
        """Rows of an interrupted episode that a flush finished writing for every key."""
        partial = _read_json_or_none(self.path / PARTIAL_FILE)
        if not isinstance(partial, dict):
            return 0, None
        n = self.num_frames
        fresh = (
            partial.get("commit_id") == self._commit["commit_id"]
            and partial.get("start") == n
            and partial.get("episode_index") == self.num_episodes
            and isinstance(partial.get("tasks"), list)
        )
        rows = int(partial.get("flushed_frames", 0)) if fresh else 0
        if rows <= 0 or any(arr.shape[0] < n + rows for arr in self._arrays.values()):
            return 0, None
        return rows, list(partial["tasks"])

    def _stats_of_rows(self, start: int, stop: int) -> dict[str, st.Accumulator]:
        acc: dict[str, st.Accumulator] = {}
        for lo in range(start, stop, self.flush_frames):
            hi = min(lo + self.flush_frames, stop)
            block = {
                k: st.block_stats(k, f, np.asarray(self._arrays[k][lo:hi])) for k, f in self.features.items()
            }
            acc = st.merge_all(acc, block)
        return acc


def _convert(key: str, feature: Feature, value: Any) -> np.ndarray:
    """Check one frame value against its feature and cast it (rules in the module docstring)."""
    arr = np.asarray(value)
    if arr.shape != feature.shape:
        raise UserError(
            f"Frame key '{key}' has shape {arr.shape}; the store declares {feature.shape}. "
            f"Reshape the value (one frame, no batch or time axis)."
        )
    target = np.dtype(feature.dtype)
    if arr.dtype != target:
        src = arr.dtype
        if target.kind == "f":
            ok = src.kind in "fiu"
        elif target.kind in "iu":
            info = np.iinfo(target)
            ok = src.kind in "iu" and (arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max))
        else:  # bool
            ok = False
        if not ok:
            raise UserError(
                f"Frame key '{key}' has dtype {src}; the store declares {target}. Accepted: "
                f"{'float or integer values' if target.kind == 'f' else 'integers in range' if target.kind in 'iu' else 'bool'}"
                f". Convert the value (e.g. images as uint8 0..255)."
            )
        with np.errstate(over="ignore"):
            arr = arr.astype(target)
    if target.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[:3].tolist()
        raise UserError(
            f"Frame key '{key}' contains NaN or inf (after casting to {target}) at index {bad}. "
            f"Only finite values are stored; fix the source or drop the frame."
        )
    return arr


def _remove_temporaries(path: Path) -> None:
    """Delete temporary files left by a killed process (zarr's chunk temporaries and ours)."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            if ZARR_TEMP_RE.search(name) or (name.startswith(".") and name.endswith(".tmp")):
                Path(dirpath, name).unlink(missing_ok=True)


def _read_json_or_none(path: Path) -> Any:
    try:
        return read_json(path, retries=1)
    except (FileNotFoundError, ValueError):
        return None
