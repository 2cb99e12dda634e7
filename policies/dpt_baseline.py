"""A reference-style baseline of Diffusion Policy's transformer denoiser, built from stock torch modules.

This module mirrors the architecture of diffusion_policy's ``TransformerForDiffusion``
(Chi et al., RSS 2023) as that codebase builds it, with stock torch modules; it is written
here (no code copied) from the paper and ``../shared/reference/diffusion_policy.md``. It is
the yardstick ``dreamrt bench network`` (:mod:`dreamrt.runtime.bench_network`) measures
dreamrt's own DP-T (:class:`dreamrt.policies.dpt.DPT`) against: the same function of the
same inputs with the same parameter shapes, run the way diffusion_policy runs it.

    forward(noisy_actions (B, Ta, A), timesteps (B,) | (1,) | (), obs_features (B, To, O)) -> (B, Ta, A)

Layout (``obs_as_cond=True``, ``n_cond_layers=0``, i.e. diffusion_policy's DP-T configs):
- condition tokens: a sinusoidal embedding of the timestep (one token) followed by one
  token per observation step (``cond_obs_emb``: Linear(O -> D)), plus learned positions
  (``cond_pos_emb``), through the condition "encoder", a token-wise MLP
  Linear(D, 4D)-Mish-Linear(4D, D) -> memory (B, M, D), M = To + 1;
- action tokens: ``input_emb`` Linear(A -> D) plus learned positions (``pos_emb``);
- ``torch.nn.TransformerDecoder`` of ``n_layer`` ``nn.TransformerDecoderLayer(d_model=D,
  nhead=H, dim_feedforward=4D, dropout=p_drop_attn, activation="gelu", batch_first=True,
  norm_first=True)``, called with a causal ``tgt_mask`` over the action tokens and a
  ``memory_mask`` letting action token t see memory tokens 0..t+1 (additive 0 / -inf float
  masks, as diffusion_policy builds them);
- head: ``ln_f`` LayerNorm then ``head`` Linear(D -> A).

What differs from :class:`~dreamrt.policies.dpt.DPT` is only how the same arithmetic is
organised: nn.MultiheadAttention's packed in-projection (the cross-attention projects its
keys and values with slices of it) instead of dreamrt's separate q / kv Linears, and
torch's decoder loop instead of dreamrt's explicit residual sub-blocks.
:func:`load_dpt_weights` copies a DPT's weights into this module, after which both compute
the same outputs (to float32 rounding): the benchmark compares two implementations of one
network, not two networks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dreamrt.errors import UserError
from dreamrt.policies.dpt import DPTConfig


class SinusoidalTimeEmbedding(nn.Module):
    """Timesteps (B,) -> (B, D): [sin(t * f_i), cos(t * f_i)], f_i = 10000^(-i / (D/2 - 1))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        scale = math.log(10000.0) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device) * -scale)  # (D/2,), rebuilt every call
        args = t.float()[:, None] * freqs[None, :]  # (B, D/2)
        return torch.cat((args.sin(), args.cos()), dim=-1)


def _additive(allowed: Tensor) -> Tensor:
    """Bool "may attend" -> additive float mask (0 where allowed, -inf elsewhere)."""
    return allowed.float().masked_fill(~allowed, float("-inf")).masked_fill(allowed, 0.0)


class ReferenceDPT(nn.Module):
    """The reference-style baseline (see the module docstring); sized by a :class:`DPTConfig`.

    Uses the config's shapes (``n_layer``, ``n_head``, ``n_emb``, ``horizon``,
    ``n_obs_steps``, ``obs_dim``, ``action_dim``), its dropouts and its two mask switches.
    """

    def __init__(self, config: DPTConfig):
        super().__init__()
        self.config = c = config
        d = c.n_emb
        n_cond = c.n_memory  # timestep token + one per observation step

        self.input_emb = nn.Linear(c.action_dim, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, c.horizon, d))
        self.drop = nn.Dropout(c.p_drop_emb)
        self.time_emb = SinusoidalTimeEmbedding(d)
        self.cond_obs_emb = nn.Linear(c.obs_dim, d)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, n_cond, d))
        self.encoder = nn.Sequential(nn.Linear(d, 4 * d), nn.Mish(), nn.Linear(4 * d, d))
        layer = nn.TransformerDecoderLayer(
            d_model=d,
            nhead=c.n_head,
            dim_feedforward=4 * d,
            dropout=c.p_drop_attn,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # The decoder deep-copies `layer` n_layer times.
        self.decoder = nn.TransformerDecoder(layer, num_layers=c.n_layer)

        t = torch.arange(c.horizon)[:, None]
        s = torch.arange(n_cond)[None, :]
        causal = _additive(torch.ones(c.horizon, c.horizon, dtype=torch.bool).tril())  # (Ta, Ta)
        self.register_buffer("mask", causal if c.causal_attn else None, persistent=False)
        memory = _additive(s <= t + 1)  # (Ta, M): action token t sees the time token and obs steps 0..t
        self.register_buffer("memory_mask", memory if c.memory_mask else None, persistent=False)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, c.action_dim)
        self.apply(_init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    def forward(self, noisy_actions: Tensor, timesteps: Tensor | int, obs_features: Tensor) -> Tensor:
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=noisy_actions.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(noisy_actions.shape[0])  # (B,)

        time_tok = self.time_emb(timesteps).unsqueeze(1)  # (B, 1, D)
        cond = torch.cat([time_tok, self.cond_obs_emb(obs_features)], dim=1)  # (B, M, D)
        memory = self.encoder(self.drop(cond + self.cond_pos_emb[:, : cond.shape[1]]))

        x = self.input_emb(noisy_actions)
        x = self.drop(x + self.pos_emb[:, : x.shape[1]])  # (B, Ta, D)
        x = self.decoder(tgt=x, memory=memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(x))  # (B, Ta, A)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    # GPT-2 style, as diffusion_policy initialises its transformer (including the packed
    # in-projection of nn.MultiheadAttention, which is not an nn.Linear).
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.MultiheadAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
        nn.init.zeros_(module.in_proj_bias)
        nn.init.zeros_(module.out_proj.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def load_dpt_weights(baseline: ReferenceDPT, dpt: nn.Module) -> ReferenceDPT:
    """Copy a :class:`~dreamrt.policies.dpt.DPT`'s weights into ``baseline`` (same config); returns it.

    Afterwards both modules compute the same function. Raises a UserError when the two
    configs differ in any shape.
    """
    a, b = baseline.config, dpt.config
    shape = ("action_dim", "obs_dim", "horizon", "n_obs_steps", "n_layer", "n_head", "n_emb")
    if any(getattr(a, k) != getattr(b, k) for k in shape):
        raise UserError(
            f"load_dpt_weights needs models of the same shape; baseline has "
            f"{ {k: getattr(a, k) for k in shape} }, the DP-T { {k: getattr(b, k) for k in shape} }."
        )
    pairs = [
        (baseline.input_emb, dpt.action_emb),
        (baseline.cond_obs_emb, dpt.obs_emb),
        (baseline.encoder[0], dpt.cond_mlp[0]),
        (baseline.encoder[2], dpt.cond_mlp[2]),
        (baseline.ln_f, dpt.norm_out),
        (baseline.head, dpt.out),
    ]
    baseline.pos_emb.copy_(dpt.action_pos)
    baseline.cond_pos_emb.copy_(dpt.cond_pos)
    for ours, theirs in zip(baseline.decoder.layers, dpt.layers):
        sa, ca, ff = theirs.self_attn, theirs.cross_attn, theirs.ffn
        ours.self_attn.in_proj_weight.copy_(sa.qkv.weight)  # (3D, D): rows q, k, v in both
        ours.self_attn.in_proj_bias.copy_(sa.qkv.bias)
        ours.multihead_attn.in_proj_weight.copy_(torch.cat([ca.q.weight, ca.kv.weight]))
        ours.multihead_attn.in_proj_bias.copy_(torch.cat([ca.q.bias, ca.kv.bias]))
        pairs += [
            (ours.self_attn.out_proj, sa.proj),
            (ours.multihead_attn.out_proj, ca.proj),
            (ours.norm1, sa.norm),
            (ours.norm2, ca.norm),
            (ours.norm3, ff.norm),
            (ours.linear1, ff.fc),
            (ours.linear2, ff.proj),
        ]
    for ours, theirs in pairs:
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)
    return baseline
