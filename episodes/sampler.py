"""Training windows over episodes, padded at episode edges as diffusion_policy's SequenceSampler.

A window is ``horizon`` consecutive frames of one episode. Windows may start up to
``pad_before`` frames before the episode and end up to ``pad_after`` frames after it; the
missing frames repeat the first / last frame. With the defaults (pad_before = To - 1,
pad_after = Ta - 1) every frame of an episode can be the current observation and every
action is predicted by some window.

Observation keys return only the first ``n_obs_steps`` frames of the window (To, ...) and only
those are read; action keys return the whole window (horizon, ...).

Dimension legend: To observation steps, H horizon, E episodes, M windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dreamrt.errors import UserError


@dataclass
class SamplerConfig:
    horizon: int = 16  # frames per window (H)
    n_obs_steps: int = 2  # observation history (To)
    n_action_steps: int = 8  # actions executed per prediction (Ta); sets the default pad_after
    pad_before: int | None = None  # None: n_obs_steps - 1
    pad_after: int | None = None  # None: n_action_steps - 1
    obs_keys: list[str] | None = None  # None: every observation.* key of the store
    action_keys: list[str] = field(default_factory=lambda: ["action"])

    def __post_init__(self) -> None:
        if self.horizon < 1 or self.n_obs_steps < 1 or self.n_action_steps < 1:
            raise UserError(
                f"horizon, n_obs_steps and n_action_steps must be >= 1, got {self.horizon}, "
                f"{self.n_obs_steps}, {self.n_action_steps}."
            )
        if self.n_obs_steps > self.horizon:
            raise UserError(f"n_obs_steps ({self.n_obs_steps}) cannot exceed horizon ({self.horizon}).")
        if (self.pad_before is not None and self.pad_before < 0) or (
            self.pad_after is not None and self.pad_after < 0
        ):
            raise UserError(f"pad_before/pad_after must be >= 0, got {self.pad_before}, {self.pad_after}.")
        overlap = set(self.obs_keys or ()) & set(self.action_keys)
        if overlap:
            raise UserError(f"Keys {sorted(overlap)} are listed both as observation and action keys.")

    @property
    def resolved_pad_before(self) -> int:
        pad = self.n_obs_steps - 1 if self.pad_before is None else self.pad_before
        return min(pad, self.horizon - 1)

    @property
    def resolved_pad_after(self) -> int:
        pad = self.n_action_steps - 1 if self.pad_after is None else self.pad_after
        return min(pad, self.horizon - 1)


def create_indices(
    episode_ends: np.ndarray,
    horizon: int,
    pad_before: int,
    pad_after: int,
    episode_mask: np.ndarray | None = None,
) -> np.ndarray:
    """(M, 4) int64 rows [buffer_start, buffer_end, sample_start, sample_end]: window rows
    [buffer_start, buffer_end) of the concatenated data land at window positions
    [sample_start, sample_end); positions before / after repeat the edge frame."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    mask = np.ones(len(ends), bool) if episode_mask is None else np.asarray(episode_mask, bool)
    assert len(mask) == len(ends)
    pad_before = min(max(pad_before, 0), horizon - 1)
    pad_after = min(max(pad_after, 0), horizon - 1)
    rows = []
    for i in np.flatnonzero(mask):
        start = int(ends[i - 1]) if i else 0
        length = int(ends[i]) - start
        offsets = np.arange(
            -pad_before, length - horizon + pad_after + 1, dtype=np.int64
        )  # window start in episode
        if len(offsets) == 0:
            continue
        buffer_start = np.maximum(offsets, 0) + start
        buffer_end = np.minimum(offsets + horizon, length) + start
        sample_start = buffer_start - (offsets + start)
        sample_end = horizon - ((offsets + horizon + start) - buffer_end)
        rows.append(np.stack([buffer_start, buffer_end, sample_start, sample_end], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)


def split_episodes(num_episodes: int, val_ratio: float, seed: int = 0) -> np.ndarray:
    """(E,) bool mask of validation episodes: round(E * val_ratio) of them, at least one when
    val_ratio > 0 and at least one training episode left; the same for the same seed."""
    if not 0.0 <= val_ratio < 1.0:
        raise UserError(f"val_ratio must be in [0, 1), got {val_ratio}.")
    val = np.zeros(num_episodes, bool)
    if val_ratio == 0 or num_episodes < 2:
        return val
    n_val = min(max(1, round(num_episodes * val_ratio)), num_episodes - 1)
    val[np.random.default_rng(seed).choice(num_episodes, size=n_val, replace=False)] = True
    return val


class SequenceSampler:
    """Windows over ``arrays`` (key -> array-like sliceable along time: numpy or zarr).

    ``episode_ends`` is the (E,) cumulative end row of each episode; ``episode_mask`` picks the
    episodes to sample (e.g. ``~split_episodes(...)`` for training).
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        episode_ends: np.ndarray,
        cfg: SamplerConfig,
        episode_mask: np.ndarray | None = None,
    ):
        obs_keys = (
            cfg.obs_keys if cfg.obs_keys is not None else [k for k in arrays if k.startswith("observation.")]
        )
        for key in [*obs_keys, *cfg.action_keys]:
            if key not in arrays:
                raise UserError(f"Sampler key '{key}' is not in the data; available: {sorted(arrays)}.")
        self.cfg = cfg
        self.arrays = arrays
        self.obs_keys: list[str] = list(obs_keys)
        self.action_keys: list[str] = list(cfg.action_keys)
        self.indices = create_indices(
            episode_ends, cfg.horizon, cfg.resolved_pad_before, cfg.resolved_pad_after, episode_mask
        )

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, idx: int, arrays: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Window ``idx``: obs keys (To, ...), action keys (H, ...). ``arrays`` overrides the
        source (e.g. handles a DataLoader worker opened itself)."""
        arrays = self.arrays if arrays is None else arrays
        buffer_start, buffer_end, sample_start, sample_end = (int(v) for v in self.indices[idx])
        out: dict[str, np.ndarray] = {}
        for key in self.obs_keys:
            out[key] = _window(
                arrays[key], buffer_start, buffer_end, sample_start, sample_end, self.cfg.n_obs_steps
            )
        for key in self.action_keys:
            out[key] = _window(
                arrays[key], buffer_start, buffer_end, sample_start, sample_end, self.cfg.horizon
            )
        return out

    def sample_many(self, idxs: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self.sample(i) for i in idxs]


def _window(
    array: Any, buffer_start: int, buffer_end: int, sample_start: int, sample_end: int, length: int
) -> np.ndarray:
    """First ``length`` positions of a padded window, reading only the rows they need."""
    # Window position p shows row buffer_start + clip(p - sample_start, 0, n_data - 1).
    n_data = buffer_end - buffer_start
    last = min(length - 1 - sample_start, n_data - 1)  # last data row the first `length` positions use
    rows = np.asarray(array[buffer_start : buffer_start + max(last, 0) + 1])  # (k, ...)
    pos = np.clip(np.arange(length) - sample_start, 0, len(rows) - 1)
    return rows[pos]  # fancy indexing copies: callers may modify the window in place
