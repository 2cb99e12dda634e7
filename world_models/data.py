"""World-model training data from an episode store, held in memory.

World models train on one camera at a small resolution (64x64 frames are 12 KB as uint8, so
100k frames fit in 1.2 GB) plus low-dim actions and states; reading them once beats random
access into zarr chunks every step. :func:`load_frames` reads whole episodes up to a frame
budget, resizing the camera images on the way in. :class:`ClipIndex` draws clips of T
consecutive frames that never cross an episode boundary.

Dimensions: F frames held, E episodes, T clip length, B batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dreamrt.episodes import open_store
from dreamrt.errors import UserError, did_you_mean
from dreamrt.world_models.tokenizer import images_to_tensor


@dataclass
class EpisodeFrames:
    """The first episodes of a store (as many as fit ``max_frames``), in memory."""

    frames: Tensor  # (F, 3, S, S) uint8
    lowdim: dict[str, np.ndarray]  # key -> (F, ...) float32
    episode_ends: np.ndarray  # (E,) int64, cumulative

    def images(self, rows: Tensor | np.ndarray) -> Tensor:
        """float (..., 3, S, S) in [0, 1] for frame rows of any shape."""
        return self.frames[torch.as_tensor(rows)].float().div_(255.0)


def load_frames(
    path: str,
    camera: str,
    image_size: int,
    lowdim_keys: list[str] | None = None,
    max_frames: int | None = None,
) -> EpisodeFrames:
    """Read ``camera`` (resized to ``image_size``) and ``lowdim_keys`` of whole episodes up to ``max_frames``."""
    store = open_store(path)
    keys = [camera, *(lowdim_keys or [])]
    for key in keys:
        if key not in store.features:
            raise UserError(
                f"Store '{path}' has no key '{key}'.{did_you_mean(key, store.keys)} Stored keys: {store.keys}."
            )
    if len(store.features[camera].shape) != 3 or store.features[camera].shape[-1] != 3:
        raise UserError(f"'{camera}' in '{path}' is not an RGB image (shape {store.features[camera].shape}).")
    ends = store.episode_ends
    if len(ends) == 0:
        raise UserError(f"Store '{path}' has no episodes yet.")
    if max_frames is not None:
        keep = max(1, int(np.searchsorted(ends, max_frames, side="right")))
        ends = ends[:keep]
    n = int(ends[-1])
    chunks = []
    for start in range(0, n, 1024):
        raw = store.read(camera, start, min(n, start + 1024))  # (f, H, W, 3) uint8
        chunks.append((images_to_tensor(raw, image_size) * 255.0).round_().to(torch.uint8))
    lowdim = {k: np.asarray(store.read(k, 0, n), dtype=np.float32) for k in lowdim_keys or []}
    return EpisodeFrames(torch.cat(chunks), lowdim, ends.astype(np.int64))


@dataclass
class LatentEpisodes:
    """Episodes with every frame encoded by a tokenizer and normalised actions / states: what the
    dynamics model trains (and is distilled) on."""

    frames: EpisodeFrames
    latents: Tensor  # (F, C, h, w) normalised latents
    actions: Tensor  # (F, A) normalised to [-1, 1]
    states: Tensor  # (F, S); (F, 0) for actions-only models
    normalizer: Any  # dreamrt.episodes.Normalizer of the action (and state) keys


@torch.no_grad()
def load_latent_episodes(
    path: str,
    tokenizer: Any,
    *,
    camera: str,
    action_key: str,
    state_key: str,
    max_frames: int | None = None,
    normalizer: dict[str, Any] | None = None,
) -> LatentEpisodes:
    """Read whole episodes (up to ``max_frames``), encode every frame with ``tokenizer`` and normalise
    actions / states: min-max over the store's stats, or with a given normaliser dict (a trained
    dynamics model's, so a student sees its teacher's units)."""
    lowdim = [action_key] + ([state_key] if state_key else [])
    data = load_frames(path, camera, tokenizer.config.image_size, lowdim_keys=lowdim, max_frames=max_frames)
    if normalizer is None:
        from dreamrt.episodes import Normalizer

        normalizer = Normalizer.from_stats(open_store(path).stats, {k: "min_max" for k in lowdim}).to_dict()
    return encode_episodes(data, tokenizer, action_key=action_key, state_key=state_key, normalizer=normalizer)


@torch.no_grad()
def encode_episodes(
    data: EpisodeFrames, tokenizer: Any, *, action_key: str, state_key: str, normalizer: dict[str, Any]
) -> LatentEpisodes:
    """Frames in memory -> :class:`LatentEpisodes`: every frame encoded, actions / states normalised
    with the normaliser dict."""
    from dreamrt.episodes import Normalizer

    norm = Normalizer.from_dict(normalizer)
    actions = torch.from_numpy(norm.normalize(action_key, data.lowdim[action_key])).float()
    states = (
        torch.from_numpy(norm.normalize(state_key, data.lowdim[state_key])).float()
        if state_key
        else torch.zeros(len(actions), 0)
    )
    latents = torch.cat(
        [
            tokenizer.encode(data.images(torch.arange(i, min(i + 256, len(data.frames)))))
            for i in range(0, len(data.frames), 256)
        ]
    )
    return LatentEpisodes(data, latents, actions, states, norm)


class ClipIndex:
    """Rows of T-frame clips inside episodes; ``episodes`` selects which episodes (e.g. a split)."""

    def __init__(self, episode_ends: np.ndarray, clip_frames: int, episodes: np.ndarray | None = None):
        starts = np.concatenate([[0], episode_ends[:-1]])
        chosen = np.arange(len(episode_ends)) if episodes is None else np.asarray(episodes)
        firsts = [np.arange(starts[e], episode_ends[e] - clip_frames + 1) for e in chosen]
        self.clip_frames = clip_frames
        self.starts = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
        if len(self.starts) == 0:
            raise UserError(
                f"No episode among the {len(chosen)} selected has {clip_frames} frames: lower the clip length or "
                f"record longer episodes."
            )

    def __len__(self) -> int:
        return len(self.starts)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, T) frame rows of random clips."""
        pick = torch.randint(len(self.starts), (batch_size,), generator=generator)
        return torch.as_tensor(self.starts)[pick].unsqueeze(1) + torch.arange(self.clip_frames)
