"""Next-frame diffusion transformer over latent tokens (Next-Frame Diffusion / ACDiT style).

A sequence of frames, each a latent grid from the tokenizer, is cut into N tokens per frame.
One transformer pass denoises every frame of the sequence at once, each at its own noise
level; attention is **block-causal**: a token of frame i sees every token of the frames
j <= i (bidirectional inside a frame, causal across frames), and, with a ``window`` W, only
frames i - W < j (plus the first ``sink`` frames of the sequence). Generation then decodes
one frame (or a few speculative frames) at a time against a KV cache of the earlier frames.

Dimensions: B batch, T frames of a training sequence, F frames in one pass, N tokens per
frame (gh * gw / p^2), C latent channels, gh x gw latent grid, p patch size, D width (n_emb),
H heads, Dh = D / H head width, L layers, A action dim, S state dim, K key tokens of a pass.

Flow matching (rectified flow): ``x_t = (1 - t) x_0 + t eps``, t in [0, 1] (1 = pure noise);
the network predicts the velocity ``v = eps - x_0``, so ``x_0 = x_t - t v``. Every frame of
a training sequence draws its own t (logit-normal, diffusion-forcing style); a fraction of
frames are "context frames" that get only a small noise level (context-noise augmentation)
and no loss, so the model sees nearly clean history as at inference, where a little noise is
added to generated frames before they become context (limits drift).

Flow source (``DynamicsConfig.source``): where a generated frame's flow starts at t = 1.
- ``"noise"``: N(0, I), trained diffusion-forcing style as above.
- ``"last_frame"``: the last clean frame plus ``source_sigma`` x N(0, I), so
  ``x_t = (1 - t) x_0 + t (anchor + sigma eps)`` and ``v = anchor + sigma eps - x_0``. At 30 Hz
  consecutive latents differ by about 0.05 of their scale; from pure noise the model has to
  rebuild the whole frame to that precision every time (on the project's demonstrations a
  noise-source model was 6x worse than repeating the last latent after 400 steps), while from the
  last frame it only has to move what moves. Such models train in the layout they generate in
  (:func:`generation_layout`): per clip, context frames then 1..``max_targets`` target frames at
  one shared t, all starting from the last context frame, which is what ``Rollout.step`` (one
  target) and ``Rollout.speculate`` (k targets from the same anchor) do.

Conditioning, per frame, by adaLN-Zero: ``c_i = emb(t_i) + emb(a_{i-1}, s_{i-1})``: frame i
is conditioned on the action taken at frame i-1 and the robot state at frame i-1, i.e. on
what led to it. Frames with no known predecessor (the first frame of an episode, a clean
start) use a learned null embedding instead, which classifier-free dropout also trains
(``FrameCond.valid``). ``frame_conditions`` shifts store-aligned (B, T, A) actions into this form.

Positions: 3D RoPE on queries and keys, the head dimension split into time / height / width
pairs. Time uses the absolute frame index; since RoPE scores depend only on index
differences, cached keys stay valid as the window rolls forward.

Two entry points share the weights (no mode flags inside one forward):
- ``forward`` runs a whole sequence with the block-causal mask: training and the uncached
  reference generation.
- ``forward_cached`` runs F query frames against a :class:`~dreamrt.world_models.kv_cache.KVCache`:
  each layer writes the query frames' keys/values into their cache slots first, then attends
  over all slots with a mask built from the slots' frame indices (see ``frame_visibility``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamrt.errors import UserError, choose, did_you_mean

if TYPE_CHECKING:
    from dreamrt.world_models.kv_cache import KVCache

DYNAMICS_KIND = "world_model/dynamics"  # meta.json kind of dynamics checkpoints
SOURCES = ("noise", "last_frame")


# ---------------------------------------------------------------------------- masks


def frame_visibility(query_frames: Tensor, key_frames: Tensor, window: int | None, sink: int = 0) -> Tensor:
    """Which key frames each query frame may attend: bool (Fq, Fk).

    ``query_frames`` (Fq,) and ``key_frames`` (Fk,) are absolute frame indices; a key index
    < 0 marks an empty cache slot. Frame q sees frame k when ``0 <= k <= q`` and either
    ``q - k < window`` or ``k < sink`` (sink frames stay visible forever). ``window=None``:
    no limit (plain block-causal).
    """
    q = query_frames.reshape(-1, 1)
    k = key_frames.reshape(1, -1)
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= ((q - k) < window) | (k < sink)
    return visible


def token_mask(visibility: Tensor, tokens_per_frame: int) -> Tensor:
    """Expand a (Fq, Fk) frame visibility to the (Fq*N, Fk*N) bool token mask (True = attend)."""
    n = tokens_per_frame
    return visibility.repeat_interleave(n, dim=0).repeat_interleave(n, dim=1)


def additive_mask(visibility: Tensor, tokens_per_frame: int, dtype: torch.dtype) -> Tensor:
    """The (Fq*N, Fk*N) float mask for SDPA: 0 where visible, -inf elsewhere (on this CPU SDPA runs
    faster with an additive mask than with a bool one)."""
    allowed = token_mask(visibility, tokens_per_frame)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def block_causal_mask(
    num_frames: int, tokens_per_frame: int, window: int | None = None, sink: int = 0
) -> Tensor:
    """(T*N, T*N) bool mask of a T-frame sequence: bidirectional inside a frame, causal across
    frames, limited to ``window`` frames (plus ``sink`` first frames)."""
    frames = torch.arange(num_frames)
    return token_mask(frame_visibility(frames, frames, window, sink), tokens_per_frame)


# ---------------------------------------------------------------------------- helpers


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of flow times t in [0, 1]: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
    args = (t.float() * scale).unsqueeze(-1) * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


def rope_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs of the head dimension given to (time, height, width): a third each, the rest to time."""
    pairs = head_dim // 2
    spatial = pairs // 3
    return pairs - 2 * spatial, spatial, spatial


def _axis_frequencies(n_pairs: int, base: float) -> Tensor:
    return base ** (-torch.arange(n_pairs, dtype=torch.float64) / max(n_pairs, 1))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + Dh/2) of x (..., L, Dh) by the angles whose cos/sin are (L, Dh/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, tokens_per_frame: int) -> Tensor:
    """adaLN: x (B, F*N, D) with per-frame shift/scale (B, F, D)."""
    b, length, d = x.shape
    xf = x.view(b, length // tokens_per_frame, tokens_per_frame, d)
    return (xf * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).view(b, length, d)


def gate(x: Tensor, g: Tensor, tokens_per_frame: int) -> Tensor:
    """Per-frame gate (B, F, D) applied to a residual x (B, F*N, D)."""
    b, length, d = x.shape
    return (x.view(b, length // tokens_per_frame, tokens_per_frame, d) * g.unsqueeze(2)).view(b, length, d)


# ---------------------------------------------------------------------------- conditioning


@dataclass
class FrameCond:
    """What led to each frame: the previous frame's action and robot state.

    ``actions`` (B, F, A) and ``states`` (B, F, S) are normalised; ``valid`` (B, F) bool is
    False where a frame has no known predecessor (its condition is the learned null embedding).
    """

    actions: Tensor
    states: Tensor
    valid: Tensor

    def frames(self, start: int, stop: int) -> FrameCond:
        return FrameCond(self.actions[:, start:stop], self.states[:, start:stop], self.valid[:, start:stop])

    @staticmethod
    def cat(parts: list[FrameCond]) -> FrameCond:
        return FrameCond(
            torch.cat([p.actions for p in parts], 1),
            torch.cat([p.states for p in parts], 1),
            torch.cat([p.valid for p in parts], 1),
        )


def frame_conditions(actions: Tensor, states: Tensor | None, first_valid: bool = False) -> FrameCond:
    """Store-aligned (B, T, A) actions / (B, T, S) states (row i: taken/observed at frame i) ->
    the conditions of frames 0..T-1 (frame i gets row i-1). Frame 0 has no predecessor in the
    clip and gets the null condition."""
    b, t, _ = actions.shape
    if states is None:
        states = actions.new_zeros(b, t, 0)
    prev_actions = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], 1)
    prev_states = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], 1)
    valid = torch.ones(b, t, dtype=torch.bool, device=actions.device)
    valid[:, 0] = first_valid
    return FrameCond(prev_actions, prev_states, valid)


# ---------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head attention with fused QKV and 3D RoPE; returns the residual (B, F*N, D)."""

    def __init__(self, n_emb: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_emb, 3 * n_emb)
        self.proj = nn.Linear(n_emb, n_emb)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, length, d = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.n_head, d // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, F*N, Dh)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _out(self, y: Tensor) -> Tensor:
        b, h, length, dh = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, length, h * dh))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self._qkv(x, cos, sin)
        return self._out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def forward_cached(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        keys: Tensor,
        values: Tensor,
        token_index: Tensor,
    ) -> Tensor:
        """Write this pass's keys/values into the cache views ``keys``/``values`` (B, H, slots*N, Dh)
        at ``token_index`` (F*N,), then attend over every slot (``mask`` (F*N, slots*N))."""
        q, k, v = self._qkv(x, cos, sin)
        keys.index_copy_(2, token_index, k)
        values.index_copy_(2, token_index, v)
        return self._out(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))


class FeedForward(nn.Module):
    def __init__(self, n_emb: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(n_emb, hidden)
        self.proj = nn.Linear(hidden, n_emb)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))  # exact GELU: 7x faster than the tanh form on this CPU


class DiTBlock(nn.Module):
    """Two adaLN-Zero residual sub-blocks, attention then MLP. The block's six modulation
    vectors (shift/scale/gate x 2, each (B, F, D)) come from the model's fused adaLN projection."""

    def __init__(self, n_emb: int, n_head: int, mlp_hidden: int, tokens_per_frame: int):
        super().__init__()
        self.n = tokens_per_frame
        self.norm1 = nn.LayerNorm(n_emb, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(n_emb, n_head)
        self.norm2 = nn.LayerNorm(n_emb, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(n_emb, mlp_hidden)

    def _mlp_residual(self, x: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        return gate(self.mlp(modulate(self.norm2(x), mod[3], mod[4], self.n)), mod[5], self.n)

    def forward(self, x: Tensor, mod: tuple[Tensor, ...], cos: Tensor, sin: Tensor, mask: Tensor | None):
        x = x + gate(
            self.attn(modulate(self.norm1(x), mod[0], mod[1], self.n), cos, sin, mask), mod[2], self.n
        )
        return x + self._mlp_residual(x, mod)

    def forward_cached(
        self,
        x: Tensor,
        mod: tuple[Tensor, ...],
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        keys: Tensor,
        values: Tensor,
        token_index: Tensor,
    ) -> Tensor:
        h = modulate(self.norm1(x), mod[0], mod[1], self.n)
        x = x + gate(self.attn.forward_cached(h, cos, sin, mask, keys, values, token_index), mod[2], self.n)
        return x + self._mlp_residual(x, mod)


# ---------------------------------------------------------------------------- config


@dataclass
class DynamicsConfig:
    action_dim: int = 7  # A
    state_dim: int = 15  # S; 0: actions only
    latent_channels: int = 4  # C (the tokenizer's)
    latent_size: int = 8  # gh = gw (the tokenizer's grid)
    patch_size: int = 1  # p: N = (latent_size / p)^2 tokens per frame
    n_layer: int = 4
    n_head: int = 4
    n_emb: int = 128  # D
    mlp_ratio: float = 4.0
    # W: frames a query frame attends, itself included (training clips should be >= W). Attention
    # cost per frame grows with W; 8 frames is 0.27 s at 30 FPS.
    window: int = 8
    sink: int = 0  # first frames of a sequence that stay visible to every later frame
    rope_base_time: float = 10000.0
    rope_base_space: float = 100.0  # grids are small (8 positions): a low base spreads the angles
    # Where a generated frame's flow starts at t = 1: "noise" (N(0, I)) or "last_frame" (the last
    # clean frame + source_sigma * N(0, I)); see "Flow source" in the module docstring. Measured on
    # the demonstrations, last_frame with sigma 0.5 predicted best (docs/world_models.md).
    source: str = "last_frame"
    source_sigma: float = 0.5

    def __post_init__(self) -> None:
        choose("DynamicsConfig.source", self.source, SOURCES)
        if not self.source_sigma > 0:
            raise UserError(f"DynamicsConfig.source_sigma must be > 0, got {self.source_sigma}.")
        for name in (
            "action_dim",
            "latent_channels",
            "latent_size",
            "patch_size",
            "n_layer",
            "n_head",
            "n_emb",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"DynamicsConfig.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.state_dim, int) or self.state_dim < 0:
            raise UserError(
                f"DynamicsConfig.state_dim must be an integer >= 0 (0: no state), got {self.state_dim!r}."
            )
        if self.latent_size % self.patch_size:
            raise UserError(
                f"DynamicsConfig.latent_size ({self.latent_size}) must be divisible by patch_size "
                f"({self.patch_size}). Use patch_size 1 or 2 for an 8x8 latent grid."
            )
        if self.n_emb % self.n_head or (self.n_emb // self.n_head) % 2 or self.n_emb // self.n_head < 6:
            raise UserError(
                f"DynamicsConfig.n_emb / n_head must be an even head width >= 6 (RoPE pairs for time, height "
                f"and width), got n_emb={self.n_emb}, n_head={self.n_head}. E.g. n_emb=192, n_head=4."
            )
        if self.window < 2:
            raise UserError(
                f"DynamicsConfig.window must be >= 2 (the frame itself and at least one past frame), got "
                f"{self.window}."
            )
        if self.sink < 0 or self.sink >= self.window:
            raise UserError(
                f"DynamicsConfig.sink must be in [0, window), got {self.sink} (window {self.window})."
            )
        if self.mlp_ratio <= 0:
            raise UserError(f"DynamicsConfig.mlp_ratio must be > 0, got {self.mlp_ratio}.")

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid**2  # N

    @property
    def head_dim(self) -> int:
        return self.n_emb // self.n_head

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.n_emb * self.mlp_ratio)


# ---------------------------------------------------------------------------- model


class NextFrameDiT(nn.Module):
    """The denoiser; see the module docstring."""

    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = c = config
        d = c.n_emb
        self.patch_in = nn.Linear(c.patch_dim, d)
        self.time_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.cond_mlp = nn.Sequential(nn.Linear(c.action_dim + c.state_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.null_cond = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(
            DiTBlock(d, c.n_head, c.mlp_hidden, c.tokens_per_frame) for _ in range(c.n_layer)
        )
        # adaLN of every block plus the final layer in one matmul: fewer small eager calls per pass.
        self.adaln = nn.Linear(d, (6 * c.n_layer + 2) * d)
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.patch_out = nn.Linear(d, c.patch_dim)

        pt, ph, pw = rope_pairs(c.head_dim)
        g = c.grid
        hh, ww = torch.meshgrid(
            torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64), indexing="ij"
        )
        spatial = torch.cat(
            [
                hh.reshape(-1, 1) * _axis_frequencies(ph, c.rope_base_space),
                ww.reshape(-1, 1) * _axis_frequencies(pw, c.rope_base_space),
            ],
            dim=1,
        )  # (N, ph + pw) angles
        self.register_buffer("rope_spatial", spatial, persistent=False)
        self.register_buffer("rope_time_freqs", _axis_frequencies(pt, c.rope_base_time), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_cond, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero velocity.
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)
        nn.init.zeros_(self.patch_out.weight)

    # ---------------------------------------------------------------- pieces

    def rope(self, frame_index: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (F*N, Dh/2) for the tokens of frames ``frame_index`` (F,)."""
        n = self.config.tokens_per_frame
        time = frame_index.to(torch.float64).reshape(-1, 1) * self.rope_time_freqs  # (F, pt)
        angles = torch.cat(
            [time.repeat_interleave(n, dim=0), self.rope_spatial.repeat(len(frame_index), 1)], dim=1
        )  # (F*N, Dh/2)
        dtype = self.patch_in.weight.dtype
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def condition(self, t: Tensor, cond: FrameCond) -> Tensor:
        """(B, F) flow times and the frames' conditions -> adaLN input (B, F, D)."""
        c_time = self.time_mlp(timestep_embedding(t, 256))
        c_act = self.cond_mlp(torch.cat([cond.actions, cond.states], dim=-1))
        c_act = torch.where(cond.valid.unsqueeze(-1), c_act, self.null_cond)
        return F.silu(c_time + c_act)

    def modulation(self, c: Tensor) -> list[tuple[Tensor, ...]]:
        """(B, F, D) -> per block a tuple of 6 (B, F, D) tensors, then the final (shift, scale)."""
        chunks = self.adaln(c).chunk(6 * self.config.n_layer + 2, dim=-1)
        per_block = [chunks[6 * i : 6 * i + 6] for i in range(self.config.n_layer)]
        return per_block + [chunks[-2:]]

    def patchify(self, x: Tensor) -> Tensor:
        """(B, F, C, gh, gw) latents -> (B, F*N, C*p*p) token features."""
        b, f, ch, h, w = x.shape
        p = self.config.patch_size
        x = x.reshape(b, f, ch, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, f * (h // p) * (w // p), ch * p * p)

    def unpatchify(self, tokens: Tensor, frames: int) -> Tensor:
        """(B, F*N, C*p*p) -> (B, F, C, gh, gw)."""
        c = self.config
        b = tokens.shape[0]
        p, g = c.patch_size, c.grid
        x = tokens.reshape(b, frames, g, g, c.latent_channels, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, frames, c.latent_channels, c.latent_size, c.latent_size)

    def _head(self, x: Tensor, mod: tuple[Tensor, ...], frames: int) -> Tensor:
        x = modulate(self.norm_out(x), mod[0], mod[1], self.config.tokens_per_frame)
        return self.unpatchify(self.patch_out(x), frames)

    # ---------------------------------------------------------------- passes

    def forward(self, x: Tensor, t: Tensor, cond: FrameCond, frame_index: Tensor | None = None) -> Tensor:
        """Velocity for every frame of a sequence: x (B, T, C, gh, gw), t (B, T) -> (B, T, C, gh, gw).

        ``frame_index`` (T,) gives the frames' absolute indices (default 0..T-1); they set the
        time positions and the window / sink mask.
        """
        c = self.config
        frames = x.shape[1]
        if not torch.jit.is_tracing():
            self._check(x, t, cond)
        if frame_index is None:
            frame_index = torch.arange(frames, device=x.device)
        visibility = frame_visibility(frame_index, frame_index, c.window, c.sink)
        mask = additive_mask(visibility, c.tokens_per_frame, x.dtype)
        cos, sin = self.rope(frame_index)
        mods = self.modulation(self.condition(t, cond))
        h = self.patch_in(self.patchify(x))
        for block, mod in zip(self.blocks, mods):
            h = block(h, mod, cos, sin, mask)
        return self._head(h, mods[-1], frames)

    def forward_cached(
        self,
        x: Tensor,
        t: Tensor,
        cond: FrameCond,
        frame_index: Tensor,
        cache: KVCache,
        slots: Tensor,
    ) -> Tensor:
        """Velocity for F query frames x (B, F, C, gh, gw) at absolute indices ``frame_index`` (F,),
        writing their keys/values into cache ``slots`` (F,) (reserved with ``cache.append``) and
        attending every visible cached frame. Returns (B, F, C, gh, gw)."""
        c = self.config
        frames = x.shape[1]
        if not torch.jit.is_tracing():
            self._check(x, t, cond)
        n = c.tokens_per_frame
        visibility = frame_visibility(frame_index, cache.slot_frame, c.window, c.sink)  # (F, slots)
        # SDPA takes its fast path without a mask; a full cache of one query frame needs none.
        mask = None if bool(visibility.all()) else additive_mask(visibility, n, x.dtype)
        token_index = (slots.reshape(-1, 1) * n + torch.arange(n, device=slots.device)).reshape(-1)
        cos, sin = self.rope(frame_index)
        mods = self.modulation(self.condition(t, cond))
        h = self.patch_in(self.patchify(x))
        for layer, (block, mod) in enumerate(zip(self.blocks, mods)):
            h = block.forward_cached(h, mod, cos, sin, mask, cache.k[layer], cache.v[layer], token_index)
        return self._head(h, mods[-1], frames)

    def _check(self, x: Tensor, t: Tensor, cond: FrameCond) -> None:
        c = self.config
        expected = (c.latent_channels, c.latent_size, c.latent_size)
        if x.ndim != 5 or tuple(x.shape[2:]) != expected:
            raise UserError(
                f"NextFrameDiT latents must have shape (B, F, {', '.join(map(str, expected))}) "
                f"(batch, frames, channels, height, width), got {tuple(x.shape)}. Encode frames with the "
                f"tokenizer this model was configured for."
            )
        b, f = x.shape[:2]
        if tuple(t.shape) != (b, f):
            raise UserError(f"NextFrameDiT t must have shape (B, F) = ({b}, {f}), got {tuple(t.shape)}.")
        if tuple(cond.actions.shape) != (b, f, c.action_dim) or tuple(cond.states.shape) != (
            b,
            f,
            c.state_dim,
        ):
            raise UserError(
                f"NextFrameDiT conditions must be actions ({b}, {f}, {c.action_dim}) and states "
                f"({b}, {f}, {c.state_dim}), got {tuple(cond.actions.shape)} and {tuple(cond.states.shape)}. "
                f"The model was built for action_dim={c.action_dim}, state_dim={c.state_dim}."
            )
        if tuple(cond.valid.shape) != (b, f):
            raise UserError(f"FrameCond.valid must have shape ({b}, {f}), got {tuple(cond.valid.shape)}.")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------- cost


def flops_per_pass(config: DynamicsConfig, query_frames: int, key_frames: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one pass: ``query_frames`` frames attending ``key_frames``
    frames (itself included). Linear layers and attention matmuls only (norms, RoPE, softmax are
    a few per cent)."""
    c = config
    n, d = c.tokens_per_frame, c.n_emb
    tokens, keys = query_frames * n, key_frames * n
    per_layer = tokens * (4 * d * d + 2 * d * c.mlp_hidden) + 2 * tokens * keys * d
    embed = tokens * (c.patch_dim * d * 2)  # patch in + out
    cond = query_frames * (
        256 * d + d * d + (c.action_dim + c.state_dim) * d + d * d + d * (6 * c.n_layer + 2) * d
    )
    return 2 * (c.n_layer * per_layer + embed + cond)


# ---------------------------------------------------------------------------- flow matching


@dataclass
class FlowMatchingConfig:
    """Training noise levels: an independent t per frame, some frames kept nearly clean as context."""

    t_mean: float = 0.0  # logit-normal location (0: centred on t = 0.5)
    t_std: float = 1.0  # logit-normal scale
    context_prob: float = 0.5  # chance a frame is a context frame (low noise, no loss)
    context_noise_max: float = 0.1  # context frames draw t ~ U[0, context_noise_max]
    context_loss_weight: float = 0.0  # loss weight of context frames (targets at t ~ 0 are mostly noise)
    p_uncond: float = 0.1  # chance a frame's action/state condition is replaced by the null embedding
    max_targets: int = 4  # source="last_frame" models: frames generated together at most (1..T-1)
    # Chance a batch's context is the model's own rollout instead of real frames (source="last_frame"
    # models, `dreamrt train world-model`): frames from a random point up to the anchor are generated
    # by the model under the recorded actions (``own_rollout_context``, ``rollout_steps`` Euler steps at
    # temperature 0) and the targets stay real, so it learns to continue, and correct, its own frames.
    rollout_prob: float = 0.0
    rollout_steps: int = 2

    def __post_init__(self) -> None:
        for name in ("context_prob", "context_noise_max", "p_uncond", "rollout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"FlowMatchingConfig.{name} must be in [0, 1], got {value!r}.")
        if self.context_prob >= 1.0:
            raise UserError("FlowMatchingConfig.context_prob must be < 1: some frames need a loss.")
        if self.rollout_steps < 1:
            raise UserError(f"FlowMatchingConfig.rollout_steps must be >= 1, got {self.rollout_steps}.")
        if self.t_std <= 0 or self.context_loss_weight < 0 or self.max_targets < 1:
            raise UserError(
                f"FlowMatchingConfig.t_std must be > 0, context_loss_weight >= 0 and max_targets >= 1, got "
                f"{self.t_std}, {self.context_loss_weight}, {self.max_targets}."
            )


def sample_frame_times(
    shape: tuple[int, int], cfg: FlowMatchingConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(B, T) flow times and the (B, T) bool context-frame mask."""
    t = torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(shape, generator=generator))
    context = torch.rand(shape, generator=generator) < cfg.context_prob
    t_context = torch.rand(shape, generator=generator) * cfg.context_noise_max
    return torch.where(context, t_context, t), context


def generation_layout(
    batch: int, frames: int, max_targets: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Clips laid out as generation sees them: per clip, the last k in [1, max_targets] frames are
    *targets* (generated together) and the frames before them context. Returns the (B, T) bool
    target mask and the (B,) index of each clip's last context frame (the anchor)."""
    if not 1 <= max_targets < frames:
        raise UserError(
            f"max_targets must be in [1, clip frames - 1] = [1, {frames - 1}], got {max_targets}."
        )
    first_target = frames - torch.randint(1, max_targets + 1, (batch,), generator=generator)
    return torch.arange(frames).view(1, -1) >= first_target.view(-1, 1), first_target - 1


def flow_source(
    config: DynamicsConfig, latents: Tensor, noise: Tensor, target: Tensor, anchor: Tensor
) -> Tensor:
    """Where each frame's flow starts (its x at t = 1), (B, T, C, gh, gw): the noise itself, or for
    ``source="last_frame"`` models and target frames the anchor frame (``latents[b, anchor[b]]``)
    plus ``source_sigma`` x noise."""
    if config.source == "noise":
        return noise
    start = latents[torch.arange(latents.shape[0]), anchor].unsqueeze(1) + config.source_sigma * noise
    return torch.where(target.view(*target.shape, 1, 1, 1), start, noise)


def flow_matching_loss(
    model: NextFrameDiT,
    latents: Tensor,
    cond: FrameCond,
    cfg: FlowMatchingConfig,
    generator: torch.Generator | None = None,
    context_latents: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Velocity MSE over a batch of clips: latents (B, T, C, gh, gw), conditions for the T frames.
    ``context_latents`` (same shape, default ``latents``) are what context frames show and target
    frames start from (the anchor): the model's own rollout, for training on it; targets stay ``latents``.

    ``source="noise"`` models train diffusion-forcing style (an independent t per frame, context
    frames drawn with ``context_prob``); ``source="last_frame"`` models in the generation layout
    (:func:`generation_layout`: context, then targets at one shared t that start from the last
    context frame). Returns the scalar loss (mean over frames that carry loss, weighted) and a few
    numbers for logs.
    """
    b, frames = latents.shape[:2]
    device = latents.device
    if model.config.source == "noise":
        t, context = sample_frame_times((b, frames), cfg, generator)
        anchor = torch.zeros(b, dtype=torch.long)
    else:
        target, anchor = generation_layout(b, frames, cfg.max_targets, generator)
        t_target = torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn((b, 1), generator=generator))
        t_context = torch.rand((b, frames), generator=generator) * cfg.context_noise_max
        t, context = torch.where(target, t_target, t_context), ~target
    t, context, anchor = t.to(device), context.to(device), anchor.to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    shown = latents if context_latents is None else context_latents
    source = flow_source(model.config, shown, noise, ~context, anchor)
    tb = t.view(b, frames, 1, 1, 1)
    clean = torch.where(context.view(b, frames, 1, 1, 1), shown, latents)
    x_t = (1 - tb) * clean + tb * source
    drop = (torch.rand((b, frames), generator=generator) < cfg.p_uncond).to(device)
    cond = FrameCond(cond.actions, cond.states, cond.valid & ~drop)
    v = model(x_t, t, cond)
    per_frame = (v - (source - clean)).pow(2).mean(dim=(2, 3, 4))  # (B, T)
    weight = torch.where(context, cfg.context_loss_weight, 1.0)
    loss = (per_frame * weight).sum() / weight.sum().clamp_min(1e-6)
    return loss, {"loss": float(loss.detach()), "context_frames": float(context.float().mean())}


# ---------------------------------------------------------------------------- saving, loading


def save_dynamics(
    model: NextFrameDiT,
    path: str | Path,
    *,
    normalizer: dict[str, Any] | None = None,
    step: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write an inference checkpoint (kind ``world_model/dynamics``): config.yaml is the DynamicsConfig."""
    from dreamrt.training.checkpoint import save_checkpoint

    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=model.config,
        normalizer=normalizer or {},
        step=step,
        kind=DYNAMICS_KIND,
        overwrite=overwrite,
    )


def load_dynamics(path: str | Path) -> tuple[NextFrameDiT, dict[str, Any]]:
    """Load a dynamics checkpoint (or a run's newest): the model in eval mode and its normaliser dict."""
    from dreamrt.training.checkpoint import config_from_dict, load_checkpoint, load_into

    ckpt = load_checkpoint(path, kind=DYNAMICS_KIND)
    model = NextFrameDiT(config_from_dict(DynamicsConfig, ckpt.config, source=f"{ckpt.path}/config.yaml"))
    load_into(model, ckpt)
    return model.eval(), ckpt.normalizer


# ---------------------------------------------------------------------------- size presets

# Shapes only; action_dim / state_dim come from the task, latent shape from the tokenizer.
PRESETS: dict[str, dict] = {
    # The DynamicsConfig defaults, sized for 30 FPS at batch 1 on the 2-core CPU with a 1-2 step
    # student: 4 x 128, 64 tokens per frame (8x8 grid), 8-frame window; 0.34 GFLOP per 1-step frame.
    "small": dict(),
    # 4 x 192 with a 16-frame window: about 2.5x the FLOPs per frame of "small".
    "medium": dict(n_emb=192, window=16),
    # A GPU-sized model for when quality matters more than CPU latency.
    "base": dict(n_layer=8, n_head=6, n_emb=384, window=16),
    # Tests.
    "tiny": dict(n_layer=2, n_head=2, n_emb=32, window=4, latent_size=4),
}


def preset(name: str, action_dim: int, state_dim: int, **overrides: Any) -> DynamicsConfig:
    """A DynamicsConfig from a size preset (``small``, ``medium``, ``base``, ``tiny``) plus overrides."""
    fields = dict(PRESETS[choose("dynamics size preset", name, PRESETS)])
    known = {f.name for f in dataclasses.fields(DynamicsConfig)}
    for key in overrides:
        if key not in known:
            raise UserError(
                f"Unknown DynamicsConfig field '{key}' in preset overrides.{did_you_mean(key, known)} "
                f"Valid fields: {', '.join(sorted(known))}."
            )
    fields.update(overrides)
    return DynamicsConfig(action_dim=action_dim, state_dim=state_dim, **fields)
