"""Job `dreamrt episodes merge out=STORE sources=[A,B,...]`: several stores into one.

Recording scales by running independent recorders, each into its own store with its own seed
(one store has one writer); training reads one store. Merging appends every committed
episode of each source, in the order given, through the ordinary writer, so the result is a
store like any other: frame values, timestamps and instructions are copied unchanged, and
its statistics and task table are rebuilt from what was written.

The merge can be interrupted (Ctrl-C) and resumed: running the same command again finds the
episodes already in ``out``, checks that they are the sources' first episodes, and appends the
rest. An ``out`` that holds anything else is refused, never overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.episodes.format import is_visual
from dreamrt.episodes.reader import EpisodeStore, open_store
from dreamrt.episodes.writer import EpisodeWriter, create_store, open_writer
from dreamrt.errors import UserError
from dreamrt.jobs import JobResult


@dataclass
class MergeConfig:
    out: str  # the merged store: created, or resumed if an earlier merge of the same sources was cut short
    sources: list[str] = field(default_factory=list)  # stores to append, in this order
    progress: bool = True
    # Source episodes are copied in runs of about this many bytes, each one write per key and one
    # commit: bounded memory for image stores, and few commits for long low-dim stores.
    block_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if not self.out:
            raise UserError("episodes merge needs out=STORE, the store to write.")
        if not self.sources:
            raise UserError("episodes merge needs sources=[A,B,...], the stores to merge.")
        out = Path(self.out).resolve()
        if any(Path(s).resolve() == out for s in self.sources):
            raise UserError(f"out='{self.out}' is also one of the sources; write the merge to a new path.")
        if self.block_bytes < 1:
            raise UserError(f"block_bytes={self.block_bytes}; expected a positive number of bytes.")
        if len({Path(s).resolve() for s in self.sources}) != len(self.sources):
            raise UserError(
                f"sources={self.sources} names a store twice; each episode would be copied twice."
            )


def merge_stores(cfg: MergeConfig) -> tuple[dict[str, Any], bool]:
    """Append every source's episodes to ``cfg.out``; returns (summary, interrupted)."""
    from tqdm import tqdm

    sources = [open_store(path) for path in cfg.sources]
    _check_compatible(sources, cfg.sources)
    lengths = np.concatenate([s.episode_lengths for s in sources])
    writer, done = _open_out(cfg, sources, lengths)
    total = len(lengths)
    bar = tqdm(total=total, initial=done, unit="episode", desc="merge", disable=not cfg.progress)
    start_time = time.perf_counter()
    interrupted = False
    try:
        index = 0
        for source in sources:
            first = max(done - index, 0)
            for lo, hi in _blocks(source, first, cfg.block_bytes):
                _append_block(writer, source, lo, hi)
                bar.update(hi - lo)
            index += source.num_episodes
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        merged_episodes, merged_frames = writer.num_episodes, writer.num_frames
        writer.close()
    summary = {
        "out": cfg.out,
        "sources": {path: s.num_episodes for path, s in zip(cfg.sources, sources)},
        "episodes": merged_episodes,
        "frames": merged_frames,
        "resumed_after_episodes": done,
        "complete": merged_episodes == total,
        "wall_time_s": time.perf_counter() - start_time,
        "interrupted": interrupted,
    }
    return summary, interrupted


def run(cfg: MergeConfig, out_dir: Path | None = None) -> JobResult:
    summary, interrupted = merge_stores(cfg)
    if interrupted:
        print(
            f"Interrupted: '{cfg.out}' holds the first {summary['episodes']} episodes. "
            f"Run the same command again to append the rest."
        )
    else:
        print(
            f"Merged {len(cfg.sources)} stores into '{cfg.out}': {summary['episodes']} episodes, "
            f"{summary['frames']} frames."
        )
    return JobResult(summary=summary)


def _check_compatible(sources: list[EpisodeStore], paths: list[str]) -> None:
    first, first_path = sources[0], paths[0]
    for store, path in zip(sources[1:], paths[1:]):
        if store.fps != first.fps:
            raise UserError(
                f"'{path}' records at {store.fps} fps and '{first_path}' at {first.fps}; "
                f"a merged store has one rate."
            )
        mine, theirs = store.features, first.features
        if mine != theirs:
            differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            detail = "; ".join(
                f"{k}: {_describe(mine.get(k))} in '{path}', {_describe(theirs.get(k))} in '{first_path}'"
                for k in differing
            )
            raise UserError(f"The stores declare different features, so they cannot be merged: {detail}.")


def _describe(feature: Any) -> str:
    if feature is None:
        return "absent"
    return f"{feature.dtype}{list(feature.shape)}" + (
        f" names={list(feature.names)}" if feature.names else ""
    )


def _open_out(
    cfg: MergeConfig, sources: list[EpisodeStore], lengths: np.ndarray
) -> tuple[EpisodeWriter, int]:
    """The writer of ``cfg.out`` and how many source episodes it already holds."""
    first = sources[0]
    out = Path(cfg.out)
    if not out.exists():
        user = {k: f for k, f in first.features.items() if k in first.user_keys}
        image_chunk, lowdim_chunk = _chunk_frames(first)
        return (
            create_store(
                out,
                user,
                first.fps,
                robot_type=str(first.info.get("robot_type", "unknown")),
                chunk_frames=image_chunk,
                lowdim_chunk_frames=lowdim_chunk,
                flush_frames=image_chunk,  # add_episodes does not buffer; the writer only checks it
            ),
            0,
        )
    existing = open_store(out)
    if existing.features != first.features or existing.fps != first.fps:
        raise UserError(
            f"'{cfg.out}' exists and declares other features than the sources; choose a new out=."
        )
    done = existing.num_episodes
    merged = existing.episode_lengths
    if (
        done > len(lengths)
        or not np.array_equal(merged, lengths[:done])
        or not _last_matches(existing, sources)
    ):
        raise UserError(
            f"'{cfg.out}' exists but is not an unfinished merge of these sources (its {done} episodes are not "
            f"their first {done}); choose a new out=, or delete it to merge from scratch."
        )
    return open_writer(out, flush_frames=_chunk_frames(existing)[0]), done


def _chunk_frames(store: EpisodeStore) -> tuple[int, int]:
    """The store's chunk lengths in frames (images, other keys), create_store's defaults where it has none."""
    chunks = {is_visual(k, store.features[k]): store.array(k).chunks[0] for k in store.user_keys}
    return chunks.get(True, 16), chunks.get(False, 1024)


def _last_matches(existing: EpisodeStore, sources: list[EpisodeStore]) -> bool:
    """The last merged episode equals the source episode at the same position (values and tasks)."""
    index = existing.num_episodes - 1
    if index < 0:
        return True
    for source in sources:
        if index < source.num_episodes:
            mine, theirs = existing.get_episode(-1), source.get_episode(index)
            if mine.tasks != theirs.tasks:
                return False
            return all(np.array_equal(mine[k], theirs[k]) for k in existing.user_keys + ["timestamp"])
        index -= source.num_episodes
    return False


def _blocks(source: EpisodeStore, first: int, block_bytes: int) -> list[tuple[int, int]]:
    """Runs of whole episodes [lo, hi) from ``first`` on, each about ``block_bytes`` in memory."""
    frame_bytes = sum(
        int(np.prod(f.shape, dtype=np.int64)) * np.dtype(f.dtype).itemsize for f in source.features.values()
    )
    max_frames = max(block_bytes // max(frame_bytes, 1), 1)
    lengths = source.episode_lengths
    blocks, lo, frames = [], first, 0
    for e in range(first, source.num_episodes):
        if e > lo and frames + lengths[e] > max_frames:
            blocks.append((lo, e))
            lo, frames = e, 0
        frames += int(lengths[e])
    if lo < source.num_episodes:
        blocks.append((lo, source.num_episodes))
    return blocks


def _append_block(writer: EpisodeWriter, source: EpisodeStore, lo: int, hi: int) -> None:
    """Episodes [lo, hi) of ``source`` (contiguous rows) in one write and one commit."""
    starts, ends = source.episode_starts, source.episode_ends
    first_row, stop_row = int(starts[lo]), int(ends[hi - 1])
    columns = {k: source.read(k, first_row, stop_row) for k in [*source.user_keys, "task_index", "timestamp"]}
    writer.add_episodes(columns, ends[lo:hi] - starts[lo:hi], source.tasks)
