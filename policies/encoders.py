"""Observation encoder for Diffusion Policy: an observation dict -> one feature vector per step.

    ObservationEncoder(config)(obs) -> (B, To, O), the ``obs_features`` input of DP-T.

Per observation step the feature vector is the concatenation, in this order, of
- the low-dim keys (``observation.state``, ``observation.environment_state``, ...), already
  normalised by the dataset / policy, passed through unchanged, except the dimensions
  ``lowdim_angles`` names as angles: those are dropped and their (sin, cos) follow the key's
  other dimensions (the raw angle is recovered from the normaliser's affine, which the policy
  hands over with :meth:`ObservationEncoder.set_lowdim_affine`);
- with ``lowdim_relative``, positions relative to a reference position (e.g. each block minus
  the gripper), in metres times ``relative_scale``;
- one ``image_feature_dim`` vector per camera (``observation.images.<camera>``): a small
  ResNet-18-like trunk (basic blocks, GroupNorm instead of BatchNorm, trained from scratch as
  Diffusion Policy does, since no pretrained weights are reachable here), then spatial softmax
  (keypoints) or global average pooling, then a Linear. Random crop while training, centre
  crop in eval; one crop offset per sample, shared by its To frames, so the crop never looks
  like camera motion between steps;
- the instruction embedding (384-d, :mod:`dreamrt.policies.language`) through a Linear, the same
  for every step;
and optionally a final Linear to ``output_dim``.

Images may come as (B, To, 3, H, W) (the dataset: float in [0, 1] or uint8) or (B, To, H, W, 3)
uint8 (the store and the env); the layout is read off the configured size. The language input
is either ``task`` (B instruction strings, embedded by the frozen sentence encoder) or
``task_embedding`` (B, 384) precomputed. :func:`export_onnx` exports the tensor path.

Dimensions: B batch, To observation steps, N = B*To frames, C channels, H/W image size,
K keypoints, O output feature dim.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamrt.errors import UserError, choose
from dreamrt.policies.language import EMBED_DIM, SentenceEncoder

IMAGE_PREFIX = "observation.images."
TASK_KEY = "task"  # (B,) instruction strings
TASK_EMBEDDING_KEY = "task_embedding"  # (B, 384) float, precomputed instruction embeddings
GROUP_CHANNELS = 16  # channels per GroupNorm group (Diffusion Policy's num_features // 16)


# ---------------------------------------------------------------------------- helpers


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // GROUP_CHANNELS), channels)


def random_crop(images: Tensor, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """(B, To, C, H, W) -> (B, To, C, height, width); one random offset per sample, shared over To."""
    b, _, _, h, w = images.shape
    top = torch.randint(0, h - height + 1, (b,), generator=generator, device=images.device)
    left = torch.randint(0, w - width + 1, (b,), generator=generator, device=images.device)
    rows = top[:, None] + torch.arange(height, device=images.device)  # (B, height)
    cols = left[:, None] + torch.arange(width, device=images.device)  # (B, width)
    batch = torch.arange(b, device=images.device)[:, None, None]
    spatial_first = images.permute(0, 3, 4, 1, 2)  # (B, H, W, To, C): index B, H, W in one gather
    crops = spatial_first[batch, rows[:, :, None], cols[:, None, :]]  # (B, height, width, To, C)
    return crops.permute(0, 3, 4, 1, 2)


def center_crop(images: Tensor, height: int, width: int) -> Tensor:
    """(..., H, W) -> (..., height, width), the middle (offsets rounded down, as torchvision)."""
    h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top : top + height, left : left + width]


# ---------------------------------------------------------------------------- blocks


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm: conv3x3-GN-ReLU-conv3x3-GN + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _gn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _gn(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _gn(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class Trunk(nn.Module):
    """Stem conv3x3/2 then one stage per entry of ``blocks``, each halving H and W, doubling C.

    Every stage downsamples (ResNet-18's first stage does not, but it also starts at 1/4 of a
    224 image): an 88x88 crop ends at 3x3 after four stages, 6x6 after three.
    """

    def __init__(self, width: int, blocks: Sequence[int]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), _gn(width), nn.ReLU())
        layers: list[nn.Module] = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            layers += [BasicBlock(c_in, c_out, 2), *(BasicBlock(c_out, c_out, 1) for _ in range(n - 1))]
            c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, C, H', W')
        return self.stages(self.stem(x))


class SpatialSoftmax(nn.Module):
    """Keypoints: 1x1 conv to K maps, softmax over space, expected (x, y) in [-1, 1] -> (N, 2K) -> Linear."""

    def __init__(self, channels: int, height: int, width: int, keypoints: int, out_dim: int):
        super().__init__()
        self.keypoints = nn.Conv2d(channels, keypoints, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer(
            "grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], 1), persistent=False
        )  # (HW, 2)
        self.proj = nn.Linear(2 * keypoints, out_dim)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H', W') -> (N, out_dim)
        attention = torch.softmax(self.keypoints(x).flatten(2), dim=-1)  # (N, K, H'W')
        return self.proj((attention @ self.grid).flatten(1))  # (N, K, 2) -> (N, 2K)


class AvgPool(nn.Module):
    """Global average pooling -> Linear."""

    def __init__(self, channels: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H', W') -> (N, out_dim)
        return self.proj(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------- config


@dataclass
class CameraConfig:
    name: str  # the key is observation.images.<name>
    height: int = 96
    width: int = 96
    # Random crop size in training, centre crop in eval (e.g. 96 -> 88); None: the full image.
    crop_height: int | None = None
    crop_width: int | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str) or "." in self.name:
            raise UserError(
                f"CameraConfig.name must be a camera name such as 'static' (no dots), got {self.name!r}; "
                f"the image key is '{IMAGE_PREFIX}<name>'."
            )
        for attr in ("height", "width"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 8:
                raise UserError(f"Camera '{self.name}': {attr} must be an int >= 8, got {value!r}.")
        for attr, full in (("crop_height", self.height), ("crop_width", self.width)):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, int) or not 8 <= value <= full):
                raise UserError(
                    f"Camera '{self.name}': {attr} must be an int in 8..{full} (the image size) or None for no "
                    f"crop, got {value!r}. A crop of ~90% of the size is typical (96 -> 88)."
                )

    @property
    def key(self) -> str:
        return IMAGE_PREFIX + self.name

    @property
    def crop(self) -> tuple[int, int]:
        return (self.crop_height or self.height, self.crop_width or self.width)


@dataclass
class ObsEncoderConfig:
    # Low-dim inputs, concatenated as given (normalisation happens before the encoder).
    lowdim_keys: list[str] = field(
        default_factory=lambda: ["observation.state", "observation.environment_state"]
    )
    lowdim_dims: list[int] = field(default_factory=lambda: [15, 24])
    # Per low-dim key, the indices of its dimensions that are angles in radians ([] or no entry:
    # none; when given, one list per key). Each goes in as (sin, cos): CALVIN's Euler angles
    # wrap at +-pi, and the gripper pointing down has a roll of about pi, so min-max
    # normalisation turns a 0.01 rad turn across the wrap into a jump from -1 to +1.
    lowdim_angles: list[list[int]] = field(default_factory=list)
    # Positions also fed relative to a reference position, in metres times relative_scale: the
    # first entry is the reference, each further one a point, all "key:index" of 3 consecutive
    # dimensions (e.g. each block relative to the gripper). A target then arrives as the
    # displacement the actions must produce rather than as two absolute positions, each
    # min-max normalised over its own range.
    lowdim_relative: list[str] = field(default_factory=list)
    relative_scale: float = 10.0  # 10 cm -> 1.0
    cameras: list[CameraConfig] = field(default_factory=list)
    shared_trunk: bool = False  # one CNN trunk for all cameras (pooling heads stay per camera)
    cnn_width: int = 32  # channels of the stem and first stage; stage i has cnn_width * 2**i
    cnn_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # basic blocks per stage (ResNet-18)
    pool: str = "spatial_softmax"  # "spatial_softmax" | "avg"
    keypoints: int = 32  # K, for spatial softmax
    image_feature_dim: int = 64  # features per camera
    use_language: bool = False
    language_dim: int = 64  # the 384-d instruction embedding is projected to this
    output_dim: int | None = None  # None: the concatenation as is; else a final Linear to this width

    def __post_init__(self) -> None:
        self.cameras = [CameraConfig(**c) if isinstance(c, Mapping) else c for c in self.cameras]
        if len(self.lowdim_keys) != len(self.lowdim_dims):
            raise UserError(
                f"ObsEncoderConfig.lowdim_keys ({len(self.lowdim_keys)}: {self.lowdim_keys}) and lowdim_dims "
                f"({len(self.lowdim_dims)}: {self.lowdim_dims}) must have the same length, one dim per key."
            )
        for key, dim in zip(self.lowdim_keys, self.lowdim_dims):
            if not key.startswith("observation.") or key.startswith(IMAGE_PREFIX):
                raise UserError(
                    f"Low-dim key '{key}' must be an 'observation.*' key that is not an image, "
                    "e.g. 'observation.state'. Images go in `cameras`."
                )
            if not isinstance(dim, int) or dim <= 0:
                raise UserError(f"lowdim_dims for '{key}' must be a positive int, got {dim!r}.")
        self.lowdim_angles = [list(a) for a in self.lowdim_angles]
        if self.lowdim_angles and len(self.lowdim_angles) != len(self.lowdim_keys):
            raise UserError(
                f"ObsEncoderConfig.lowdim_angles has {len(self.lowdim_angles)} lists but there are "
                f"{len(self.lowdim_keys)} low-dim keys {self.lowdim_keys}; give one list of angle indices per "
                "key ([] for a key without angles), or lowdim_angles=[] for none."
            )
        self.lowdim_relative = [str(e) for e in self.lowdim_relative]
        if len(self.lowdim_relative) == 1:
            raise UserError(
                f"lowdim_relative={self.lowdim_relative} names only the reference; list the reference, then "
                "the positions to express relative to it (or [] for none)."
            )
        self.relative_slices()  # validates the entries
        if not self.relative_scale > 0:
            raise UserError(f"relative_scale must be > 0, got {self.relative_scale!r}.")
        for key, dim, angles in zip(self.lowdim_keys, self.lowdim_dims, self.lowdim_angles):
            if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < dim for i in angles) or len(
                set(angles)
            ) != len(angles):
                raise UserError(
                    f"lowdim_angles for '{key}' is {angles}; expected distinct indices in [0, {dim}) of its "
                    "dimensions that hold angles in radians."
                )
        names = [c.name for c in self.cameras]
        if len(set(names)) != len(names) or len(set(self.lowdim_keys)) != len(self.lowdim_keys):
            raise UserError(
                f"Duplicate inputs: cameras {names}, low-dim keys {self.lowdim_keys}. List each once."
            )
        if not (self.lowdim_keys or self.cameras or self.use_language):
            raise UserError("ObsEncoderConfig has no inputs: give lowdim_keys, cameras or use_language=True.")
        choose("pool", self.pool, ("spatial_softmax", "avg"))
        if not isinstance(self.cnn_width, int) or self.cnn_width <= 0 or self.cnn_width % GROUP_CHANNELS:
            raise UserError(
                f"cnn_width must be a positive multiple of {GROUP_CHANNELS} (GroupNorm groups of "
                f"{GROUP_CHANNELS} channels), got {self.cnn_width!r}. Try 32."
            )
        if not self.cnn_blocks or not all(isinstance(n, int) and n >= 1 for n in self.cnn_blocks):
            raise UserError(
                f"cnn_blocks must list >= 1 block per stage, e.g. [2, 2, 2, 2]; got {self.cnn_blocks!r}."
            )
        for name in ("keypoints", "image_feature_dim", "language_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"ObsEncoderConfig.{name} must be a positive int, got {value!r}.")
        if self.output_dim is not None and (not isinstance(self.output_dim, int) or self.output_dim <= 0):
            raise UserError(
                f"output_dim must be a positive int or None (no projection), got {self.output_dim!r}."
            )
        for cam in self.cameras:
            h, w = cam.crop
            if min(h, w) < 2 ** (len(self.cnn_blocks) + 1):
                raise UserError(
                    f"Camera '{cam.name}': a {h}x{w} crop is too small for {len(self.cnn_blocks)} stages "
                    f"(each halves the size). Use fewer cnn_blocks entries or a larger image."
                )

    def relative_slices(self) -> list[tuple[int, int]]:
        """``lowdim_relative`` as (low-dim key position, first index) pairs, reference first."""
        out = []
        for entry in self.lowdim_relative:
            key, _, index = str(entry).rpartition(":")
            if key not in self.lowdim_keys or not index.isdigit():
                raise UserError(
                    f"lowdim_relative entry {entry!r} must be 'key:index' with key one of {self.lowdim_keys}, "
                    "e.g. 'observation.state:0' (three dimensions from that index hold a position)."
                )
            i = self.lowdim_keys.index(key)
            if int(index) + 3 > self.lowdim_dims[i]:
                raise UserError(
                    f"lowdim_relative entry {entry!r}: '{key}' has {self.lowdim_dims[i]} dimensions, so a "
                    f"position (3 of them) starts at most at index {self.lowdim_dims[i] - 3}."
                )
            out.append((i, int(index)))
        return out

    def angles_of(self, i: int) -> list[int]:
        """The angle indices of the i-th low-dim key ([] when it has none)."""
        return self.lowdim_angles[i] if self.lowdim_angles else []

    @property
    def concat_dim(self) -> int:
        return (
            sum(self.lowdim_dims)
            + sum(len(a) for a in self.lowdim_angles)  # an angle becomes (sin, cos)
            + 3 * max(0, len(self.lowdim_relative) - 1)
            + len(self.cameras) * self.image_feature_dim
            + (self.language_dim if self.use_language else 0)
        )

    def feature_names(self) -> list[str]:
        """One name per column of the concatenated features (``concat_dim`` of them), in order.

        Two encoders whose names agree feed a column the same quantity, which is what lets a
        warm start carry weights over to an encoder with more inputs (``dreamrt train init_from=``).
        """
        names: list[str] = []
        for i, (key, dim) in enumerate(zip(self.lowdim_keys, self.lowdim_dims)):
            angles = self.angles_of(i)
            names += [f"{key}[{j}]" for j in range(dim) if j not in angles]
            names += [f"sin {key}[{j}]" for j in angles] + [f"cos {key}[{j}]" for j in angles]
        if self.lowdim_relative:
            reference, *points = self.lowdim_relative
            names += [
                f"({point} - {reference})[{c}] x {self.relative_scale:g}"
                for point in points
                for c in range(3)
            ]
        for cam in self.cameras:
            names += [f"{cam.key} feature {c}" for c in range(self.image_feature_dim)]
        if self.use_language:
            names += [f"instruction feature {c}" for c in range(self.language_dim)]
        return names

    @property
    def obs_feature_dim(self) -> int:
        """O: the width of one step's features (DPTConfig.obs_dim)."""
        return self.output_dim if self.output_dim is not None else self.concat_dim

    @property
    def input_keys(self) -> list[str]:
        """Tensor inputs in the order of :meth:`ObservationEncoder.forward_tensors`."""
        return [
            *self.lowdim_keys,
            *(c.key for c in self.cameras),
            *([TASK_EMBEDDING_KEY] if self.use_language else []),
        ]


# ---------------------------------------------------------------------------- model


class ObservationEncoder(nn.Module):
    """Observation dict -> (B, To, O) features for DP-T. See the module docstring for the layout."""

    def __init__(self, config: ObsEncoderConfig, sentence_encoder: SentenceEncoder | None = None):
        super().__init__()
        self.config = config
        n_trunks = 1 if config.shared_trunk else len(config.cameras)
        self.trunks = nn.ModuleList(Trunk(config.cnn_width, config.cnn_blocks) for _ in range(n_trunks))
        self.pools = nn.ModuleList(self._pool(cam) for cam in config.cameras)
        self.language = nn.Linear(EMBED_DIM, config.language_dim) if config.use_language else None
        self.out = nn.Linear(config.concat_dim, config.output_dim) if config.output_dim is not None else None
        # Not a submodule: frozen, shared, and its weights stay out of this module's state_dict.
        self.sentence_encoder = sentence_encoder
        self._relative = config.relative_slices()  # (key position, first index), reference first
        # Angles and relative positions are computed from raw values, read back through the
        # normaliser's affine of the keys that hold them (identity until set_lowdim_affine; not
        # saved, as normalizer.json is the source). Per key with angles: the dimensions kept.
        self._needs_raw = {i for i in range(len(config.lowdim_keys)) if config.angles_of(i)}
        self._needs_raw |= {i for i, _ in self._relative}
        for i, dim in enumerate(config.lowdim_dims):
            if i in self._needs_raw:
                self.register_buffer(f"_lowdim_scale_{i}", torch.ones(dim), persistent=False)
                self.register_buffer(f"_lowdim_offset_{i}", torch.zeros(dim), persistent=False)
            angles = config.angles_of(i)
            if angles:
                keep = [j for j in range(dim) if j not in angles]
                self.register_buffer(f"_keep_{i}", torch.tensor(keep, dtype=torch.long), persistent=False)
                self.register_buffer(f"_angle_{i}", torch.tensor(angles, dtype=torch.long), persistent=False)

    def set_lowdim_affine(self, key: str, scale: Any, offset: Any) -> None:
        """The affine ``y = x * scale + offset`` (per dimension, or scalar) the low-dim input ``key``
        arrives normalised with, so angles and positions can be read back in their own units."""
        if key not in self.config.lowdim_keys:
            raise UserError(f"'{key}' is not a low-dim input of this encoder ({self.config.lowdim_keys}).")
        i = self.config.lowdim_keys.index(key)
        if i not in self._needs_raw:  # the key passes through as it comes
            return
        dim = self.config.lowdim_dims[i]
        for name, value in (("scale", scale), ("offset", offset)):
            full = torch.as_tensor(value, dtype=torch.float32).flatten()
            if full.numel() == 1:
                full = full.expand(dim)
            if full.numel() != dim:
                raise UserError(f"The {name} for '{key}' has {full.numel()} values; expected {dim} (or 1).")
            buffer = getattr(self, f"_lowdim_{name}_{i}")
            buffer.copy_(full.to(buffer.device))

    def _raw(self, i: int, x: Tensor) -> Tensor:
        """The i-th low-dim input back in its own units (the inverse of its normalisation)."""
        return (x - getattr(self, f"_lowdim_offset_{i}")) / getattr(self, f"_lowdim_scale_{i}")

    def _pool(self, cam: CameraConfig) -> nn.Module:
        channels = self.config.cnn_width * 2 ** (len(self.config.cnn_blocks) - 1)
        if self.config.pool == "avg":
            return AvgPool(channels, self.config.image_feature_dim)
        h, w = cam.crop
        for _ in range(len(self.config.cnn_blocks) + 1):  # stem + stages: conv3x3/2 with padding 1
            h, w = (h + 1) // 2, (w + 1) // 2
        return SpatialSoftmax(channels, h, w, self.config.keypoints, self.config.image_feature_dim)

    def _trunk(self, i: int) -> nn.Module:
        return self.trunks[0 if self.config.shared_trunk else i]

    def forward(self, obs: Mapping[str, Any]) -> Tensor:
        """obs: the configured keys, plus ``task`` (B strings) or ``task_embedding`` (B, 384) with language."""
        missing = [k for k in self.config.input_keys if k != TASK_EMBEDDING_KEY and k not in obs]
        if missing:
            hints = "".join(
                f" '{close[0]}' looks like a misspelling of '{k}'."
                for k in missing
                if (close := difflib.get_close_matches(k, [str(o) for o in obs], n=1, cutoff=0.8))
            )
            raise UserError(
                f"Observation lacks {missing}; it has {sorted(obs)}.{hints} Provide those keys or change "
                "ObsEncoderConfig (lowdim_keys / cameras)."
            )
        tensors = [obs[k] for k in self.config.input_keys if k != TASK_EMBEDDING_KEY]
        if self.config.use_language:
            tensors.append(self.task_embedding(obs))
        return self.forward_tensors(*tensors)

    def task_embedding(self, obs: Mapping[str, Any]) -> Tensor:
        """(B, 384): ``task_embedding`` if given, else ``task`` strings through the sentence encoder."""
        if TASK_EMBEDDING_KEY in obs:
            return obs[TASK_EMBEDDING_KEY]
        if TASK_KEY not in obs:
            raise UserError(
                f"This encoder uses language (use_language=True) but the observation has neither '{TASK_KEY}' "
                f"(instruction strings) nor '{TASK_EMBEDDING_KEY}'; it has {sorted(obs)}. Add the instructions."
            )
        tasks = obs[TASK_KEY]
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if self.sentence_encoder is None:
            self.sentence_encoder = SentenceEncoder()  # lazy: loads weights on the first unknown string
        return self.sentence_encoder.encode(tasks)

    def forward_tensors(self, *inputs: Tensor) -> Tensor:
        """Tensors in ``config.input_keys`` order -> (B, To, O). The traceable path (ONNX export)."""
        cfg = self.config
        if len(inputs) != len(cfg.input_keys):
            raise UserError(
                f"forward_tensors takes {len(cfg.input_keys)} tensors ({cfg.input_keys}), got {len(inputs)}."
            )
        n_low, n_cam = len(cfg.lowdim_keys), len(cfg.cameras)
        lowdim, images = inputs[:n_low], inputs[n_low : n_low + n_cam]
        # B and To come from the first low-dim or image input; a language-only encoder has To = 1.
        b, to = (inputs[0].shape[0], inputs[0].shape[1]) if n_low + n_cam else (inputs[0].shape[0], 1)
        parts: list[Tensor] = []
        raw: dict[int, Tensor] = {}  # the keys that derived inputs read, back in their own units
        for i, (key, dim, x) in enumerate(zip(cfg.lowdim_keys, cfg.lowdim_dims, lowdim)):
            if x.ndim != 3 or x.shape[0] != b or x.shape[1] != to or x.shape[2] != dim:
                raise UserError(
                    f"'{key}' has shape {tuple(x.shape)}; expected (B={b}, To={to}, {dim}). Check lowdim_dims "
                    "and that every observation key has the same batch and history length."
                )
            x = x.float()
            if i in self._needs_raw:
                raw[i] = self._raw(i, x)
            if not cfg.angles_of(i):
                parts.append(x)
                continue
            radians = raw[i].index_select(-1, getattr(self, f"_angle_{i}"))
            parts += [x.index_select(-1, getattr(self, f"_keep_{i}")), torch.sin(radians), torch.cos(radians)]
        if self._relative:
            (ref_key, ref_index), *points = self._relative
            reference = raw[ref_key][..., ref_index : ref_index + 3]
            parts += [(raw[k][..., j : j + 3] - reference) * cfg.relative_scale for k, j in points]
        for i, (cam, x) in enumerate(zip(cfg.cameras, images)):
            frames = self._prepare_images(cam, x, b, to)  # (B, To, 3, h, w) float
            features = self.pools[i](self._trunk(i)(frames.flatten(0, 1)))  # (N, image_feature_dim)
            parts.append(features.view(b, to, -1))
        if self.language is not None:
            embedding = inputs[-1]
            if embedding.ndim != 2 or embedding.shape[0] != b or embedding.shape[1] != EMBED_DIM:
                raise UserError(
                    f"'{TASK_EMBEDDING_KEY}' has shape {tuple(embedding.shape)}; expected (B={b}, {EMBED_DIM})."
                )
            lang = self.language(
                embedding.to(self.language.weight.device, torch.float32)
            )  # (B, language_dim)
            parts.append(lang[:, None, :].expand(b, to, lang.shape[-1]))  # the same for every step
        features = torch.cat(parts, dim=-1)  # (B, To, concat_dim)
        return self.out(features) if self.out is not None else features

    def _prepare_images(self, cam: CameraConfig, x: Tensor, b: int, to: int) -> Tensor:
        """(B, To, 3, H, W) or (B, To, H, W, 3), uint8 or float in [0, 1] -> cropped (B, To, 3, h, w) in [-1, 1]."""
        chw, hwc = (3, cam.height, cam.width), (cam.height, cam.width, 3)
        if x.ndim == 5 and tuple(x.shape[2:]) == hwc and tuple(x.shape[2:]) != chw:
            x = x.permute(0, 1, 4, 2, 3)
        if x.ndim != 5 or tuple(x.shape[2:]) != chw or x.shape[0] != b or x.shape[1] != to:
            raise UserError(
                f"'{cam.key}' has shape {tuple(x.shape)}; expected (B={b}, To={to}, 3, {cam.height}, {cam.width}) "
                f"or (B, To, {cam.height}, {cam.width}, 3). Check the camera's height/width in ObsEncoderConfig."
            )
        h, w = cam.crop
        if (h, w) != (
            cam.height,
            cam.width,
        ):  # crop first: fewer pixels to convert, and uint8 moves 4x fewer bytes
            x = random_crop(x, h, w) if self.training else center_crop(x, h, w)
        if x.dtype == torch.uint8:
            return x.float() * (2.0 / 255.0) - 1.0
        if not x.is_floating_point():
            raise UserError(f"'{cam.key}' has dtype {x.dtype}; expected uint8 (0..255) or float (0..1).")
        return x.float() * 2.0 - 1.0


# ---------------------------------------------------------------------------- export


def example_inputs(
    config: ObsEncoderConfig, batch_size: int = 1, n_obs_steps: int = 2, seed: int = 0
) -> list[Tensor]:
    """Random tensors in ``config.input_keys`` order (float images in [0, 1], CHW)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch_size, n_obs_steps, d, generator=g) for d in config.lowdim_dims]
    tensors += [
        torch.rand(batch_size, n_obs_steps, 3, c.height, c.width, generator=g) for c in config.cameras
    ]
    if config.use_language:
        tensors.append(F.normalize(torch.randn(batch_size, EMBED_DIM, generator=g), dim=-1))
    return tensors


class _Positional(nn.Module):
    def __init__(self, encoder: ObservationEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.encoder.forward_tensors(*inputs)


def export_onnx(
    encoder: ObservationEncoder, path: str | Path, n_obs_steps: int = 2, opset: int = 17
) -> list[str]:
    """Export the eval-mode encoder (centre crop) with a dynamic batch; returns the input names.

    Inputs are named after ``config.input_keys`` (images float CHW in [0, 1], ``task_embedding``
    precomputed); the output is ``obs_features`` (B, To, O). To is fixed at export.
    """
    import warnings

    if encoder.training:
        raise UserError(
            "export_onnx needs the encoder in eval mode (centre crop): call encoder.eval() first."
        )
    names = list(encoder.config.input_keys)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; the dynamo exporter needs onnxscript (not installed).
        warnings.simplefilter("ignore", DeprecationWarning)
        # Shape checks become constants in the trace; fine, since only the batch size varies.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            # eval() on the wrapper too: export restores the wrapper's mode recursively afterwards,
            # which would otherwise leave the encoder in training mode (random crops).
            _Positional(encoder).eval(),
            tuple(example_inputs(encoder.config, 2, n_obs_steps)),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["obs_features"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "obs_features"]},
            opset_version=opset,
        )
    return names
