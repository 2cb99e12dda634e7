"""Exponential moving average of a model's weights, the weights evaluation and deployment use.

Diffusion Policy evaluates an EMA of the weights with the "power" warm-up of Karras et al.
(also diffusers' ``EMAModel``): after n updates the decay is

    decay(n) = clip(1 - (1 + n / inv_gamma) ** -power, min_decay, max_decay)

so early on the average follows the raw weights closely (decay 0 at n = 0) and it slows
down as training settles (power 0.75 reaches 0.999 after ~10k updates, max 0.9999). A fixed
decay (``decay=0.999``) is the other common choice. Floating-point parameters and buffers
are averaged; integer buffers (counters, indices) are copied.

The average lives in a deep copy of the model (``EMA.model``), in eval mode with gradients
off, so it is itself a usable model (a policy whose ``act`` can be called, a world model to
roll out). Its ``state_dict()`` has the same names as the raw model's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from dreamrt.errors import UserError


@dataclass
class EMAConfig:
    enabled: bool = True
    # Power schedule (used when `decay` is None).
    power: float = 0.75
    inv_gamma: float = 1.0
    min_decay: float = 0.0
    max_decay: float = 0.9999
    decay: float | None = None  # a fixed decay instead of the power schedule, e.g. 0.999
    update_after_step: int = 0  # copy the raw weights (decay 0) until this many optimizer steps

    def __post_init__(self) -> None:
        if not self.power > 0 or not self.inv_gamma > 0:
            raise UserError(
                f"EMAConfig.power and inv_gamma must be > 0, got power={self.power!r}, inv_gamma={self.inv_gamma!r}. "
                "Diffusion Policy uses power=0.75, inv_gamma=1.0."
            )
        if not 0.0 <= self.min_decay <= self.max_decay < 1.0:
            raise UserError(
                f"EMAConfig needs 0 <= min_decay <= max_decay < 1, got min_decay={self.min_decay!r}, "
                f"max_decay={self.max_decay!r}."
            )
        if self.decay is not None and not 0.0 <= self.decay < 1.0:
            raise UserError(
                f"EMAConfig.decay must be in [0, 1) or None (power schedule), got {self.decay!r}."
            )
        if not isinstance(self.update_after_step, int) or self.update_after_step < 0:
            raise UserError(
                f"EMAConfig.update_after_step must be an int >= 0, got {self.update_after_step!r}."
            )


def ema_decay(config: EMAConfig, num_updates: int) -> float:
    """The decay applied by update number ``num_updates`` (0-based count of updates before it)."""
    if num_updates < config.update_after_step:
        return 0.0
    if config.decay is not None:
        return config.decay
    n = num_updates - config.update_after_step
    value = 1.0 - (1.0 + n / config.inv_gamma) ** -config.power
    return min(max(value, config.min_decay), config.max_decay)


class EMA:
    """A shadow copy of ``model`` updated with :func:`ema_decay` after every optimizer step."""

    def __init__(self, model: nn.Module, config: EMAConfig):
        self.config = config
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def _pairs(self, model: nn.Module):
        """(averaged shadow tensors, matching raw tensors, copied (shadow, raw) pairs)."""
        shadow = dict(self.model.state_dict(keep_vars=True))
        raw = dict(model.state_dict(keep_vars=True))
        if shadow.keys() != raw.keys():
            raise UserError(
                f"EMA.update got a model whose state keys differ from the averaged copy "
                f"({sorted(set(shadow) ^ set(raw))[:5]}...). Pass the same (unwrapped) model the EMA was built from."
            )
        avg_s, avg_r, copied = [], [], []
        for name, s in shadow.items():
            r = raw[name]
            if s.is_floating_point():
                avg_s.append(s.data)
                avg_r.append(r.data)
            else:
                copied.append((s.data, r.data))
        return avg_s, avg_r, copied

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Blend ``model``'s current weights into the average; returns the decay used."""
        decay = ema_decay(self.config, self.num_updates)
        avg_s, avg_r, copied = self._pairs(model)
        if decay == 0.0:
            torch._foreach_copy_(avg_s, avg_r)
        else:
            # shadow = decay * shadow + (1 - decay) * raw, in one fused pass per tensor list.
            torch._foreach_lerp_(avg_s, avg_r, 1.0 - decay)
        for s, r in copied:
            s.copy_(r)
        self.num_updates += 1
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state, strict=True)
        self.num_updates = int(num_updates)
