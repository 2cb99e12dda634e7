"""DP-T: the transformer denoiser of Diffusion Policy (Chi et al., RSS 2023).

The network maps a noisy action sequence, its diffusion timestep and a short history of
observation features to the model output for the sampler (epsilon or the clean sample):

    forward(noisy_actions (B, Ta, A), timesteps (B,), obs_features (B, To, O)) -> (B, Ta, A)

Dimensions: B batch, Ta action horizon (one token per action), To observation steps,
M = To + 1 memory tokens (timestep token first, then one token per observation step),
A action dim, O observation feature dim, D width (n_emb), H heads.

Layout (as in Diffusion Policy's ``TransformerForDiffusion`` with ``n_cond_layers=0``):
- condition: [sinusoidal timestep embedding, Linear(O -> D) per observation step] plus
  learned positions, then a token-wise MLP (Linear 4x, Mish, Linear) -> memory (B, M, D).
  The MLP is token-wise on purpose: memory tokens never mix, so the memory mask below
  really limits which observation steps an action token can read.
- actions: Linear(A -> D) plus learned positions -> the residual stream x (B, Ta, D).
- decoder: ``n_layer`` pre-norm layers of three residual sub-blocks each, in this order:
  ``SelfAttention`` (causal over action tokens when ``causal_attn``), ``CrossAttention``
  (to the memory), ``FeedForward`` (4x, GELU).
- head: LayerNorm then Linear(D -> A).

Masks. Causal self-attention: action token t attends action tokens 0..t. Memory mask
(``memory_mask=True``, Diffusion Policy's choice): action token t attends memory tokens
0..t+1, i.e. the timestep token and observation steps 0..t; tokens t >= To-1 see all of
the memory. Both are built once and kept as buffers (additive 0/-inf float masks).

Sub-block contract (what BAC caching, profiling and export rely on). Every sub-block is
an ``nn.Module`` called as ``block(x, memory)`` that returns the RESIDUAL, the delta added
to the stream (it ignores ``memory`` if it does not need it). ``model.sub_blocks`` lists
them in execution order as ``(name, module)`` pairs whose names are module paths
(``layers.3.cross_attn``, so ``model.get_submodule(name)`` works). ``forward`` is exactly:

    memory = model.encode_condition(timesteps, obs_features)   # (B, M, D)
    x = model.embed_actions(noisy_actions)                      # (B, Ta, D)
    for i, (name, block) in enumerate(model.sub_blocks):
        x = x + block(x, memory)          # or: x + run_block(i, block, x, memory)
    return model.head(x)                                        # (B, Ta, A)

``forward(..., run_block=f)`` replaces the call of each sub-block by
``f(i, block, x, memory) -> residual`` (i indexes ``model.sub_blocks``), so a cache can
return a stored residual instead of running the block. The condition encoder and the head
always run. With ``run_block=None`` (the default, and what ONNX export traces) the loop
calls the blocks directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamrt.errors import UserError, choose, did_you_mean

RunBlock = Callable[[int, nn.Module, Tensor, Tensor], Tensor]  # (index, block, x, memory) -> residual


# ---------------------------------------------------------------------------- helpers


def sinusoidal_frequencies(dim: int) -> Tensor:
    """Frequencies of the transformer sinusoidal embedding (as Diffusion Policy's SinusoidalPosEmb)."""
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))


def causal_mask(n: int) -> Tensor:
    """Additive (n, n) mask: query t sees keys 0..t."""
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(n, n).masked_fill(~allowed, float("-inf"))


def memory_mask(n_actions: int, n_memory: int) -> Tensor:
    """Additive (Ta, M) mask: action token t sees memory tokens 0..t+1 (timestep token + obs steps 0..t)."""
    t = torch.arange(n_actions)[:, None]
    s = torch.arange(n_memory)[None, :]
    return torch.zeros(n_actions, n_memory).masked_fill(s > t + 1, float("-inf"))


# ---------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over action tokens; returns the residual (B, Ta, D)."""

    def __init__(self, n_emb: int, n_head: int, p_drop: float, mask: Tensor | None):
        super().__init__()
        self.n_head = n_head
        self.p_drop = p_drop
        self.norm = nn.LayerNorm(n_emb)
        self.qkv = nn.Linear(n_emb, 3 * n_emb)
        self.proj = nn.Linear(n_emb, n_emb)
        self.drop = nn.Dropout(p_drop)
        self.register_buffer("mask", mask, persistent=False)  # (Ta, Ta) additive, or None

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm(x)).view(b, t, 3, self.n_head, d // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, Ta, D/H)
        p = self.p_drop if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=p)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention from action tokens to the memory; returns the residual (B, Ta, D)."""

    def __init__(self, n_emb: int, n_head: int, p_drop: float, mask: Tensor | None):
        super().__init__()
        self.n_head = n_head
        self.p_drop = p_drop
        self.norm = nn.LayerNorm(n_emb)
        self.q = nn.Linear(n_emb, n_emb)
        self.kv = nn.Linear(n_emb, 2 * n_emb)
        self.proj = nn.Linear(n_emb, n_emb)
        self.drop = nn.Dropout(p_drop)
        self.register_buffer("mask", mask, persistent=False)  # (Ta, M) additive, or None

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        b, t, d = x.shape
        m = memory.shape[1]
        hd = d // self.n_head
        q = self.q(self.norm(x)).view(b, t, self.n_head, hd).transpose(1, 2)  # (B, H, Ta, D/H)
        kv = self.kv(memory).view(b, m, 2, self.n_head, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, M, D/H)
        p = self.p_drop if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=p)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class FeedForward(nn.Module):
    """Pre-norm MLP (4x, GELU); takes ``memory`` only to share the sub-block signature."""

    def __init__(self, n_emb: int, p_drop: float):
        super().__init__()
        self.norm = nn.LayerNorm(n_emb)
        self.fc = nn.Linear(n_emb, 4 * n_emb)
        self.proj = nn.Linear(4 * n_emb, n_emb)
        self.drop_hidden = nn.Dropout(p_drop)
        self.drop = nn.Dropout(p_drop)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        return self.drop(self.proj(self.drop_hidden(F.gelu(self.fc(self.norm(x))))))


class DecoderLayer(nn.Module):
    """A container of the three sub-blocks; the model's loop runs them (see the module docstring)."""

    def __init__(
        self, n_emb: int, n_head: int, p_drop: float, self_mask: Tensor | None, mem_mask: Tensor | None
    ):
        super().__init__()
        self.self_attn = SelfAttention(n_emb, n_head, p_drop, self_mask)
        self.cross_attn = CrossAttention(n_emb, n_head, p_drop, mem_mask)
        self.ffn = FeedForward(n_emb, p_drop)


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DPTConfig:
    action_dim: int
    obs_dim: int  # O: width of the per-step observation feature vector (encoder output)
    horizon: int = 16  # Ta: action tokens per sequence
    n_obs_steps: int = 2  # To
    n_layer: int = 4
    n_head: int = 4
    n_emb: int = 128  # D
    # Dropout on attention weights, on every sub-block's residual and on the FFN hidden layer
    # (as torch's TransformerDecoderLayer, which Diffusion Policy uses). DP's image configs use
    # 0.3, its low-dim configs 0.01; small state policies have little capacity to spare, so
    # the default follows the low-dim value and the dp_reference preset the image value.
    p_drop_attn: float = 0.01
    p_drop_emb: float = 0.0  # dropout on action and condition embeddings
    causal_attn: bool = True  # causal self-attention over action tokens
    memory_mask: bool = True  # action token t sees the timestep token and obs steps 0..t

    def __post_init__(self) -> None:
        for name in ("action_dim", "obs_dim", "horizon", "n_obs_steps", "n_layer", "n_head", "n_emb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(
                    f"DPTConfig.{name} must be a positive integer, got {value!r}. Set it to a value >= 1."
                )
        if self.n_emb % self.n_head != 0 or self.n_emb % 2 != 0 or self.n_emb < 4:
            raise UserError(
                f"DPTConfig.n_emb must be even, >= 4 (sin and cos halves of the timestep embedding) and "
                f"divisible by n_head, got n_emb={self.n_emb}, n_head={self.n_head}. Pick e.g. n_emb=256, n_head=4."
            )
        for name in ("p_drop_attn", "p_drop_emb"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"DPTConfig.{name} must be in [0, 1), got {value!r}.")

    @property
    def n_memory(self) -> int:
        return self.n_obs_steps + 1  # M: timestep token + one token per observation step


# ---------------------------------------------------------------------------- model


class DPT(nn.Module):
    """Diffusion Policy's transformer denoiser; see the module docstring for the sub-block contract."""

    def __init__(self, config: DPTConfig):
        super().__init__()
        self.config = config
        c = config
        d = c.n_emb

        self.register_buffer("time_freqs", sinusoidal_frequencies(d), persistent=False)  # (D/2,)
        self.obs_emb = nn.Linear(c.obs_dim, d)
        self.cond_pos = nn.Parameter(torch.zeros(1, c.n_memory, d))
        self.cond_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.Mish(), nn.Linear(4 * d, d))

        self.action_emb = nn.Linear(c.action_dim, d)
        self.action_pos = nn.Parameter(torch.zeros(1, c.horizon, d))
        self.drop_emb = nn.Dropout(c.p_drop_emb)

        self_mask = causal_mask(c.horizon) if c.causal_attn else None
        mem_mask = memory_mask(c.horizon, c.n_memory) if c.memory_mask else None
        self.layers = nn.ModuleList(
            DecoderLayer(d, c.n_head, c.p_drop_attn, self_mask, mem_mask) for _ in range(c.n_layer)
        )
        self.norm_out = nn.LayerNorm(d)
        self.out = nn.Linear(d, c.action_dim)

        # A plain list (modules are already registered through self.layers): the loop order.
        self._sub_blocks: list[tuple[str, nn.Module]] = [
            (f"layers.{i}.{kind}", getattr(layer, kind))
            for i, layer in enumerate(self.layers)
            for kind in ("self_attn", "cross_attn", "ffn")
        ]
        self._blocks = [block for _, block in self._sub_blocks]
        self.apply(_init_weights)
        nn.init.normal_(self.cond_pos, std=0.02)
        nn.init.normal_(self.action_pos, std=0.02)

    @property
    def sub_blocks(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every residual sub-block in execution order (3 per layer)."""
        return list(self._sub_blocks)

    def encode_condition(self, timesteps: Tensor, obs_features: Tensor) -> Tensor:
        """(B,) or () timesteps and (B, To, O) features -> memory (B, M, D)."""
        b = obs_features.shape[0]
        args = timesteps.to(self.time_freqs.dtype).reshape(-1, 1) * self.time_freqs  # (B or 1, D/2)
        time_tok = torch.cat([args.sin(), args.cos()], dim=-1).expand(b, -1).unsqueeze(1)  # (B, 1, D)
        cond = torch.cat([time_tok, self.obs_emb(obs_features)], dim=1) + self.cond_pos  # (B, M, D)
        return self.cond_mlp(self.drop_emb(cond))

    def embed_actions(self, noisy_actions: Tensor) -> Tensor:
        """(B, Ta, A) -> the residual stream (B, Ta, D)."""
        return self.drop_emb(self.action_emb(noisy_actions) + self.action_pos)

    def head(self, x: Tensor) -> Tensor:
        """(B, Ta, D) -> (B, Ta, A)."""
        return self.out(self.norm_out(x))

    def forward(
        self,
        noisy_actions: Tensor,
        timesteps: Tensor,
        obs_features: Tensor,
        run_block: RunBlock | None = None,
    ) -> Tensor:
        if not torch.jit.is_tracing():  # shapes are fixed by the config; tracing would warn on the checks
            self._check_inputs(noisy_actions, timesteps, obs_features)
        memory = self.encode_condition(timesteps, obs_features)
        x = self.embed_actions(noisy_actions)
        if run_block is None:
            for block in self._blocks:
                x = x + block(x, memory)
        else:
            for i, block in enumerate(self._blocks):
                x = x + run_block(i, block, x, memory)
        return self.head(x)

    def _check_inputs(self, noisy_actions: Tensor, timesteps: Tensor, obs_features: Tensor) -> None:
        c = self.config
        if noisy_actions.ndim != 3 or tuple(noisy_actions.shape[1:]) != (c.horizon, c.action_dim):
            raise UserError(
                f"DPT noisy_actions must have shape (B, {c.horizon}, {c.action_dim}) (B, horizon, action_dim), "
                f"got {tuple(noisy_actions.shape)}. Pad or slice the action sequence to the model's horizon."
            )
        if obs_features.ndim != 3 or tuple(obs_features.shape[1:]) != (c.n_obs_steps, c.obs_dim):
            raise UserError(
                f"DPT obs_features must have shape (B, {c.n_obs_steps}, {c.obs_dim}) (B, n_obs_steps, obs_dim), "
                f"got {tuple(obs_features.shape)}. Check the observation encoder's output and n_obs_steps."
            )
        if timesteps.ndim > 1 or timesteps.numel() not in (1, noisy_actions.shape[0]):
            raise UserError(
                f"DPT timesteps must be a scalar or a (B,) tensor with B={noisy_actions.shape[0]}, "
                f"got shape {tuple(timesteps.shape)}."
            )
        if obs_features.shape[0] != noisy_actions.shape[0]:
            raise UserError(
                f"DPT noisy_actions and obs_features must share the batch size, got {noisy_actions.shape[0]} "
                f"and {obs_features.shape[0]}."
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    # Diffusion Policy's (and GPT-2's) initialisation.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def example_inputs(config: DPTConfig, batch_size: int = 1, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random (noisy_actions, timesteps, obs_features) for export, benchmarks and tests."""
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch_size, config.horizon, config.action_dim, generator=g)
    timesteps = torch.randint(0, 100, (batch_size,), generator=g)
    obs = torch.randn(batch_size, config.n_obs_steps, config.obs_dim, generator=g)
    return noisy, timesteps, obs


# ---------------------------------------------------------------------------- size presets

# Shapes only; action_dim and obs_dim come from the task.
PRESETS: dict[str, dict] = {
    # diffusion_policy's DP-T: 8 x 256, 4 heads, horizon 16, To=2, attention dropout 0.3.
    "dp_reference": dict(n_layer=8, n_head=4, n_emb=256, horizon=16, n_obs_steps=2, p_drop_attn=0.3),
    # A right-sized state policy: about 1/8 of dp_reference's parameters.
    "small": dict(n_layer=4, n_head=4, n_emb=128, horizon=16, n_obs_steps=2, p_drop_attn=0.01),
    # Tests.
    "tiny": dict(n_layer=2, n_head=2, n_emb=32, horizon=8, n_obs_steps=2, p_drop_attn=0.0),
}


def preset(name: str, action_dim: int, obs_dim: int, **overrides) -> DPTConfig:
    """A DPTConfig from a size preset (``dp_reference``, ``small``, ``tiny``) plus overrides."""
    fields = dict(PRESETS[choose("DP-T size preset", name, PRESETS)])
    known = {f.name for f in dataclasses.fields(DPTConfig)}
    for key in overrides:
        if key not in known:
            raise UserError(
                f"Unknown DPTConfig field '{key}' in preset overrides.{did_you_mean(key, known)} "
                f"Valid fields: {', '.join(sorted(known))}."
            )
    fields.update(overrides)
    return DPTConfig(action_dim=action_dim, obs_dim=obs_dim, **fields)
