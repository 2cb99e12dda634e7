"""Per-feature affine normalisers built from store statistics, saved as JSON.

Each feature gets ``y = x * scale + offset`` with one (scale, offset) per statistic element
(per dimension for low-dim features, per channel for images: the parameters broadcast over
the trailing axes of ``x``):

- ``min_max``: [min, max] -> [-1, 1]; a constant dimension (max - min < eps) maps to 0.
- ``mean_std``: (x - mean) / std; a constant dimension (std < eps) maps to x - mean.
- ``identity``: unchanged.

Checkpoints save ``Normalizer.to_dict()`` as ``normalizer.json``. This module is numpy only;
torch code converts ``params(key)`` to tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.episodes.format import AUTO_FEATURES, VISUAL_PREFIXES
from dreamrt.errors import UserError, choose, did_you_mean

MODES = ("min_max", "mean_std", "identity")
NORMALIZER_FORMAT = "dreamrt.normalizer"
NORMALIZER_VERSION = 1


@dataclass(frozen=True)
class Affine:
    mode: str
    scale: np.ndarray  # float64, the statistic's shape
    offset: np.ndarray


def affine_from_stats(mode: str, stats: Mapping[str, Any], eps: float = 1e-6) -> Affine:
    """(scale, offset) for one feature from its {"mean", "std", "min", "max"}."""
    choose("normalisation mode", mode, MODES)
    if mode == "identity":
        shape = np.shape(stats["mean"]) if "mean" in stats else ()
        return Affine(mode, np.ones(shape), np.zeros(shape))
    if mode == "min_max":
        lo, hi = np.asarray(stats["min"], np.float64), np.asarray(stats["max"], np.float64)
        span = hi - lo
        constant = span < eps
        scale = np.where(constant, 1.0, 2.0 / np.where(constant, 1.0, span))
        offset = np.where(constant, -(lo + hi) / 2.0, -1.0 - lo * scale)
        return Affine(mode, scale, offset)
    mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
    constant = std < eps
    scale = np.where(constant, 1.0, 1.0 / np.where(constant, 1.0, std))
    return Affine(mode, scale, -mean * scale)


def default_modes(stats: Mapping[str, Any]) -> dict[str, str]:
    """min_max for every low-dim observation and action feature; images and the writer's columns
    (timestamp, indices) are left out (datasets scale images to [0, 1] themselves)."""
    return {
        key: "min_max" for key in stats if key not in AUTO_FEATURES and not key.startswith(VISUAL_PREFIXES)
    }


class Normalizer:
    """Normalise / unnormalise features by key."""

    def __init__(self, params: Mapping[str, Affine]):
        self._params = dict(params)

    @classmethod
    def from_stats(
        cls, stats: Mapping[str, Mapping[str, Any]], modes: Mapping[str, str] | None = None, eps: float = 1e-6
    ) -> Normalizer:
        """Build from ``EpisodeStore.stats``; ``modes`` maps key -> mode (default: :func:`default_modes`)."""
        modes = default_modes(stats) if modes is None else modes
        params = {}
        for key, mode in modes.items():
            if key not in stats:
                raise UserError(
                    f"No statistics for '{key}'.{did_you_mean(key, stats)} Available: {sorted(stats)}."
                )
            params[key] = affine_from_stats(mode, stats[key], eps)
        return cls(params)

    @property
    def keys(self) -> list[str]:
        return list(self._params)

    def params(self, key: str) -> Affine:
        if key not in self._params:
            raise UserError(
                f"The normaliser has no key '{key}'.{did_you_mean(key, self._params)} Keys: {self.keys}."
            )
        return self._params[key]

    def normalize(self, key: str, x: Any) -> np.ndarray:
        p = self.params(key)
        x = self._as_float(key, x, p)
        return x * p.scale.astype(x.dtype) + p.offset.astype(x.dtype)

    def unnormalize(self, key: str, y: Any) -> np.ndarray:
        p = self.params(key)
        y = self._as_float(key, y, p)
        return (y - p.offset.astype(y.dtype)) / p.scale.astype(y.dtype)

    def normalize_dict(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Normalise the keys this normaliser knows; pass the others through."""
        return {k: self.normalize(k, v) if k in self._params else v for k, v in batch.items()}

    def unnormalize_dict(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: self.unnormalize(k, v) if k in self._params else v for k, v in batch.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (float64 values survive JSON exactly)."""
        return {
            "format": NORMALIZER_FORMAT,
            "version": NORMALIZER_VERSION,
            "features": {
                key: {
                    "mode": p.mode,
                    "shape": list(p.scale.shape),
                    "scale": p.scale.tolist(),
                    "offset": p.offset.tolist(),
                }
                for key, p in self._params.items()
            },
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Normalizer:
        if not isinstance(obj, Mapping) or obj.get("format") != NORMALIZER_FORMAT:
            raise UserError(f"Not a dreamrt normaliser (expected format '{NORMALIZER_FORMAT}').")
        if obj.get("version") != NORMALIZER_VERSION:
            raise UserError(
                f"Normaliser version {obj.get('version')} is not supported (expected {NORMALIZER_VERSION})."
            )
        params = {}
        for key, p in obj["features"].items():
            choose("normalisation mode", p["mode"], MODES)
            scale, offset = np.asarray(p["scale"], np.float64), np.asarray(p["offset"], np.float64)
            if scale.shape != tuple(p["shape"]) or offset.shape != scale.shape or np.any(scale == 0):
                raise UserError(
                    f"Normaliser entry '{key}' is malformed (shape {p['shape']}, zero or ragged scale)."
                )
            params[key] = Affine(p["mode"], scale, offset)
        return cls(params)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Normalizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Normaliser file '{path}' does not exist.")
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"Normaliser file '{path}' is not valid JSON: {err}.") from None
        return cls.from_dict(obj)

    @staticmethod
    def _as_float(key: str, x: Any, p: Affine) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        n = p.scale.ndim
        if n and x.shape[x.ndim - n :] != p.scale.shape:
            raise UserError(
                f"Cannot normalise '{key}' of shape {x.shape}: its trailing axes must be {p.scale.shape}."
            )
        return x
