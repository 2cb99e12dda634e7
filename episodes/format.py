"""The on-disk format of a dreamrt episode store, shared by the writer, the reader and verify.

A store is a zarr v3 group laid out as diffusion_policy's replay buffer, so any zarr user
reads it::

    store.zarr/
      zarr.json                 root group; attributes {"dreamrt": {"format", "format_version"}}
      data/<key>                one array per feature, time first, all episodes concatenated
      meta/episode_ends         int64, cumulative end row of each committed episode
      meta/commit.json          the commit record: the single source of truth (see below)
      meta/info.json            fps, robot type, features (dtype/shape/names), tasks, totals
      meta/stats.json           per-feature mean/std/min/max over committed frames
      meta/partial.json         progress of the episode being written (absent when idle)
      meta/writer.lock          fcntl lock held by the one writer

Keys follow LeRobot: ``observation.state``, ``observation.images.<camera>``, any other
``observation.*`` key, ``action``, ``loop.*`` (the control loop's per-tick timing), plus the columns the writer fills itself: ``timestamp``,
``frame_index``, ``episode_index`` and ``task_index``.

The commit record (written to a temporary file, fsynced and renamed over the old one)
holds the committed episode and frame counts, the task strings and the raw statistics
accumulators. Everything else is derived from it and from ``data/``: rows past
``num_frames`` belong to an episode in progress (or one a crash interrupted); entries of
``episode_ends`` past ``num_episodes`` are uncommitted.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError

FORMAT = "dreamrt.episodes"
FORMAT_VERSION = 1

INFO_FILE = "meta/info.json"
STATS_FILE = "meta/stats.json"
COMMIT_FILE = "meta/commit.json"
PARTIAL_FILE = "meta/partial.json"
LOCK_FILE = "meta/writer.lock"
EPISODE_ENDS = "meta/episode_ends"

# Columns the writer fills itself; a frame may give `timestamp` (seconds), never the others.
AUTO_FEATURES: dict[str, tuple[str, tuple[int, ...]]] = {
    "timestamp": ("float64", ()),  # float64: wall-clock seconds need more than float32's 24 bits
    "frame_index": ("int64", ()),
    "episode_index": ("int64", ()),
    "task_index": ("int64", ()),
}
VISUAL_PREFIXES = ("observation.images.", "observation.depth.")
_KEY_RE = re.compile(r"^(action|(observation|loop)\.[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*)$")
ALLOWED_DTYPES = (
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)

# zarr's LocalStore writes each chunk to '<name>.<32 hex>.partial' and renames it into place;
# a process killed in between leaves that temporary behind (harmless, removed by the next writer).
ZARR_TEMP_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")


@dataclass(frozen=True)
class Feature:
    """One declared per-frame value: ``dtype`` (numpy name), ``shape`` of a single frame,
    optional ``names`` (one per element of a 1-D feature, or one per axis otherwise)."""

    dtype: str
    shape: tuple[int, ...]
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(str(n) for n in self.names))

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "names": list(self.names) if self.names is not None else None,
        }


def is_visual(key: str, feature: Feature) -> bool:
    """Images and depth maps: chunked a few frames at a time, stats per channel."""
    return key.startswith(VISUAL_PREFIXES) and len(feature.shape) >= 2


def parse_feature(key: str, spec: Feature | Mapping[str, Any]) -> Feature:
    """Validate one user-declared feature; raise a UserError saying what to fix."""
    if key in AUTO_FEATURES:
        raise UserError(
            f"Feature '{key}' is filled by the writer and cannot be declared. Remove it from the features; "
            f"frames may still pass 'timestamp' (seconds) to override the default frame_index / fps."
        )
    if not _KEY_RE.match(key):
        raise UserError(
            f"Invalid feature key '{key}'. Expected 'action', 'observation.<name>' or 'loop.<name>' "
            f"(e.g. 'observation.state', 'observation.images.<camera>', 'observation.depth.<camera>')."
        )
    if isinstance(spec, Feature):
        feature = spec
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"dtype", "shape", "names"}
        if unknown or "dtype" not in spec or "shape" not in spec:
            raise UserError(
                f"Feature '{key}' must be a mapping with 'dtype', 'shape' and optional 'names'; "
                f"got keys {sorted(spec)}."
            )
        try:
            shape = tuple(int(s) for s in spec["shape"])
        except (TypeError, ValueError):
            raise UserError(
                f"Feature '{key}': shape must be a list of ints, got {spec['shape']!r}."
            ) from None
        names = spec.get("names")
        feature = Feature(str(spec["dtype"]), shape, tuple(names) if names is not None else None)
    else:
        raise UserError(f"Feature '{key}' must be a Feature or a dict, got {type(spec).__name__}.")
    if feature.dtype not in ALLOWED_DTYPES:
        raise UserError(
            f"Feature '{key}' has dtype '{feature.dtype}'. Expected one of {', '.join(ALLOWED_DTYPES)}."
        )
    if any(s <= 0 for s in feature.shape):
        raise UserError(f"Feature '{key}' has shape {feature.shape}; every dimension must be positive.")
    if key.startswith("observation.images."):
        if feature.dtype != "uint8" or len(feature.shape) != 3 or feature.shape[2] not in (1, 3, 4):
            raise UserError(
                f"Image feature '{key}' is {feature.dtype} {feature.shape}. Images are stored as uint8 "
                f"height x width x channels with 1, 3 or 4 channels, e.g. dtype='uint8', shape=(96, 96, 3)."
            )
        if feature.names is None:
            feature = Feature(feature.dtype, feature.shape, ("height", "width", "channel"))
    if key.startswith("observation.depth.") and len(feature.shape) not in (2, 3):
        raise UserError(f"Depth feature '{key}' has shape {feature.shape}; expected (H, W) or (H, W, 1).")
    if feature.names is not None:
        expected = feature.shape[0] if len(feature.shape) == 1 else len(feature.shape)
        if len(feature.names) != expected:
            raise UserError(
                f"Feature '{key}' has {len(feature.names)} names for shape {feature.shape}; expected "
                f"{expected} (one per element of a 1-D feature, one per axis otherwise)."
            )
    return feature


def all_features(user: Mapping[str, Feature]) -> dict[str, Feature]:
    """User features plus the writer-filled columns, in a fixed order."""
    out = dict(user)
    for key, (dtype, shape) in AUTO_FEATURES.items():
        out[key] = Feature(dtype, shape)
    return out


def features_from_info(info: Mapping[str, Any]) -> dict[str, Feature]:
    return {
        key: Feature(f["dtype"], tuple(f["shape"]), tuple(f["names"]) if f.get("names") else None)
        for key, f in info["features"].items()
    }


# ---------------------------------------------------------------- small file helpers


def write_json_atomic(path: Path, obj: Any, fsync: bool = False) -> None:
    """Write ``obj`` to ``path`` so that a reader (or a crash) sees the old or the new file, never
    a mix: write a temporary, optionally fsync it, rename it over the target."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(obj, indent=1, allow_nan=False).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        # The rename lives in the directory: fsync it too so the new name survives power loss.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json(path: Path, retries: int = 20, delay_s: float = 0.01) -> Any:
    """Read a metadata file. Our writes are atomic renames, but a file copied by other tools or
    served by a network filesystem can be caught half-written: retry briefly before failing."""
    for attempt in range(retries):
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            if attempt == retries - 1:
                raise
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def check_is_store(path: Path) -> None:
    """Raise a UserError unless ``path`` looks like a dreamrt episode store."""
    if not path.exists():
        raise UserError(
            f"Episode store '{path}' does not exist. Check the path (a directory ending in .zarr)."
        )
    if not path.is_dir() or not (path / "zarr.json").is_file():
        raise UserError(
            f"'{path}' is not a zarr store (no zarr.json at its root). Expected a directory written by "
            f"dreamrt.episodes.create_store."
        )
    if not (path / INFO_FILE).is_file() or not (path / COMMIT_FILE).is_file():
        missing = [f for f in (INFO_FILE, COMMIT_FILE) if not (path / f).is_file()]
        raise UserError(
            f"'{path}' is a zarr store but not a dreamrt episode store: missing {', '.join(missing)}. "
            f"If its creation was interrupted, create it again with create_store(..., overwrite=True)."
        )


def empty_commit() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "commit_id": 0,
        "num_episodes": 0,
        "num_frames": 0,
        "tasks": [],
        "stats_accumulators": {},
    }


def check_commit(commit: Any, path: Path) -> None:
    """Raise a UserError when a commit record is not one this code understands."""
    ok = (
        isinstance(commit, dict)
        and commit.get("format") == FORMAT
        and isinstance(commit.get("num_episodes"), int)
        and isinstance(commit.get("num_frames"), int)
        and isinstance(commit.get("tasks"), list)
        and isinstance(commit.get("stats_accumulators"), dict)
    )
    if not ok:
        raise UserError(f"'{path / COMMIT_FILE}' is not a valid dreamrt commit record.")
    if commit.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"Store '{path}' has format version {commit.get('format_version')}; this dreamrt reads version "
            f"{FORMAT_VERSION}. Upgrade dreamrt or convert the store."
        )


def ends_valid(ends: np.ndarray, num_frames: int) -> bool:
    """Episode ends are positive, strictly increasing (no empty episode) and end at num_frames."""
    if len(ends) == 0:
        return num_frames == 0
    return bool(ends[0] > 0 and np.all(np.diff(ends) > 0) and ends[-1] == num_frames)


def ends_from_episode_index(episode_index: np.ndarray, num_episodes: int) -> np.ndarray | None:
    """Episode ends implied by the per-frame episode index, or None unless it runs 0..E-1 in order."""
    if len(episode_index) == 0:
        return np.zeros(0, np.int64) if num_episodes == 0 else None
    if np.any(np.diff(episode_index) < 0) or episode_index[0] != 0 or episode_index[-1] != num_episodes - 1:
        return None
    ends = np.cumsum(np.bincount(episode_index, minlength=num_episodes)).astype(np.int64)
    return ends if ends_valid(ends, len(episode_index)) else None
