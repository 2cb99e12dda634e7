"""Frame tokenizer: a small convolutional VAE from RGB frames to a latent grid and back.

    encode(images (B, 3, H, W) in [0, 1]) -> latents (B, C, H/f, W/f), normalised per channel
    decode(latents) -> images (B, 3, H, W), about [0, 1] (clamp for display)

f = 2^len(channels): every stage halves the resolution (64x64 -> 8x8 with three stages).
Layout (Stable Diffusion's VAE, shrunk for a CPU): GroupNorm + SiLU residual blocks, strided
3x3 convolutions down, nearest-neighbour upsampling + 3x3 convolutions up; the encoder
outputs a mean and a log-variance per latent channel. Training: reconstruction MSE plus
``kl_weight`` x KL to N(0, 1) on the sampled latent (a small weight keeps the latent smooth
and bounded without blurring; 0 gives a plain autoencoder). ``encode`` returns the mean.

The dynamics model wants latents of unit scale: ``latent_mean`` / ``latent_std`` buffers
(set with :meth:`Tokenizer.fit_latent_stats` after training, saved with the weights) map the
raw mean to ``(z - mean) / std`` on encode and back on decode.

Decoder cost matters most: it runs once per generated frame. With channels (32, 64, 128) on
64x64 frames, it is about 0.27 GFLOP (the full-resolution stage has no residual block for that
reason).

Dimensions: B batch, H x W image, C latent channels, f downsampling factor.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamrt.errors import UserError, choose, did_you_mean

TOKENIZER_KIND = "world_model/tokenizer"  # meta.json kind of tokenizer checkpoints


# ---------------------------------------------------------------------------- helpers


def psnr(prediction: Tensor, target: Tensor, max_value: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: (B, ...) x (B, ...) -> (B,). The MSE is floored at
    1e-10 * max_value^2, so identical images give 100 dB rather than inf (means stay finite)."""
    if prediction.shape != target.shape:
        raise UserError(
            f"psnr needs two tensors of one shape, got {tuple(prediction.shape)} and {tuple(target.shape)}."
        )
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(max_value**2 / mse.clamp_min(1e-10 * max_value**2))


def images_to_tensor(images: np.ndarray | Tensor, size: int | None = None) -> Tensor:
    """uint8 HWC frames (..., H, W, 3) -> float (..., 3, size, size) in [0, 1], resized with
    antialiasing when ``size`` differs (the static camera's 96x96 -> 64x64)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if x.dtype != torch.uint8 or x.ndim < 3 or x.shape[-1] != 3:
        raise UserError(
            f"images_to_tensor takes uint8 frames shaped (..., H, W, 3), got {x.dtype} {tuple(x.shape)}."
        )
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    if size is not None and (x.shape[-2] != size or x.shape[-1] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(
            0, 1
        )
    return x.reshape(*lead, *x.shape[1:])


def tensor_to_images(x: Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [0, 1] -> uint8 (..., H, W, 3)."""
    return (x.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


# ---------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> mean, log-variance (B, C, H/f, W/f)."""

    def __init__(self, in_channels: int, channels: list[int], latent_channels: int, groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, ch in enumerate(channels):
            layers.append(ResBlock(ch, groups))
            out = channels[min(i + 1, len(channels) - 1)]
            layers.append(nn.Conv2d(ch, out, 3, stride=2, padding=1))
        layers.append(ResBlock(channels[-1], groups))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-20.0, 10.0)


class Decoder(nn.Module):
    """(B, C, h, w) raw latents -> (B, 3, h*f, w*f) in about [-1, 1]."""

    def __init__(self, out_channels: int, channels: list[int], latent_channels: int, groups: int):
        super().__init__()
        rev = channels[::-1]
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, ch in enumerate(rev):
            layers.append(ResBlock(ch, groups))
            out = rev[min(i + 1, len(rev) - 1)]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(groups, rev[-1])
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


# ---------------------------------------------------------------------------- config


@dataclass
class TokenizerConfig:
    image_size: int = 64  # square frames; the camera image is resized to this
    in_channels: int = 3
    # C: 8 reached 32.8 dB on held-out frames of the demonstrations (3,000 steps); 4 was at 28.3 dB
    # after 500 steps and rising slowly (docs/world_models.md).
    latent_channels: int = 8
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # one stage each, halving H, W
    groups: int = 8  # GroupNorm groups (divides every entry of channels)

    def __post_init__(self) -> None:
        self.channels = list(self.channels)
        for name in ("image_size", "in_channels", "latent_channels", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"TokenizerConfig.{name} must be a positive integer, got {value!r}.")
        if not self.channels or any(
            not isinstance(c, int) or c < 1 or c % self.groups for c in self.channels
        ):
            raise UserError(
                f"TokenizerConfig.channels must be a non-empty list of positive widths divisible by groups="
                f"{self.groups}, got {self.channels}."
            )
        if self.image_size % self.downsample:
            raise UserError(
                f"TokenizerConfig.image_size ({self.image_size}) must be divisible by the downsampling factor "
                f"{self.downsample} (2 ** len(channels))."
            )

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)  # f

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample


# ---------------------------------------------------------------------------- model


class Tokenizer(nn.Module):
    """See the module docstring."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.in_channels, c.channels, c.latent_channels, c.groups)
        self.decoder = Decoder(c.in_channels, c.channels, c.latent_channels, c.groups)
        self.register_buffer("latent_mean", torch.zeros(c.latent_channels))
        self.register_buffer("latent_std", torch.ones(c.latent_channels))

    def _check(self, images: Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise UserError(
                f"Tokenizer images must have shape (B, {', '.join(map(str, expected))}) float in [0, 1], got "
                f"{tuple(images.shape)}. Convert uint8 HWC frames with images_to_tensor(frames, "
                f"{c.image_size})."
            )

    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (unnormalised) mean and log-variance (B, C, h, w) of images (B, 3, H, W) in [0, 1]."""
        self._check(images)
        return self.encoder(images * 2.0 - 1.0)

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> normalised latents (B, C, h, w) (the posterior mean)."""
        mean, _ = self.encode_distribution(images)
        return (mean - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    def decode(self, latents: Tensor, detail: Tensor | None = None) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, H, W), about [0, 1].

        ``detail`` (B, 3, H, W), from :meth:`detail` of a real reference frame, is added to the
        decoded image: reference-relative decoding (see :meth:`detail`)."""
        z = latents * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)
        image = (self.decoder(z) + 1.0) * 0.5
        return image if detail is None else image + detail

    @torch.no_grad()
    def detail(self, images: Tensor) -> Tensor:
        """What a round trip loses of real frames: ``images - decode(encode(images))``, (B, 3, H, W).

        A world model's frames are all decoded, so plain decoding caps them at the tokenizer's
        reconstruction quality (about 30 dB), below what repeating the last frame scores at 30 Hz,
        where consecutive frames differ in a few pixels (36-38 dB). Adding the last real frame's
        detail to every generated frame's decode gives ``real + decode(z_gen) - decode(z_real)``:
        the real frame plus the change the model predicts. Where nothing moved, the two decodes
        agree and the real pixels come through; where the model predicts no change at all, the
        output is exactly the reference frame."""
        return images - self.decode(self.encode(images))

    def loss(
        self, images: Tensor, kl_weight: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction MSE (in [0, 1] units) + kl_weight * KL per latent element, on images (B, 3, H, W)."""
        mean, logvar = self.encode_distribution(images)
        eps = torch.randn(mean.shape, generator=generator).to(mean)
        z = mean + (0.5 * logvar).exp() * eps
        recon = (self.decoder(z) + 1.0) * 0.5
        mse = (recon - images).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = mse + kl_weight * kl
        return loss, {
            "loss": float(loss.detach()),
            "mse": float(mse.detach()),
            "kl": float(kl.detach()),
            "psnr": float(10 * math.log10(1.0 / max(float(mse.detach()), 1e-12))),
        }

    @torch.no_grad()
    def fit_latent_stats(self, images: Tensor, batch_size: int = 256) -> None:
        """Set latent_mean / latent_std per channel from the raw means of ``images`` (B, 3, H, W)."""
        means = torch.cat(
            [
                self.encode_distribution(images[i : i + batch_size])[0]
                for i in range(0, len(images), batch_size)
            ]
        )  # (B, C, h, w)
        self.latent_mean.copy_(means.mean(dim=(0, 2, 3)))
        self.latent_std.copy_(means.std(dim=(0, 2, 3)).clamp_min(1e-4))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def decoder_flops(config: TokenizerConfig) -> int:
    """Multiply-add FLOPs of one decode (convolutions only)."""
    c = config
    rev = c.channels[::-1]
    s = c.latent_size
    macs = s * s * c.latent_channels * rev[0] * 9
    for i, ch in enumerate(rev):
        out = rev[min(i + 1, len(rev) - 1)]
        macs += 2 * s * s * ch * ch * 9  # residual block
        s *= 2
        macs += s * s * ch * out * 9  # conv after upsampling
    macs += s * s * rev[-1] * c.in_channels * 9
    return 2 * macs


# ---------------------------------------------------------------------------- saving, loading


def save_tokenizer(model: Tokenizer, path: str | Path, *, step: int = 0, overwrite: bool = False) -> Path:
    """Write an inference checkpoint (kind ``world_model/tokenizer``): config.yaml is the TokenizerConfig."""
    from dreamrt.training.checkpoint import save_checkpoint

    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=model.config,
        normalizer={},
        step=step,
        kind=TOKENIZER_KIND,
        overwrite=overwrite,
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer checkpoint (or a run's newest) in eval mode."""
    from dreamrt.training.checkpoint import config_from_dict, load_checkpoint, load_into

    ckpt = load_checkpoint(path, kind=TOKENIZER_KIND)
    model = Tokenizer(config_from_dict(TokenizerConfig, ckpt.config, source=f"{ckpt.path}/config.yaml"))
    load_into(model, ckpt)
    return model.eval()


# ---------------------------------------------------------------------------- size presets

PRESETS: dict[str, dict[str, Any]] = {
    # 64x64 -> 8x8x8, 1.44M parameters.
    "small": dict(image_size=64, latent_channels=8, channels=[32, 64, 128]),
    # Tests: 16x16 -> 4x4x4.
    "tiny": dict(image_size=16, latent_channels=4, channels=[8, 16], groups=4),
}


def preset(name: str, **overrides: Any) -> TokenizerConfig:
    """A TokenizerConfig from a size preset (``small``, ``tiny``) plus overrides."""
    fields = dict(PRESETS[choose("tokenizer size preset", name, PRESETS)])
    known = {f.name for f in dataclasses.fields(TokenizerConfig)}
    for key in overrides:
        if key not in known:
            raise UserError(
                f"Unknown TokenizerConfig field '{key}' in preset overrides.{did_you_mean(key, known)} "
                f"Valid fields: {', '.join(sorted(known))}."
            )
    fields.update(overrides)
    return TokenizerConfig(**fields)
