"""dreamrt.episodes: the zarr episode store.

Write with :func:`create_store` / :func:`open_writer`, read with :func:`open_store`, sample
training windows with :class:`SequenceSampler`, normalise with :class:`Normalizer`. The
on-disk format and its guarantees are described in docs/episodes.md and in
``dreamrt.episodes.format``. numpy and zarr only: no torch here.
"""

from dreamrt.episodes.format import Feature
from dreamrt.episodes.normalize import Normalizer
from dreamrt.episodes.reader import Episode, EpisodeStore, open_store
from dreamrt.episodes.sampler import SamplerConfig, SequenceSampler, create_indices, split_episodes
from dreamrt.episodes.writer import EpisodeWriter, create_store, open_writer

__all__ = [
    "Episode",
    "EpisodeStore",
    "EpisodeWriter",
    "Feature",
    "Normalizer",
    "SamplerConfig",
    "SequenceSampler",
    "create_indices",
    "create_store",
    "open_store",
    "open_writer",
    "split_episodes",
]
