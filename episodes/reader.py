"""Read a dreamrt episode store: counts, episodes (lazily, key by key), tasks, info, stats.

A reader sees the store as of its last :meth:`EpisodeStore.refresh` (called on open): it
reads the commit record first and honours it, so it may run while a writer appends. Rows
past the committed frame count (an episode in progress) are never returned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dreamrt.episodes import stats as st
from dreamrt.episodes.format import (
    AUTO_FEATURES,
    COMMIT_FILE,
    INFO_FILE,
    Feature,
    check_commit,
    check_is_store,
    ends_from_episode_index,
    ends_valid,
    features_from_info,
    read_json,
)
from dreamrt.errors import UserError, did_you_mean


def open_store(path: str | os.PathLike) -> EpisodeStore:
    """Open a store for reading (UserError if ``path`` is missing or not a dreamrt store)."""
    return EpisodeStore(path)


class EpisodeStore:
    """Read-only view of a store at its last commit."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        check_is_store(self.path)
        self._info: dict[str, Any] = {}
        self._commit: dict[str, Any] = {}
        self._arrays: dict[str, zarr.Array] = {}
        self._ends = np.zeros(0, np.int64)
        self._task_index: np.ndarray | None = None
        self.refresh()

    # ------------------------------------------------------------------ snapshot

    def refresh(self, retries: int = 50, delay_s: float = 0.01) -> bool:
        """Re-read the commit record and reopen the arrays; return True if new episodes appeared."""
        before = self._commit.get("commit_id")
        for attempt in range(retries):
            commit = read_json(self.path / COMMIT_FILE)
            check_commit(commit, self.path)
            root = zarr.open_group(self.path, mode="r")
            arrays = {
                key: root[f"data/{key}"] for key in features_from_info(read_json(self.path / INFO_FILE))
            }
            e, n = commit["num_episodes"], commit["num_frames"]
            ends_arr = root["meta/episode_ends"]
            ends = np.asarray(ends_arr[: min(e, ends_arr.shape[0])], dtype=np.int64)
            complete = all(a.shape[0] >= n for a in arrays.values())
            if complete and len(ends) == e and ends_valid(ends, n):
                break
            if complete and attempt == retries - 1:
                # A crash can leave episode_ends behind the commit until a writer repairs it; the
                # per-frame episode index says the same thing.
                ends = ends_from_episode_index(np.asarray(arrays["episode_index"][:n]), e)
                if ends is not None:
                    break
            if attempt == retries - 1:
                raise UserError(
                    f"Store '{self.path}' is inconsistent: its commit record says {e} episodes / {n} frames but "
                    f"meta/episode_ends or data/ disagree. Run `dreamrt episodes verify {self.path}`; opening "
                    f"it with open_writer() repairs what can be repaired."
                )
            time.sleep(delay_s)  # torn view of a concurrent commit: look again
        self._commit = commit
        self._info = read_json(self.path / INFO_FILE)
        self._features = features_from_info(self._info)
        self._arrays = arrays
        self._ends = ends
        self._task_index = None
        return commit.get("commit_id") != before and before is not None

    # ------------------------------------------------------------------ counts and metadata

    @property
    def num_episodes(self) -> int:
        return self._commit["num_episodes"]

    @property
    def num_frames(self) -> int:
        return self._commit["num_frames"]

    @property
    def episode_ends(self) -> np.ndarray:
        """(E,) int64 cumulative end row of each episode."""
        return self._ends.copy()

    @property
    def episode_starts(self) -> np.ndarray:
        return (
            np.concatenate([[0], self._ends[:-1]]).astype(np.int64) if len(self._ends) else self._ends.copy()
        )

    @property
    def episode_lengths(self) -> np.ndarray:
        """(E,) int64 frames per episode."""
        return np.diff(np.concatenate([[0], self._ends])).astype(np.int64)

    @property
    def fps(self) -> float:
        return float(self._info["fps"])

    @property
    def features(self) -> dict[str, Feature]:
        """All stored features (declared ones plus timestamp, frame_index, episode_index, task_index)."""
        return dict(self._features)

    @property
    def keys(self) -> list[str]:
        return list(self._features)

    @property
    def user_keys(self) -> list[str]:
        """The declared features (observation.*, action)."""
        return [k for k in self._features if k not in AUTO_FEATURES]

    @property
    def tasks(self) -> list[str]:
        """Task strings; ``data/task_index`` indexes this list."""
        return list(self._commit["tasks"])

    @property
    def info(self) -> dict[str, Any]:
        """meta/info.json with tasks and totals taken from the commit record."""
        return {
            **self._info,
            "tasks": self.tasks,
            "total_episodes": self.num_episodes,
            "total_frames": self.num_frames,
        }

    @property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """{key: {"mean", "std", "min", "max", "count"}} over committed frames (images: per channel)."""
        return st.finish(st.accumulators_from_json(self._commit["stats_accumulators"]))

    # ------------------------------------------------------------------ data

    def array(self, key: str) -> zarr.Array:
        """The zarr array behind ``key`` (it may hold uncommitted rows past ``num_frames``)."""
        self._check_key(key)
        return self._arrays[key]

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of ``key`` within the committed frames."""
        self._check_key(key)
        stop = self.num_frames if stop is None else stop
        if not 0 <= start <= stop <= self.num_frames:
            raise UserError(f"Rows [{start}, {stop}) are outside the {self.num_frames} committed frames.")
        return np.asarray(self._arrays[key][start:stop])

    def to_numpy(self, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All committed rows of ``keys`` (default: every key) as numpy arrays in memory."""
        return {key: self.read(key) for key in (self.keys if keys is None else keys)}

    def get_episode(self, index: int) -> Episode:
        """Episode ``index`` (negative counts from the end); arrays load on first access per key."""
        e = self.num_episodes
        if not -e <= index < e:
            raise UserError(f"Episode {index} does not exist; the store has {e} episodes (0..{e - 1}).")
        index %= e
        start = int(self._ends[index - 1]) if index else 0
        return Episode(self, index, start, int(self._ends[index]))

    def episode_tasks(self, index: int) -> list[str]:
        """Task strings used in an episode, in order of first appearance."""
        return self.get_episode(index).tasks

    def __len__(self) -> int:
        return self.num_episodes

    def __repr__(self) -> str:
        return f"EpisodeStore('{self.path}', episodes={self.num_episodes}, frames={self.num_frames})"

    def _check_key(self, key: str) -> None:
        if key not in self._arrays:
            raise UserError(
                f"No feature '{key}' in '{self.path}'.{did_you_mean(key, self._arrays)} Keys: {self.keys}"
            )


class Episode(Mapping[str, np.ndarray]):
    """One episode as a read-only mapping key -> array (T, *shape); each key loads on first access."""

    def __init__(self, store: EpisodeStore, index: int, start: int, stop: int):
        self.store = store
        self.index = index
        self.start = start
        self.stop = stop
        self._cache: dict[str, np.ndarray] = {}

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def tasks(self) -> list[str]:
        task_index = self["task_index"]
        _, first = np.unique(task_index, return_index=True)
        names = self.store.tasks
        return [names[int(task_index[i])] for i in sorted(first)]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = self.store.read(key, self.start, self.stop)
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.keys)

    def __len__(self) -> int:
        return len(self.store.keys)

    def __repr__(self) -> str:
        return f"Episode({self.index}, frames={self.length}, rows=[{self.start}, {self.stop}))"
