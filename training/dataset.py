"""A torch Dataset of training windows from a dreamrt episode store.

Each item is a dict of tensors: observation keys (To, ...), action keys (H, ...), windows and
edge padding as :class:`dreamrt.episodes.SequenceSampler`. Low-dim values come as float32.
Images (``observation.images.*``, stored HWC uint8) come as (To, C, H, W): float32 in [0, 1]
with ``image_format="float"``, or uint8 with ``image_format="uint8"`` (convert on the GPU).
Depth maps come as (To, 1, H, W) float32 in stored units. Values are not normalised: use
:meth:`EpisodeDataset.normalizer` (statistics over the whole store).

DataLoader workers: the dataset never pickles an open zarr handle. Each process opens the
store itself on first access (``__getstate__`` drops handles; a forked worker notices its new
pid and reopens). ``cache`` picks what is read into memory once, in the constructor:
``"lowdim"`` (default: everything but images/depth), ``"all"`` or ``"none"``.

Batches without a DataLoader: when every key is low-dim and cached, :meth:`EpisodeDataset.device_windows`
copies the arrays to a device once and gathers a whole batch of windows there with one indexing op
per key (:class:`DeviceWindows`). The windows are the same as ``__getitem__``'s, element for element,
without per-window Python, worker processes or host-to-device copies.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dreamrt.episodes.format import VISUAL_PREFIXES
from dreamrt.episodes.normalize import Normalizer
from dreamrt.episodes.reader import open_store
from dreamrt.episodes.sampler import SamplerConfig, SequenceSampler, split_episodes
from dreamrt.errors import UserError, choose
from dreamrt.policies.diffusion_policy import TASK_INDEX_KEY


@dataclass
class EpisodeDatasetConfig:
    path: str  # the episode store
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    split: str = "train"  # "train" | "val" | "all"
    val_ratio: float = 0.0  # fraction of episodes held out for "val" (seeded, by episode)
    seed: int = 0
    image_format: str = "float"  # "float": float32 in [0, 1]; "uint8": raw bytes
    cache: str = "lowdim"  # "lowdim" | "all" | "none": keys read into memory up front

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError("EpisodeDatasetConfig.path is empty: give the episode store to train on.")
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig(**self.sampler)
        choose("split", self.split, ("train", "val", "all"))
        choose("image_format", self.image_format, ("float", "uint8"))
        choose("cache", self.cache, ("lowdim", "all", "none"))
        if not 0.0 <= self.val_ratio < 1.0:
            raise UserError(f"val_ratio must be in [0, 1), got {self.val_ratio}.")
        if self.split == "val" and self.val_ratio == 0:
            raise UserError("split='val' needs val_ratio > 0 (e.g. 0.1).")


class EpisodeDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        cfg: EpisodeDatasetConfig,
        *,
        cached: dict[str, np.ndarray] | None = None,
        task_index_map: np.ndarray | None = None,
    ):
        """``cached``: in-memory arrays of this store already read by another split (every split
        holds all of the store's rows), taken instead of reading them again where they cover
        this store's current rows (they carry ``task_index_map`` already).

        ``task_index_map``: row i holds the index that the store's task i has in another task
        list (a model's instruction table built from another store), so windows carry indices
        into that list instead of the store's own."""
        self.cfg = cfg
        self._task_index_map = task_index_map
        store = open_store(cfg.path)
        self.features = store.features
        self.stats = store.stats
        self.num_episodes = store.num_episodes
        self.num_frames = store.num_frames  # rows past this (appended later) are never read
        val = split_episodes(store.num_episodes, cfg.val_ratio, cfg.seed)
        mask = {"train": ~val, "val": val, "all": np.ones_like(val)}[cfg.split]
        self.episode_mask = mask
        obs_keys = cfg.sampler.obs_keys
        if obs_keys is None:
            obs_keys = [k for k in store.keys if k.startswith("observation.")]
        keys = [*obs_keys, *cfg.sampler.action_keys]
        missing = [k for k in keys if k not in store.features]
        if missing:
            raise UserError(f"Keys {missing} are not in '{cfg.path}'. Stored keys: {store.keys}.")
        self._keys = keys
        # A remapped task_index lives in memory: the store's own column holds the old indices.
        wanted = [
            k
            for k in keys
            if _wants_cache(cfg.cache, k) or (k == TASK_INDEX_KEY and task_index_map is not None)
        ]
        lent = cached or {}
        self._cached = {
            k: lent[k] if k in lent and len(lent[k]) == self.num_frames else self._read(store, k)
            for k in wanted
        }
        self._handles: dict[str, Any] | None = None
        self._handles_pid = -1
        self.sampler = SequenceSampler(self._arrays(store), store.episode_ends, cfg.sampler, mask)

    def _read(self, store: Any, key: str) -> np.ndarray:
        values = store.read(key, 0, self.num_frames)
        if key == TASK_INDEX_KEY and self._task_index_map is not None:
            values = self._task_index_map[np.asarray(values, dtype=np.int64)]
        return values

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        window = self.sampler.sample(int(idx), self._arrays())
        return {key: self._to_tensor(key, value) for key, value in window.items()}

    def device_windows(
        self,
        device: torch.device | str,
        max_bytes: int | None = None,
        *,
        share: DeviceWindows | None = None,
    ) -> DeviceWindows | None:
        """All windows gathered on ``device`` (:class:`DeviceWindows`), or None when that cannot be
        done: a key is visual or not cached, or the arrays exceed ``max_bytes`` as float32.

        ``share`` (another split's windows, e.g. the training split's for validation) lends its
        device copy of every array this split holds too (:meth:`split_dataset` hands the
        in-memory arrays on), instead of a second copy on the device."""
        if any(k.startswith(VISUAL_PREFIXES) or k not in self._cached for k in self._keys):
            return None
        nbytes = sum(self._cached[k].size * 4 for k in self._keys)
        if max_bytes is not None and nbytes > max_bytes:
            return None
        return DeviceWindows(
            {k: self._cached[k] for k in self._keys},
            self.sampler.indices,
            self.sampler.obs_keys,
            self.sampler.action_keys,
            n_obs_steps=self.cfg.sampler.n_obs_steps,
            horizon=self.cfg.sampler.horizon,
            device=torch.device(device),
            share=share,
        )

    def split_dataset(self, split: str) -> EpisodeDataset:
        """The same store and settings with another split (e.g. "val" for validation), sharing this
        split's in-memory arrays rather than reading and holding the store a second time."""
        return EpisodeDataset(
            replace(self.cfg, split=split), cached=self._cached, task_index_map=self._task_index_map
        )

    def normalizer(self, modes: dict[str, str] | None = None) -> Normalizer:
        """Normaliser from the store's statistics (default: min-max for low-dim obs and actions)."""
        return Normalizer.from_stats(self.stats, modes)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = None  # never ship an open store to another process
        state["_handles_pid"] = -1
        sampler = copy.copy(self.sampler)
        sampler.arrays = {}
        state["sampler"] = sampler
        return state

    def _arrays(self, store: Any = None) -> dict[str, Any]:
        """Key -> array for this process: cached numpy arrays, zarr arrays for the rest."""
        if self._handles is None or self._handles_pid != os.getpid():
            store = store if store is not None else open_store(self.cfg.path)
            self._handles = {k: self._cached[k] if k in self._cached else store.array(k) for k in self._keys}
            self._handles_pid = os.getpid()
        return self._handles

    def _to_tensor(self, key: str, value: np.ndarray) -> torch.Tensor:
        if key.startswith("observation.images."):
            chw = value.transpose(
                0, 3, 1, 2
            )  # (To, C, H, W); numpy copies beat torch's threaded permute here
            if self.cfg.image_format == "uint8":
                return torch.from_numpy(np.ascontiguousarray(chw))
            return torch.from_numpy(chw.astype(np.float32) / np.float32(255.0))
        if key.startswith("observation.depth."):
            depth = value if value.ndim == 4 else value[..., None]  # (To, H, W, 1)
            return (
                torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))
                .permute(0, 3, 1, 2)
                .contiguous()
            )
        return torch.from_numpy(np.asarray(value, dtype=np.float32))


def _wants_cache(cache: str, key: str) -> bool:
    return cache == "all" or (cache == "lowdim" and not key.startswith(VISUAL_PREFIXES))


class DeviceWindows:
    """The windows of a low-dim dataset, gathered in batches on one device.

    ``batch(idx)`` returns what collating ``[dataset[i] for i in idx]`` returns (float32 values,
    obs keys (B, To, ...), action keys (B, H, ...)), computed where the arrays live: window
    position p of window i reads row ``buffer_start + clip(p - sample_start, 0, n - 1)`` of the
    concatenated episodes, the edge padding of :class:`~dreamrt.episodes.SequenceSampler`.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        indices: np.ndarray,
        obs_keys: list[str],
        action_keys: list[str],
        *,
        n_obs_steps: int,
        horizon: int,
        device: torch.device,
        share: DeviceWindows | None = None,
    ):
        self.device = device
        self.obs_keys = list(obs_keys)
        self.action_keys = list(action_keys)
        self.host_arrays = dict(arrays)
        # An array ``share`` was made from (the very same host array) is on this device already.
        lend = share.arrays if share is not None and share.device == device else {}
        self.arrays = {
            k: lend[k]
            if k in lend and share.host_arrays[k] is v
            else torch.as_tensor(np.asarray(v, dtype=np.float32), device=device)
            for k, v in arrays.items()
        }
        rows = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=device)  # (M, 4)
        self._buffer_start = rows[:, 0]
        self._last_row = rows[:, 1] - 1
        self._sample_start = rows[:, 2]
        self._obs_pos = torch.arange(n_obs_steps, device=device)
        self._act_pos = torch.arange(horizon, device=device)

    def __len__(self) -> int:
        return len(self._buffer_start)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = idx.to(self.device)
        start = self._buffer_start[idx, None]
        last = self._last_row[idx, None]
        offset = start - self._sample_start[idx, None]
        obs_rows = (offset + self._obs_pos).clamp(start, last)  # (B, To)
        act_rows = (offset + self._act_pos).clamp(start, last)  # (B, H)
        out = {k: self.arrays[k][obs_rows] for k in self.obs_keys}
        out.update({k: self.arrays[k][act_rows] for k in self.action_keys})
        return out
