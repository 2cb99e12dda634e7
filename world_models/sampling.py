"""Generating frames with the next-frame DiT: samplers, cached rollouts, speculation, a reference.

Sampling a frame: start from noise at t = 1, evaluate the velocity at ``sampling_times`` and
step to t = 0 with a solver:
- ``euler``: ``x <- x + (t_next - t) v``, the flow-matching ODE (the teacher, N steps);
- ``x0``: predict ``x_0 = x - t v`` and re-noise to ``t_next`` with fresh noise: multistep
  consistency sampling, the plug for a distilled 1-4 step student (sCM / consistency /
  shortcut students predict the same velocity, so they load as a ``NextFrameDiT`` and take
  ``FrameSamplerConfig(solver="x0", timesteps=[...])``).
Noise is drawn per frame index from ``seed`` (``frame_noise``), so the same frame gets the same
noise whether it is generated alone, speculated, or recomputed by the reference.

A generated frame becomes context as ``x_ctx = (1 - tc) x_0 + tc eps`` at level
``tc = context_noise`` (NFD: a little noise on context limits drift; the model saw such
frames in training, see ``FlowMatchingConfig``). Its keys/values must then be written into
the cache at that input, and there are two ways (``kv_write``):
- ``"fused"`` (default, no extra pass): the frame's context input rides along in the *first*
  denoising pass of the next frame (ACDiT's trick): that pass runs 2 frames of tokens instead
  of one, and nothing else changes. Until then the frame's cache slot holds the keys/values of
  its last denoising step (never attended: the next pass overwrites them in each layer before
  attention). Cost: +N query tokens in one pass per frame: the FLOPs of a separate pass without
  its fixed eager overhead. Measured here (default "small" size, 1 thread, p10): a 1-frame pass
  3.6 ms, a 2-frame pass 6.0 ms, so the write costs ~0.7 of a pass instead of 1. The cache
  keeps ``max_speculation`` extra frames for it (the windows of the frames still owed), so
  every pass attends with a mask (no measurable cost here).
- ``"clean_pass"``: one extra pass over the finished frame right away: steps + 1 passes per
  frame. Simpler to reason about (the cache is final after every call).
Both give the same frames (tests check against the reference to 1e-5).

:class:`Rollout` holds a model, a :class:`~dreamrt.world_models.kv_cache.KVCache` and what the
fused mode still owes. ``prefill`` the observed frames, then ``step(action)`` per frame, or
``speculate(k, action)`` k frames in one parallel pass (each denoising pass runs k frames
under block-causal attention, all assuming the action holds) and ``accept(n)`` the first n
once the real actions are known; the rest are rolled back exactly.

A model conditioned on the robot state needs the state at every frame it generates. Given a
:class:`~dreamrt.world_models.proprio.StatePredictor` (``state_predictor``), the rollout tracks
it: ``prefill`` sets it from the last observed state, every generated frame advances it under the
frame's action, and ``step(action)`` / ``speculate(k, action)`` need no state (passing one
overrides the tracked state from there on). ``current_state`` reads it.

:func:`generate_uncached` recomputes the whole sequence for every denoising step with
``NextFrameDiT.forward``: slow, simple, and the reference the cached path is tested against.

Dimensions: B batch, k frames generated together, C latent channels, gh x gw latent grid,
A action dim, S state dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dreamrt.errors import UserError, choose
from dreamrt.world_models.dynamics import FrameCond, NextFrameDiT, frame_conditions
from dreamrt.world_models.kv_cache import KVCache, KVCacheConfig, KVCacheSnapshot

SOLVERS = ("euler", "x0")
KV_WRITES = ("fused", "clean_pass")
_NOISE, _CONTEXT_NOISE, _RENOISE = 0, 1, 2  # noise streams per frame; re-noise uses 2 + step


@dataclass
class FrameSamplerConfig:
    steps: int = 8  # velocity evaluations per frame (ignored when timesteps is given)
    solver: str = "euler"  # "euler" (ODE) | "x0" (predict x0, re-noise: consistency students)
    shift: float = 1.0  # > 1 spends more steps at high noise: t' = s t / (1 + (s - 1) t)
    timesteps: list[float] | None = None  # explicit evaluation times, decreasing in (0, 1]
    context_noise: float = 0.0  # tc: noise level of generated frames when they become context
    # Scale of the starting (and re-noising) noise: 1 samples the model's distribution; 0 starts
    # every frame at the source's mean (the last frame, for source="last_frame" models), which keeps
    # sampling noise from accumulating over long rollouts. 0 is measured better on every shipped
    # model (docs/world_models.md), and models trained on their own rollouts generated them at 0.
    temperature: float = 0.0
    kv_write: str = "fused"  # "fused" | "clean_pass" (see the module docstring)
    seed: int = 0

    def __post_init__(self) -> None:
        choose("sampler solver", self.solver, SOLVERS)
        choose("sampler kv_write", self.kv_write, KV_WRITES)
        if self.timesteps is None and (not isinstance(self.steps, int) or self.steps < 1):
            raise UserError(f"FrameSamplerConfig.steps must be a positive integer, got {self.steps!r}.")
        if self.timesteps is not None:
            ts = [float(t) for t in self.timesteps]
            if not ts or any(not 0 < t <= 1 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise UserError(
                    f"FrameSamplerConfig.timesteps must be a non-empty, strictly decreasing list in (0, 1], got "
                    f"{self.timesteps!r}; e.g. [1.0, 0.75, 0.5, 0.25] for a 4-step student."
                )
        if self.shift <= 0:
            raise UserError(f"FrameSamplerConfig.shift must be > 0, got {self.shift}.")
        if not 0.0 <= self.temperature <= 1.0:
            raise UserError(f"FrameSamplerConfig.temperature must be in [0, 1], got {self.temperature}.")
        if not 0.0 <= self.context_noise < 1.0:
            raise UserError(f"FrameSamplerConfig.context_noise must be in [0, 1), got {self.context_noise}.")


def sampling_times(cfg: FrameSamplerConfig) -> list[float]:
    """The evaluation times followed by 0: [t_0 = 1 (or the first explicit time), ..., 0]."""
    if cfg.timesteps is not None:
        return [float(t) for t in cfg.timesteps] + [0.0]
    s = cfg.shift
    uniform = [1.0 - i / cfg.steps for i in range(cfg.steps + 1)]
    return [s * t / (1 + (s - 1) * t) for t in uniform]


def frame_noise(
    seed: int, frame: int, stream: int, shape: Sequence[int], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise for (seed, frame index, stream): the same wherever the frame is made."""
    g = torch.Generator().manual_seed(((seed % 1_000_003) * 10_000_019 + frame) * 64 + stream)
    return torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)


Velocity = Callable[[Tensor, float, int], Tensor]  # (x (B, k, C, gh, gw), t, step index) -> v


def denoise(
    velocity: Velocity,
    noise: Tensor,
    frames: Sequence[int],
    cfg: FrameSamplerConfig,
    start: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Run the solver from t = 1 to t = 0 and return x_0 estimates (B, k, C, gh, gw). The flow starts
    at ``start(noise)`` (default: the noise itself; see :func:`flow_start`), and the ``x0`` solver
    re-noises towards ``start`` of fresh noise."""
    flow = start or (lambda eps: eps)
    times = sampling_times(cfg)

    def start(eps: Tensor) -> Tensor:
        return flow(eps * cfg.temperature)

    x = start(noise)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = velocity(x, t, i)
        if cfg.solver == "euler":
            x = x + (t_next - t) * v
        else:
            x0 = x - t * v
            if t_next > 0:
                fresh = torch.stack(
                    [
                        frame_noise(cfg.seed, f, _RENOISE + i, x.shape[:1] + x.shape[2:], x.device, x.dtype)
                        for f in frames
                    ],
                    dim=1,
                )
                x = (1 - t_next) * x0 + t_next * start(fresh)
            else:
                x = x0
    return x


def flow_start(model: NextFrameDiT, anchor: Tensor) -> Callable[[Tensor], Tensor]:
    """Where the model's flow starts for new frames, given the last clean frame ``anchor`` (B, C, gh, gw):
    noise (``source="noise"``) or ``anchor + source_sigma * noise`` (``source="last_frame"``)."""
    c = model.config
    if c.source == "noise":
        return lambda eps: eps
    return lambda eps: anchor.unsqueeze(1) + c.source_sigma * eps


@dataclass(frozen=True)
class ContextFrame:
    """A frame as later frames see it: its input ``x`` (B, C, gh, gw) at noise level ``t``, its
    condition, and its clean latent (the anchor of the frames generated after it)."""

    index: int
    x: Tensor
    t: float
    cond: FrameCond  # (B, 1, ...)
    clean: Tensor


def to_context(x0: Tensor, index: int, cond: FrameCond, cfg: FrameSamplerConfig) -> ContextFrame:
    """A clean latent (B, C, gh, gw) -> its context form with ``cfg.context_noise`` added."""
    tc = cfg.context_noise
    x = x0
    if tc > 0:
        eps = frame_noise(cfg.seed, index, _CONTEXT_NOISE, x0.shape, x0.device, x0.dtype)
        x = (1 - tc) * x0 + tc * eps
    return ContextFrame(index, x, tc, cond, x0)


def context_frames(
    latents: Tensor, cond: FrameCond, cfg: FrameSamplerConfig, first_index: int = 0
) -> list[ContextFrame]:
    """Observed latents (B, F, C, gh, gw) with their conditions -> context frames first_index, ..."""
    return [
        to_context(latents[:, i], first_index + i, cond.frames(i, i + 1), cfg)
        for i in range(latents.shape[1])
    ]


def _stack(frames: Sequence[ContextFrame]) -> tuple[Tensor, Tensor, FrameCond, list[int]]:
    x = torch.stack([f.x for f in frames], dim=1)  # (B, F, C, gh, gw)
    t = torch.tensor([[f.t for f in frames]], dtype=x.dtype, device=x.device).expand(x.shape[0], -1)
    return x, t, FrameCond.cat([f.cond for f in frames]), [f.index for f in frames]


def _initial_noise(cfg: FrameSamplerConfig, frames: Sequence[int], like: Tensor) -> Tensor:
    """(B, k, C, gh, gw) starting noise; ``like`` is a (B, C, gh, gw) tensor of the right shape."""
    return torch.stack(
        [frame_noise(cfg.seed, f, _NOISE, like.shape, like.device, like.dtype) for f in frames], 1
    )


def _check_cond(
    model: NextFrameDiT, action: Tensor, state: Tensor | None, batch: int
) -> tuple[Tensor, Tensor]:
    c = model.config
    action = torch.as_tensor(action, dtype=torch.float32)
    if action.ndim == 1:
        action = action.unsqueeze(0)
    if tuple(action.shape) != (batch, c.action_dim):
        raise UserError(
            f"action must have shape ({batch}, {c.action_dim}) or ({c.action_dim},) (normalised, as in "
            f"training), got {tuple(action.shape)}."
        )
    if c.state_dim == 0:
        if state is not None and torch.as_tensor(state).numel() > 0:
            raise UserError("This world model takes no robot state (state_dim=0); pass state=None.")
        return action, action.new_zeros(batch, 0)
    if state is None:
        raise UserError(
            f"This world model is conditioned on the robot state (state_dim={c.state_dim}); pass the state at "
            f"the current frame, shape ({batch}, {c.state_dim})."
        )
    state = torch.as_tensor(state, dtype=torch.float32)
    if state.ndim == 1:
        state = state.unsqueeze(0)
    if tuple(state.shape) != (batch, c.state_dim):
        raise UserError(f"state must have shape ({batch}, {c.state_dim}), got {tuple(state.shape)}.")
    return action, state


# ---------------------------------------------------------------------------- the reference


@torch.inference_mode()
def generate_uncached(
    model: NextFrameDiT, context: Sequence[ContextFrame], cond: FrameCond, cfg: FrameSamplerConfig
) -> tuple[Tensor, list[ContextFrame]]:
    """Generate the k frames after ``context`` (their conditions ``cond`` (B, k, ...)) jointly,
    recomputing the whole sequence for every denoising step. Returns x_0 (B, k, C, gh, gw) and
    the new frames' context form (append them to ``context`` to go on)."""
    if not context:
        raise UserError("generate_uncached needs at least one context frame.")
    k = cond.actions.shape[1]
    first = context[-1].index + 1
    frames = list(range(first, first + k))
    ctx_x, ctx_t, ctx_cond, ctx_index = _stack(context)
    all_cond = FrameCond.cat([ctx_cond, cond])
    index = torch.tensor(ctx_index + frames, device=ctx_x.device)

    def velocity(x: Tensor, t: float, step: int) -> Tensor:
        ts = torch.cat([ctx_t, torch.full((x.shape[0], k), t, dtype=x.dtype, device=x.device)], 1)
        return model(torch.cat([ctx_x, x], 1), ts, all_cond, frame_index=index)[:, -k:]

    start = flow_start(model, context[-1].clean)
    x0 = denoise(velocity, _initial_noise(cfg, frames, ctx_x[:, 0]), frames, cfg, start)
    new = [to_context(x0[:, i], f, cond.frames(i, i + 1), cfg) for i, f in enumerate(frames)]
    return x0, new


# ---------------------------------------------------------------------------- cached rollouts


@dataclass
class RolloutSnapshot:
    cache: KVCacheSnapshot
    context: dict[int, ContextFrame]
    owed: list[ContextFrame]
    state: Tensor | None = None


@dataclass
class Rollout:
    """Cached autoregressive generation with one model; see the module docstring.

    ``max_speculation`` is the largest k for :meth:`speculate` (it sizes the cache).
    ``state_predictor`` (a ``StatePredictor``, for state-conditioned models) supplies the states
    of generated frames.
    """

    model: NextFrameDiT
    sampler: FrameSamplerConfig = field(default_factory=FrameSamplerConfig)
    batch_size: int = 1
    max_speculation: int = 1
    state_predictor: Any = None
    cache: KVCache = field(init=False)
    # The context form of every frame in the cache (its input for a fused refresh).
    context: dict[int, ContextFrame] = field(init=False, default_factory=dict)
    # Fused mode: frames whose keys/values the next pass must write (their final input).
    owed: list[ContextFrame] = field(init=False, default_factory=list)
    # The (B, S) normalised state at the current frame: observed, or predicted by state_predictor;
    # and with a predictor, the state at each tentative frame.
    current_state: Tensor | None = field(init=False, default=None)
    tentative_states: list[Tensor] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.max_speculation < 1 or self.batch_size < 1:
            raise UserError(
                f"Rollout needs batch_size >= 1 and max_speculation >= 1, got {self.batch_size}, "
                f"{self.max_speculation}."
            )
        if self.state_predictor is not None:
            c, pc = self.model.config, self.state_predictor.config
            if c.state_dim == 0 or (pc.state_dim, pc.action_dim) != (c.state_dim, c.action_dim):
                raise UserError(
                    f"The state predictor steps states of {pc.state_dim} dims under {pc.action_dim}-d actions; the "
                    f"world model takes {c.state_dim}-d states and {c.action_dim}-d actions. A state predictor "
                    f"serves a state-conditioned model trained on the same store."
                )
        p = next(self.model.parameters())
        requery = self.max_speculation if self.sampler.kv_write == "fused" else 0
        config = KVCacheConfig.for_model(
            self.model.config, self.batch_size, max_pending=self.max_speculation, requery=requery
        )
        self.cache = KVCache.allocate(config, device=p.device, dtype=p.dtype)

    @property
    def length(self) -> int:
        """Frames in the sequence so far (tentative ones included)."""
        return self.cache.length

    def reset(self) -> None:
        self.cache.reset()
        self.context.clear()
        self.owed = []
        self.current_state = None
        self.tentative_states = []

    @torch.inference_mode()
    def prefill(self, latents: Tensor, actions: Tensor | None = None, states: Tensor | None = None) -> None:
        """Start from observed frames: latents (B, F, C, gh, gw) (normalised, from the tokenizer) with
        store-aligned actions (B, F, A) and states (B, F, S) (row i: taken / observed at frame i; frame
        i+1 is conditioned on row i, the last row is not used: pass it to :meth:`step`). Without
        actions the frames get the null condition. Resets the rollout first."""
        self.reset()
        c = self.model.config
        b, f = latents.shape[:2]
        if b != self.batch_size:
            raise UserError(f"prefill latents have batch {b}, the rollout was built for {self.batch_size}.")
        if actions is None:
            cond = FrameCond(
                latents.new_zeros(b, f, c.action_dim),
                latents.new_zeros(b, f, c.state_dim),
                torch.zeros(b, f, dtype=torch.bool, device=latents.device),
            )
        else:
            if states is None and c.state_dim:
                raise UserError(f"prefill needs states (B, F, {c.state_dim}) with the actions.")
            cond = frame_conditions(actions.to(latents), None if states is None else states.to(latents))
        frames = context_frames(latents, cond, self.sampler)
        chunk = self.cache.config.max_pending
        for start in range(0, f, chunk):
            part = frames[start : start + chunk]
            slots = self.cache.append(len(part))
            x, t, pc, index = _stack(part)
            self.model.forward_cached(x, t, pc, torch.tensor(index, device=x.device), self.cache, slots)
            self.cache.accept()
        self._keep(frames)
        if states is not None and c.state_dim:
            self.current_state = states[:, -1].to(latents)

    @torch.inference_mode()
    def step(self, action: Tensor, state: Tensor | None = None) -> Tensor:
        """Generate and accept the next frame given the action taken (and the state observed) at the
        current frame: (B, A), (B, S); with a ``state_predictor`` the state may be left out. Returns
        its latent x_0 (B, C, gh, gw)."""
        x0 = self._generate(1, action, state)
        self.cache.accept()
        self._accept_states(1)
        return x0[:, 0]

    @torch.inference_mode()
    def speculate(self, k: int, action: Tensor, state: Tensor | None = None) -> Tensor:
        """Generate the next k frames in one parallel denoising run, assuming ``action`` holds for all
        of them (the state stays at ``state``, or with a ``state_predictor`` follows the held action).
        The frames stay tentative until :meth:`accept`. Returns x_0 (B, k, C, gh, gw)."""
        if not 1 <= k <= self.max_speculation:
            raise UserError(
                f"speculate(k): k must be in [1, {self.max_speculation}] (max_speculation), got {k}."
            )
        return self._generate(k, action, state)

    def accept(self, n: int) -> None:
        """Keep the first n tentative frames of a speculation, roll back the rest exactly."""
        self.cache.accept(n)
        self.owed = [f for f in self.owed if f.index < self.cache.length]
        self._trim()
        self._accept_states(n)

    def snapshot(self) -> RolloutSnapshot:
        """A copy of the rollout's state (the cache tensors are copied)."""
        return RolloutSnapshot(self.cache.snapshot(), dict(self.context), list(self.owed), self.current_state)

    def restore(self, snapshot: RolloutSnapshot) -> None:
        self.cache.restore(snapshot.cache)
        self.context = dict(snapshot.context)
        self.owed = list(snapshot.owed)
        self.current_state = snapshot.state
        self.tentative_states = []

    def context_frames(self) -> list[ContextFrame]:
        """The frames in the cache as later frames see them, by index."""
        return [self.context[i] for i in sorted(self.context)]

    # ---------------------------------------------------------------- internals

    def _generate(self, k: int, action: Tensor, state: Tensor | None) -> Tensor:
        if self.cache.length == 0:
            raise UserError("The rollout has no frames yet: prefill() it with at least one observed frame.")
        if self.cache.pending:
            raise UserError(
                f"{self.cache.pending} speculative frame(s) are still tentative: accept(n) them (n = how many "
                f"the real actions confirmed) before generating more."
            )
        model, cfg, cache = self.model, self.sampler, self.cache
        like = next(iter(self.context.values())).x
        predictor = self.state_predictor
        if state is None and predictor is not None:
            if self.current_state is None:
                raise UserError(
                    "The rollout has no state to predict from: prefill() it with the observed states, or pass the "
                    "current state."
                )
            state = self.current_state
        action, state = _check_cond(model, action, state, like.shape[0])
        b = like.shape[0]
        action, state = action.to(like), state.to(like)
        if predictor is not None:
            # Frame j of the k is conditioned on the state reached after j steps of the held action.
            chain = [state]
            for _ in range(k):
                chain.append(predictor(chain[-1], action))
            self.tentative_states = chain[1:]
            frame_states = torch.stack(chain[:k], 1)
        else:
            self.current_state = None  # the state at the generated frames is unknown without a predictor
            frame_states = state.unsqueeze(1).expand(b, k, -1)
        cond = FrameCond(
            action.unsqueeze(1).expand(b, k, -1),
            frame_states,
            torch.ones(b, k, dtype=torch.bool, device=like.device),
        )
        first = cache.length
        frames = list(range(first, first + k))
        slots = cache.append(k)
        index = torch.tensor(frames, device=like.device)
        owed = self.owed
        if owed:
            ox, ot, oc, oi = _stack(owed)
            fused_index = torch.cat([torch.tensor(oi, device=like.device), index])
            fused_slots = torch.cat([cache.slots_of(oi), slots])
            fused_cond = FrameCond.cat([oc, cond])

        def velocity(x: Tensor, t: float, step: int) -> Tensor:
            tk = torch.full((b, k), t, dtype=x.dtype, device=x.device)
            if step == 0 and owed:
                # The owed frames' final keys/values are written in this pass, before any later
                # frame reads them (block-causal order within each layer).
                xs, ts = torch.cat([ox, x], 1), torch.cat([ot, tk], 1)
                return model.forward_cached(xs, ts, fused_cond, fused_index, cache, fused_slots)[:, -k:]
            return model.forward_cached(x, tk, cond, index, cache, slots)

        anchor = self.context[max(self.context)].clean  # the last accepted frame (nothing is pending)
        x0 = denoise(velocity, _initial_noise(cfg, frames, like), frames, cfg, flow_start(model, anchor))
        new = [to_context(x0[:, i], f, cond.frames(i, i + 1), cfg) for i, f in enumerate(frames)]
        if cfg.kv_write == "clean_pass":
            x, t, nc, _ = _stack(new)
            model.forward_cached(x, t, nc, index, cache, slots)
            self.owed = []
        else:
            self.owed = new
        self._keep(new)
        return x0

    def _accept_states(self, n: int | None) -> None:
        kept = self.tentative_states if n is None else self.tentative_states[:n]
        if kept:
            self.current_state = kept[-1]
        self.tentative_states = []

    def _keep(self, frames: Sequence[ContextFrame]) -> None:
        for f in frames:
            self.context[f.index] = f
        self._trim()

    def _trim(self) -> None:
        held = set(self.cache.frames())
        self.context = {i: f for i, f in self.context.items() if i in held}


# ---------------------------------------------------------------------------- training on own rollouts


def own_rollout_context(
    model: NextFrameDiT,
    latents: Tensor,
    actions: Tensor,
    states: Tensor,
    first: int,
    sampler: FrameSamplerConfig,
) -> Tensor:
    """The clips ``latents`` (B, T, C, gh, gw) as the model itself would continue them: frames
    ``first .. T-2`` replaced by its own cached rollout from the real frames before ``first`` under
    the recorded actions (B, T, A) and states (B, T, S) (store-aligned); the last frame is kept.

    Training on these as context (``FlowMatchingConfig.rollout_prob``) shows the model the frames it
    will really be conditioned on after a few generated steps, rather than only real ones (exposure
    bias). A normal tensor, no gradient; the model's train/eval mode is left as it was.
    """
    b, frames = latents.shape[:2]
    if not 1 <= first <= frames - 2:
        raise UserError(
            f"own_rollout_context: first must be in [1, {frames - 2}] (T = {frames}), got {first}."
        )
    was_training = model.training
    model.eval()
    try:
        rollout = Rollout(model, sampler, batch_size=b)
        with_states = states.shape[-1] > 0
        rollout.prefill(latents[:, :first], actions[:, :first], states[:, :first] if with_states else None)
        generated = [
            rollout.step(actions[:, i - 1], states[:, i - 1] if with_states else None)
            for i in range(first, frames - 1)
        ]
    finally:
        model.train(was_training)
    # Cloned outside inference mode: the result feeds a graph that autograd records.
    return torch.cat([latents[:, :first], torch.stack(generated, 1).clone(), latents[:, -1:]], 1)
