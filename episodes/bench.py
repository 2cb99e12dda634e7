"""Job `dreamrt bench episodes`: episode store write and training-window read throughput.

Write: episodes of ``cameras`` synthetic ``image_size`` x ``image_size`` RGB cameras plus
state and action, through the real writer (validation, statistics, flushes, commits); frames
per second and the multiple of real time at ``fps``.

Read: the same fixed list of training windows (To = n_obs_steps observation frames, horizon
actions) through :class:`dreamrt.training.dataset.EpisodeDataset` and a torch DataLoader with
``workers`` workers, once reading the zarr store and once from an in-memory numpy copy of it
(``cache="all"``), for low-dim observations only and with images. The clock starts when the
first batch arrives, so worker start-up is excluded.

torch is imported inside ``run`` only (the dataset lives in dreamrt.training).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dreamrt.episodes.writer import create_store
from dreamrt.errors import UserError
from dreamrt.jobs import JobResult


@dataclass
class BenchEpisodesConfig:
    episodes: int = 20
    frames_per_episode: int = 150
    image_size: int = 96
    cameras: int = 2
    state_dim: int = 10
    action_dim: int = 10
    fps: float = 30.0
    batch_size: int = 64
    workers: int = 2
    batches: int = 30  # timed batches per read case (after one warm-up batch)
    horizon: int = 16
    n_obs_steps: int = 2
    seed: int = 0
    keep_store: bool = False  # keep <out_dir>/bench.zarr after the run

    def __post_init__(self) -> None:
        positive = (
            "episodes",
            "frames_per_episode",
            "image_size",
            "batch_size",
            "batches",
            "horizon",
            "n_obs_steps",
        )
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if (
            bad
            or self.cameras < 0
            or self.workers < 0
            or self.fps <= 0
            or self.state_dim < 1
            or self.action_dim < 1
        ):
            raise UserError(
                f"bench episodes: sizes must be positive (cameras, workers >= 0); got {', '.join(bad) or self}."
            )


def run(cfg: BenchEpisodesConfig, out_dir: Path | None = None) -> JobResult:
    tmp = None
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix="dreamrt-bench-episodes-")
        out_dir = Path(tmp)
    path = Path(out_dir) / "bench.zarr"
    try:
        rows = [_bench_write(cfg, path)]
        rows += _bench_reads(cfg, path)
    finally:
        if tmp is not None or not cfg.keep_store:
            shutil.rmtree(path, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(format_table(rows, cfg))
    return JobResult(summary={"rows": rows})


def _camera_frames(n: int, size: int, camera: int) -> np.ndarray:
    """(n, size, size, 3) uint8 renders-like frames: a smooth background and a moving block."""
    yy, xx = np.mgrid[0:size, 0:size]
    background = np.stack(
        [np.full_like(xx, 90 + 40 * camera), (yy * 255 // size), 60 + xx * 128 // size], axis=-1
    ).astype(np.uint8)
    frames = np.repeat(background[None], n, axis=0)
    block = max(2, size // 6)
    for t in range(n):
        cx = int((size - block) * (0.5 + 0.45 * np.sin(2 * np.pi * t / n)))
        cy = int((size - block) * (0.5 + 0.45 * np.cos(2 * np.pi * t / n + camera)))
        frames[t, cy : cy + block, cx : cx + block] = (220, 40, 40)
    return frames


def _bench_write(cfg: BenchEpisodesConfig, path: Path) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed)
    bank = 64
    cams = {f"observation.images.cam{c}": _camera_frames(bank, cfg.image_size, c) for c in range(cfg.cameras)}
    features = {
        "observation.state": {"dtype": "float32", "shape": [cfg.state_dim]},
        "action": {"dtype": "float32", "shape": [cfg.action_dim]},
        **{k: {"dtype": "uint8", "shape": [cfg.image_size, cfg.image_size, 3]} for k in cams},
    }
    total = cfg.episodes * cfg.frames_per_episode
    states = rng.standard_normal((cfg.frames_per_episode, cfg.state_dim)).astype(np.float32)
    actions = rng.standard_normal((cfg.frames_per_episode, cfg.action_dim)).astype(np.float32)
    start = time.perf_counter()
    with create_store(path, features, cfg.fps, robot_type="bench", overwrite=True) as writer:
        for _ in tqdm(range(cfg.episodes), desc="write episodes", leave=False):
            for t in range(cfg.frames_per_episode):
                frame = {"observation.state": states[t], "action": actions[t]}
                frame.update({k: v[t % bank] for k, v in cams.items()})
                writer.add_frame(frame, task="bench task")
            writer.end_episode()
    seconds = time.perf_counter() - start
    return {
        "case": f"write ({cfg.cameras} cams {cfg.image_size}px + state)",
        "source": "zarr",
        "workers": 0,
        "items": total,
        "seconds": seconds,
        "per_s": total / seconds,
        "x_real_time": total / cfg.fps / seconds,
    }


def _bench_reads(cfg: BenchEpisodesConfig, path: Path) -> list[dict[str, Any]]:
    import torch  # noqa: PLC0415 - heavy, only this job needs it

    from dreamrt.episodes.sampler import SamplerConfig
    from dreamrt.training.dataset import EpisodeDataset, EpisodeDatasetConfig

    cams = [f"observation.images.cam{c}" for c in range(cfg.cameras)]
    cases = [("low-dim obs", ["observation.state"])]
    if cams:
        cases.append(("obs with images", ["observation.state", *cams]))
    rows = []
    n_windows = (cfg.batches + 1) * cfg.batch_size
    for case, obs_keys in cases:
        sources = [("zarr", "none"), ("numpy in memory", "all")]
        if len(obs_keys) > 1:
            sources.insert(1, ("zarr images, low-dim cached", "lowdim"))
        per_s_memory = None
        case_rows = []
        for source, cache in sources:
            sampler = SamplerConfig(horizon=cfg.horizon, n_obs_steps=cfg.n_obs_steps, obs_keys=obs_keys)
            ds = EpisodeDataset(
                EpisodeDatasetConfig(path=str(path), sampler=sampler, split="all", cache=cache)
            )
            order = np.random.default_rng(cfg.seed).permutation(len(ds))
            order = np.resize(order, n_windows).tolist()  # the same windows for every source
            loader = torch.utils.data.DataLoader(
                ds, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.workers
            )
            it = iter(loader)
            next(it)  # warm-up: worker start-up and first reads are not timed
            start = time.perf_counter()
            count = 0
            for batch in tqdm(it, total=cfg.batches, desc=f"read {case} / {source}", leave=False):
                count += len(batch["action"])
            seconds = time.perf_counter() - start
            row = {
                "case": f"read windows: {case}",
                "source": source,
                "workers": cfg.workers,
                "items": count,
                "seconds": seconds,
                "per_s": count / seconds,
                "ms_per_batch": 1000 * seconds / max(1, cfg.batches),
            }
            if cache == "all":
                per_s_memory = row["per_s"]
            case_rows.append(row)
            del it, loader
        for row in case_rows:
            row["vs_memory"] = row["per_s"] / per_s_memory if per_s_memory else None
        rows += case_rows
    return rows


def format_table(rows: list[dict[str, Any]], cfg: BenchEpisodesConfig) -> str:
    lines = [
        f"bench episodes: {cfg.episodes} episodes x {cfg.frames_per_episode} frames, {cfg.cameras} cameras "
        f"{cfg.image_size}x{cfg.image_size}, state {cfg.state_dim}, action {cfg.action_dim}; windows To={cfg.n_obs_steps} "
        f"H={cfg.horizon}, batch {cfg.batch_size}, {cfg.workers} DataLoader workers",
        f"{'case':42s} {'source':30s} {'workers':>7s} {'items/s':>10s} {'ms/batch':>9s} {'vs memory':>9s} {'x real time':>11s}",
    ]
    for r in rows:
        ms = f"{r['ms_per_batch']:.1f}" if "ms_per_batch" in r else "-"
        vs = f"{r['vs_memory']:.2f}x" if r.get("vs_memory") else "-"
        rt = f"{r['x_real_time']:.1f}x" if "x_real_time" in r else "-"
        lines.append(
            f"{r['case']:42s} {r['source']:30s} {r['workers']:>7d} {r['per_s']:>10.0f} {ms:>9s} {vs:>9s} {rt:>11s}"
        )
    return "\n".join(lines)
