"""Jobs `dreamrt episodes info PATH` and `dreamrt episodes verify PATH`.

``run_info`` summarises a store; ``run_verify`` checks every invariant of the format (see
docs/episodes.md) by reading all committed data, and exits 1 listing what is wrong.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dreamrt.episodes import stats as st
from dreamrt.episodes.format import (
    AUTO_FEATURES,
    COMMIT_FILE,
    EPISODE_ENDS,
    FORMAT,
    INFO_FILE,
    PARTIAL_FILE,
    STATS_FILE,
    ZARR_TEMP_RE,
    Feature,
    check_commit,
    check_is_store,
    ends_valid,
    features_from_info,
    parse_feature,
    read_json,
)
from dreamrt.episodes.reader import open_store
from dreamrt.errors import UserError
from dreamrt.jobs import JobResult


@dataclass
class InfoConfig:
    path: str  # the store directory (e.g. demo.zarr)

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError("episodes info needs a store path: `dreamrt episodes info PATH`.")


@dataclass
class VerifyConfig:
    path: str

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError("episodes verify needs a store path: `dreamrt episodes verify PATH`.")


# ---------------------------------------------------------------------------- info


def run_info(cfg: InfoConfig, out_dir: Path | None = None) -> JobResult:
    store = open_store(cfg.path)
    path = Path(cfg.path)
    data_bytes = _dir_bytes(path / "data")
    raw_bytes = sum(
        int(np.prod(store.array(k).shape)) * np.dtype(f.dtype).itemsize for k, f in store.features.items()
    )
    lengths = store.episode_lengths
    summary: dict[str, Any] = {
        "path": str(path),
        "episodes": store.num_episodes,
        "frames": store.num_frames,
        "fps": store.fps,
        "duration_s": store.num_frames / store.fps,
        "robot_type": store.info.get("robot_type"),
        "episode_length": {
            "min": int(lengths.min()) if len(lengths) else 0,
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "max": int(lengths.max()) if len(lengths) else 0,
        },
        "features": {
            k: {"dtype": f.dtype, "shape": list(f.shape), "names": list(f.names) if f.names else None}
            for k, f in store.features.items()
        },
        "tasks": store.tasks,
        "bytes_on_disk": _dir_bytes(path),
        "data_bytes_on_disk": data_bytes,
        "data_bytes_uncompressed": raw_bytes,
        "compression_ratio": raw_bytes / data_bytes if data_bytes else None,
        "format_version": store.info.get("format_version"),
    }
    print(format_info(summary))
    return JobResult(summary=summary)


def format_info(s: dict[str, Any]) -> str:
    lines = [
        f"store            {s['path']}",
        f"format           {FORMAT} v{s['format_version']}",
        f"episodes         {s['episodes']}",
        f"frames           {s['frames']}  ({s['duration_s']:.1f} s at {s['fps']:g} fps)",
        f"episode length   min {s['episode_length']['min']}  mean {s['episode_length']['mean']:.1f}  "
        f"max {s['episode_length']['max']}",
        f"robot type       {s['robot_type']}",
        f"bytes on disk    {_human(s['bytes_on_disk'])}  (data {_human(s['data_bytes_on_disk'])}, "
        f"uncompressed {_human(s['data_bytes_uncompressed'])}, ratio "
        + (f"{s['compression_ratio']:.2f}x)" if s["compression_ratio"] else "n/a)"),
        "features:",
    ]
    for key, f in s["features"].items():
        names = f"  {f['names']}" if f["names"] and len(f["names"]) <= 8 else ""
        lines.append(f"  {key:34s} {f['dtype']:8s} {tuple(f['shape'])}{names}")
    lines.append(f"tasks ({len(s['tasks'])}):")
    lines += [f"  [{i}] {t}" for i, t in enumerate(s["tasks"])]
    return "\n".join(lines)


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass  # removed while we walked (a writer's temporary)
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- verify


def run_verify(cfg: VerifyConfig, out_dir: Path | None = None) -> JobResult:
    path = Path(cfg.path)
    check_is_store(path)
    problems, notes = verify_store(path)
    summary = {"path": str(path), "ok": not problems, "problems": problems, "warnings": notes}
    for note in notes:
        print(f"warning: {note}")
    if problems:
        print(f"{path}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return JobResult(summary=summary, exit_code=1)
    print(f"{path}: ok")
    return JobResult(summary=summary)


def verify_store(path: Path) -> tuple[list[str], list[str]]:
    """(problems, warnings) for the store at ``path``; no problems means every invariant holds."""
    problems: list[str] = []
    notes: list[str] = []

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # a damaged store fails in many ways; each is a finding, not a crash
            problems.append(f"{what}: {type(err).__name__}: {err}")
            return None

    commit = attempt(f"{COMMIT_FILE} cannot be read", lambda: read_json(path / COMMIT_FILE, retries=3))
    found = len(problems)
    if commit is not None:
        attempt("commit record", lambda: check_commit(commit, path))
    if commit is None or len(problems) > found:
        return problems, notes
    info = attempt(f"{INFO_FILE} cannot be read", lambda: read_json(path / INFO_FILE, retries=3))
    features = attempt(f"{INFO_FILE} features", lambda: _check_info(info, path))
    root = attempt("zarr group cannot be opened", lambda: zarr.open_group(path, mode="r"))
    if info is None or features is None or root is None:
        return problems, notes
    e, n, tasks = commit["num_episodes"], commit["num_frames"], commit["tasks"]
    if e < 0 or n < 0 or (e == 0) != (n == 0):
        problems.append(f"commit record counts are impossible: {e} episodes, {n} frames")
        return problems, notes

    # -- tasks and metadata mirrors
    if len(set(tasks)) != len(tasks) or not all(isinstance(t, str) and t for t in tasks):
        problems.append(f"commit record tasks must be unique non-empty strings, got {tasks}")
    for field, want in (("tasks", tasks), ("total_episodes", e), ("total_frames", n)):
        if info.get(field) != want:
            problems.append(
                f"{INFO_FILE} {field} = {info.get(field)!r} disagrees with the commit record ({want!r}); "
                f"opening a writer rewrites it"
            )

    # -- arrays: presence, dtype, shape, length
    arrays: dict[str, zarr.Array] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns about our JSON files when listing groups
        stored = set(attempt("data group cannot be listed", lambda: list(root["data"].array_keys())) or [])
    for extra in sorted(stored - set(features)):
        problems.append(f"data/{extra} is not declared in {INFO_FILE}")
    for key, feature in features.items():
        arr = attempt(f"data/{key} cannot be opened", lambda key=key: root[f"data/{key}"])
        if arr is None:
            continue
        if not isinstance(arr, zarr.Array):
            problems.append(f"data/{key} is not an array")
            continue
        if str(arr.dtype) != feature.dtype or tuple(arr.shape[1:]) != feature.shape:
            problems.append(
                f"data/{key} is {arr.dtype} {tuple(arr.shape[1:])} per frame; {INFO_FILE} declares "
                f"{feature.dtype} {feature.shape}"
            )
            continue
        if arr.shape[0] < n:
            problems.append(f"data/{key} has {arr.shape[0]} rows; the commit record says {n} frames")
            continue
        if arr.shape[0] > n:
            notes.append(
                f"data/{key} has {arr.shape[0] - n} rows past the commit (an episode in progress or interrupted)"
            )
        arrays[key] = arr

    # -- episode ends
    ends = None
    ends_arr = attempt(f"{EPISODE_ENDS} cannot be opened", lambda: root[EPISODE_ENDS])
    if ends_arr is not None:
        if str(ends_arr.dtype) != "int64" or ends_arr.ndim != 1:
            problems.append(f"{EPISODE_ENDS} must be 1-D int64, got {ends_arr.dtype} {ends_arr.shape}")
        elif ends_arr.shape[0] < e:
            problems.append(
                f"{EPISODE_ENDS} has {ends_arr.shape[0]} entries; the commit record says {e} episodes"
            )
        else:
            if ends_arr.shape[0] > e:
                notes.append(
                    f"{EPISODE_ENDS} has {ends_arr.shape[0] - e} uncommitted entries past the commit"
                )
            ends = attempt(f"{EPISODE_ENDS} cannot be read", lambda: np.asarray(ends_arr[:e], np.int64))
            if ends is not None and not ends_valid(ends, n):
                problems.append(
                    f"{EPISODE_ENDS} is not strictly increasing from > 0 to num_frames={n}: {_preview(ends)}"
                )
                ends = None

    # -- per-frame columns
    cols = {}
    for key in AUTO_FEATURES:
        if key in arrays:
            cols[key] = attempt(f"data/{key} cannot be read", lambda key=key: np.asarray(arrays[key][:n]))
    if ends is not None:
        lengths = np.diff(np.concatenate([[0], ends]))
        starts = ends - lengths
        expect_episode = np.repeat(np.arange(e), lengths)
        expect_frame = np.arange(n) - np.repeat(starts, lengths)
        for key, want in (("episode_index", expect_episode), ("frame_index", expect_frame)):
            got = cols.get(key)
            if got is not None and not np.array_equal(got, want):
                bad = int(np.flatnonzero(got != want)[0])
                problems.append(f"data/{key}[{bad}] = {got[bad]}, expected {want[bad]} from {EPISODE_ENDS}")
        ts = cols.get("timestamp")
        if ts is not None and n:
            if not np.isfinite(ts).all():
                problems.append(
                    f"data/timestamp has non-finite values at rows {_preview(np.flatnonzero(~np.isfinite(ts)))}"
                )
            else:
                step = np.diff(ts)
                within = np.ones(len(step), bool)
                within[ends[:-1] - 1] = False  # an episode boundary may jump back
                if np.any((step <= 0) & within):
                    bad = int(np.flatnonzero((step <= 0) & within)[0])
                    problems.append(f"data/timestamp does not increase within an episode at row {bad + 1}")
    ti = cols.get("task_index")
    if ti is not None and n and (ti.min() < 0 or ti.max() >= len(tasks)):
        problems.append(f"data/task_index has values outside [0, {len(tasks)}): {_preview(np.unique(ti))}")

    # -- finiteness and statistics over all committed rows
    acc: dict[str, st.Accumulator] = {}
    for key, arr in arrays.items():
        feature = features[key]
        row_bytes = np.dtype(feature.dtype).itemsize * int(np.prod(feature.shape))
        block = max(1, (8 << 20) // row_bytes // arr.chunks[0]) * arr.chunks[0]  # ~8 MiB, whole chunks
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            rows = attempt(
                f"data/{key} rows [{lo}, {hi}) cannot be read",
                lambda lo=lo, hi=hi, arr=arr: np.asarray(arr[lo:hi]),
            )
            if rows is None:
                acc.pop(key, None)
                break
            if rows.dtype.kind == "f" and not np.isfinite(rows).all():
                bad = lo + int(np.flatnonzero(~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1))[0])
                problems.append(f"data/{key} has NaN or inf at row {bad}")
                acc.pop(key, None)
                break
            acc[key] = st.merge(acc.get(key), st.block_stats(key, feature, rows))
    committed = attempt(
        "commit record statistics", lambda: st.accumulators_from_json(commit["stats_accumulators"])
    )
    if committed is not None:
        for key in arrays:
            if n and key not in committed:
                problems.append(f"commit record has no statistics for '{key}'")
            elif key in acc and not _acc_close(acc[key], committed[key]):
                problems.append(
                    f"statistics of '{key}' in the commit record do not match its data (rows changed or a chunk lost?)"
                )
        on_disk = attempt(
            f"{STATS_FILE} cannot be read",
            lambda: st.stats_from_json(read_json(path / STATS_FILE, retries=3)),
        )
        if on_disk is not None and not _stats_close(on_disk, st.finish(committed)):
            problems.append(f"{STATS_FILE} disagrees with the commit record; opening a writer rewrites it")

    # -- leftovers
    if (path / PARTIAL_FILE).exists():
        notes.append(f"{PARTIAL_FILE} exists: an episode is being written or was interrupted")
    temps = [
        str(Path(d, f).relative_to(path)) for d, _, fs in os.walk(path) for f in fs if ZARR_TEMP_RE.search(f)
    ]
    if temps:
        notes.append(f"{len(temps)} temporary chunk file(s) left by an interrupted write, e.g. {temps[0]}")
    return problems, notes


def _check_info(info: Any, path: Path) -> dict[str, Feature]:
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} info record")
    fps = info.get("fps")
    if not isinstance(fps, int | float) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    features = features_from_info(info)
    for key, feature in features.items():
        if key in AUTO_FEATURES:
            dtype, shape = AUTO_FEATURES[key]
            if (feature.dtype, feature.shape) != (dtype, shape):
                raise ValueError(f"'{key}' must be {dtype} {shape}, got {feature.dtype} {feature.shape}")
        else:
            parse_feature(key, feature)
    missing = [k for k in AUTO_FEATURES if k not in features]
    if missing:
        raise ValueError(f"missing writer columns {missing}")
    return features


def _acc_close(a: st.Accumulator | None, b: st.Accumulator) -> bool:
    if a is None:
        return b["count"] == 0
    if a["count"] != b["count"]:
        return False
    std_a, std_b = np.sqrt(a["m2"] / a["count"]), np.sqrt(b["m2"] / b["count"])
    return all(
        np.shape(x) == np.shape(y) and np.allclose(x, y, rtol=1e-6, atol=1e-9)
        for x, y in ((a["mean"], b["mean"]), (std_a, std_b), (a["min"], b["min"]), (a["max"], b["max"]))
    )


def _stats_close(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        for field in ("mean", "std", "min", "max", "count"):
            x, y = a[key].get(field), b[key].get(field)
            if (
                x is None
                or y is None
                or np.shape(x) != np.shape(y)
                or not np.allclose(x, y, rtol=1e-9, atol=1e-12)
            ):
                return False
    return True


def _preview(values: np.ndarray, k: int = 8) -> str:
    values = np.asarray(values)
    text = ", ".join(str(v) for v in values[:k].tolist())
    return f"[{text}{', ...' if len(values) > k else ''}]"
