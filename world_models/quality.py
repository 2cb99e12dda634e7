"""How good (and how fast) a trained world model is on recorded episodes.

- :func:`ssim`: structural similarity (Gaussian window 11, sigma 1.5, on the mean of the RGB
  channels' SSIM), per image.
- :func:`horizon_quality`: from held-out clips, prefill ``context`` real frames, then generate
  ``max(horizons)`` frames open loop under the recorded actions (cached rollout, batched) and
  report PSNR/SSIM against the real frames at each horizon, next to repeating the last real
  context frame and to the tokenizer's own reconstruction (the ceiling).
- :func:`speculative_stream`: replay a recorded action stream at batch 1 with speculative
  frames (accept while the recorded actions stay within ``tolerance`` of the held one) and
  report acceptance and frames per second.

States: a model conditioned on the robot state gets the *recorded* states during the open-loop
rollout (it does not predict them), which leaks where the arm goes; actions-only models
(``state_dim=0``) are the fair comparison, and the ones :class:`~dreamrt.world_models.env.WorldModelEnv`
runs closed loop.

Dimensions: B clips, H horizon frames, C latent channels, S image size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dreamrt.errors import UserError


def ssim(prediction: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """SSIM per image of (B, 3, H, W) tensors in [0, 1] -> (B,) (valid-region Gaussian windows)."""
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise UserError(
            f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}."
        )
    x, y = prediction.float(), target.float()
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()  # depthwise (C, 1, k, k)

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(dim=1)


@dataclass
class EvalData:
    """What the evaluations read: real frames at the tokenizer's size, their latents, normalised
    actions / states, and the episode boundaries."""

    images: Tensor  # (F, 3, S, S) uint8
    latents: Tensor  # (F, C, h, w) normalised
    actions: Tensor  # (F, A) normalised
    states: Tensor  # (F, S_dim) normalised; (F, 0) for actions-only models
    episode_ends: np.ndarray  # (E,) cumulative

    def float_images(self, rows: Tensor) -> Tensor:
        return self.images[rows].float().div_(255.0)


@torch.no_grad()
def load_eval_data(
    store: str,
    tokenizer: Any,
    normalizer: dict[str, Any],
    *,
    camera: str,
    action_key: str,
    state_key: str,
    max_frames: int | None = None,
    episodes: list[int] | None = None,
) -> EvalData:
    """Read ``store`` (only ``episodes``, renumbered 0.., when given) into memory and encode every
    frame; actions / states normalised with the dynamics checkpoint's normaliser."""
    from dreamrt.world_models.data import encode_episodes, load_frames

    lowdim = [action_key] + ([state_key] if state_key else [])
    if episodes is None:
        data = load_frames(
            store, camera, tokenizer.config.image_size, lowdim_keys=lowdim, max_frames=max_frames
        )
    else:
        data = _load_episodes(store, camera, tokenizer.config.image_size, lowdim, episodes)
    encoded = encode_episodes(
        data, tokenizer, action_key=action_key, state_key=state_key, normalizer=normalizer
    )
    return EvalData(data.frames, encoded.latents, encoded.actions, encoded.states, data.episode_ends)


def _load_episodes(path: str, camera: str, image_size: int, lowdim: list[str], episodes: list[int]) -> Any:
    """Like :func:`~dreamrt.world_models.data.load_frames`, for chosen episodes only."""
    from dreamrt.episodes import open_store
    from dreamrt.world_models.data import EpisodeFrames
    from dreamrt.world_models.tokenizer import images_to_tensor

    store = open_store(path)
    for key in [camera, *lowdim]:
        if key not in store.features:
            raise UserError(f"Store '{path}' has no key '{key}'. Stored keys: {store.keys}.")
    ends = store.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    bad = [e for e in episodes if not 0 <= e < len(ends)]
    if bad or not episodes:
        raise UserError(
            f"Episodes {episodes} are not a non-empty list of episodes of '{path}' (it has {len(ends)})."
        )
    frames, low, lengths = [], {k: [] for k in lowdim}, []
    for e in episodes:
        lo, hi = int(starts[e]), int(ends[e])
        frames.append(
            (images_to_tensor(store.read(camera, lo, hi), image_size) * 255.0).round_().to(torch.uint8)
        )
        for k in lowdim:
            low[k].append(np.asarray(store.read(k, lo, hi), np.float32))
        lengths.append(hi - lo)
    return EpisodeFrames(
        torch.cat(frames), {k: np.concatenate(v) for k, v in low.items()}, np.cumsum(lengths).astype(np.int64)
    )


def clip_starts(
    episode_ends: np.ndarray, episodes: np.ndarray, length: int, per_episode: int, seed: int
) -> np.ndarray:
    """Up to ``per_episode`` first rows of ``length``-frame clips in each chosen episode, evenly spread."""
    starts = np.concatenate([[0], episode_ends[:-1]])
    rows: list[int] = []
    for e in episodes:
        first, last = int(starts[e]), int(episode_ends[e]) - length
        if last < first:
            continue
        n = min(per_episode, last - first + 1)
        rows += np.linspace(first, last, n).round().astype(int).tolist()
    if not rows:
        raise UserError(
            f"No held-out episode has {length} frames (context + the longest horizon); lower the horizons or "
            f"the context, or record longer episodes."
        )
    return np.asarray(rows, np.int64)


@torch.no_grad()
def horizon_quality(
    model: Any,
    tokenizer: Any,
    data: EvalData,
    starts: np.ndarray,
    sampler: Any,
    *,
    context: int,
    horizons: list[int],
    batch_size: int = 32,
    state_predictor: Any = None,
) -> dict[str, Any]:
    """PSNR / SSIM at each horizon for the model, for repeating the last context frame, and for the
    tokenizer's reconstruction of the real frame; means over the clips starting at ``starts``.
    ``model`` decodes relative to the last real frame (:meth:`Tokenizer.detail`, what
    ``WorldModelEnv`` shows), ``model_plain`` decodes the latents alone, and ``perfect_latents``
    decodes the real frame's latent relative to the last real frame: the ceiling of a model
    whose latent predictions were exact.

    ``gain_psnr_hN`` is the model's PSNR minus repeating the last frame's, and
    ``gain_psnr_se_hN`` its standard error across episodes (clips of one episode are not
    independent: each episode's mean gain counts once; NaN with a single episode). A gain two
    standard errors above zero is one a new set of episodes would very likely show again.

    A state-conditioned model gets the recorded states of the
    generated frames, or with ``state_predictor`` (a ``StatePredictor``) its predictions from the
    last context state under the recorded actions: the fair comparison, which sees no future state."""
    from dreamrt.world_models.sampling import Rollout

    h_max = max(horizons)
    sums: dict[str, float] = {}
    gains: dict[int, list[Tensor]] = {h: [] for h in horizons}  # per clip: model minus repeat PSNR
    n = 0
    for i in range(0, len(starts), batch_size):
        first = torch.as_tensor(starts[i : i + batch_size])
        rows = first[:, None] + torch.arange(context + h_max)  # (B, context + H)
        b = len(first)
        rollout = Rollout(model.eval(), sampler, batch_size=b, state_predictor=state_predictor)
        ctx = rows[:, :context]
        rollout.prefill(data.latents[ctx], data.actions[ctx], data.states[ctx])
        last_real = data.float_images(rows[:, context - 1])
        detail = tokenizer.detail(last_real)
        for h in range(1, h_max + 1):
            prev = rows[:, context + h - 2]  # the frame whose action leads to the predicted one
            state = data.states[prev] if data.states.shape[1] and state_predictor is None else None
            z = rollout.step(data.actions[prev], state)
            if h not in horizons:
                continue
            truth_rows = rows[:, context + h - 1]
            truth = data.float_images(truth_rows)
            plain = tokenizer.decode(z)
            pred = (plain + detail).clamp(0, 1)
            recon = tokenizer.decode(data.latents[truth_rows])
            candidates = (
                ("model", pred),
                ("model_plain", plain.clamp(0, 1)),
                ("repeat_last", last_real),
                ("tokenizer", recon.clamp(0, 1)),
                ("perfect_latents", (recon + detail).clamp(0, 1)),  # the real latent, decoded relative
            )
            for name, img in candidates:
                for metric, fn in (("psnr", _psnr), ("ssim", ssim)):
                    key = f"{name}_{metric}_h{h}"
                    sums[key] = sums.get(key, 0.0) + float(fn(img, truth).sum())
            gains[h].append(_psnr(pred, truth) - _psnr(last_real, truth))
        n += b
    episode = np.searchsorted(data.episode_ends, np.asarray(starts), side="right")
    out: dict[str, Any] = {
        "clips": n,
        "episodes": len(np.unique(episode)),
        **{k: v / n for k, v in sums.items()},
    }
    for h in horizons:
        per_clip = torch.cat(gains[h]).numpy()
        per_episode = np.array([per_clip[episode == e].mean() for e in np.unique(episode)])
        out[f"gain_psnr_h{h}"] = float(per_clip.mean())
        out[f"gain_psnr_se_h{h}"] = (
            float(per_episode.std(ddof=1) / np.sqrt(len(per_episode)))
            if len(per_episode) > 1
            else float("nan")
        )
    return out


def _psnr(a: Tensor, b: Tensor) -> Tensor:
    from dreamrt.world_models.tokenizer import psnr

    return psnr(a, b)


@torch.inference_mode()
def timed_stream(
    model: Any,
    tokenizer: Any,
    data: EvalData,
    start: int,
    frames: int,
    sampler: Any,
    *,
    context: int,
    kv_cache: bool = True,
    speculate: int = 0,
    tolerance: float = 0.05,
    warmup: int = 3,
    action_hold: int = 1,
) -> dict[str, float]:
    """Generate ``frames`` frames at batch 1 under the recorded actions from row ``start`` (decoding
    each accepted frame) and time it. ``kv_cache=False`` recomputes the window for every denoising
    step (:func:`generate_uncached`). ``speculate=k``: speculate k frames under the current action,
    accept while the recorded next actions stay within ``tolerance`` (max abs, normalised units) of
    it, roll back the rest. ``action_hold=n`` turns the recorded stream into one whose actions
    repeat: every n-th recorded action held for n frames (zero-order hold, what a controller
    running at 1/n of the camera rate sends). Frames are decoded relative to the last real frame
    (:meth:`Tokenizer.detail`), as the quality figures are. Returns fps, ms per frame and, when
    speculating, the acceptance rate (accepted / speculated frames) and frames per speculation."""
    from dreamrt.world_models.dynamics import FrameCond, frame_conditions
    from dreamrt.world_models.sampling import Rollout, context_frames, generate_uncached

    total = context + warmup + frames
    if start + total > len(data.latents):
        raise UserError(
            f"The stream needs {total} frames from row {start}; the store has {len(data.latents)}."
        )
    if action_hold < 1:
        raise UserError(f"action_hold must be >= 1, got {action_hold}.")
    rows = torch.arange(start, start + total)
    held = start + (torch.arange(total) // action_hold) * action_hold
    lat, act, st = data.latents[rows][None], data.actions[held][None], data.states[rows][None]
    detail = tokenizer.detail(data.float_images(rows[context - 1 : context]))
    has_state = st.shape[-1] > 0
    window = model.config.window

    if not kv_cache:
        ctx = context_frames(lat[:, :context], frame_conditions(act[:, :context], st[:, :context]), sampler)
        times = []
        for i in range(warmup + frames):
            prev = context - 1 + i
            cond = FrameCond(
                act[:, prev : prev + 1], st[:, prev : prev + 1], torch.ones(1, 1, dtype=torch.bool)
            )
            t0 = time.perf_counter()
            z, new = generate_uncached(model, ctx[-(window - 1) :], cond, sampler)
            tokenizer.decode(z[:, 0], detail)
            times.append(time.perf_counter() - t0)
            ctx = ctx[-(window - 1) :] + new
        return _timing(times[warmup:], 1)

    k = max(1, speculate)
    rollout = Rollout(model, sampler, batch_size=1, max_speculation=k)
    rollout.prefill(lat[:, :context], act[:, :context], st[:, :context])
    pos = context - 1  # the last frame we have; its action leads to the next one
    produced, speculations, speculated, accepted_total, t_start = 0, 0, 0, 0, None
    limit = context - 1 + warmup + frames
    while pos < limit:
        if t_start is None and pos >= context - 1 + warmup:
            t_start, produced = time.perf_counter(), 0
        a, s = act[:, pos], (st[:, pos] if has_state else None)
        if speculate:
            k_now = min(k, limit - pos)
            zs = rollout.speculate(k_now, a, s)
            m = 1
            while m < k_now and float((act[0, pos + m] - act[0, pos]).abs().max()) <= tolerance:
                m += 1
            rollout.accept(m)
            tokenizer.decode(zs[0, :m], detail.expand(m, -1, -1, -1))
            if t_start is not None:
                speculations += 1
                speculated += k_now
                accepted_total += m
        else:
            z = rollout.step(a, s)
            tokenizer.decode(z, detail)
            m = 1
        pos += m
        produced += m
    elapsed = time.perf_counter() - t_start
    out = {"fps": produced / elapsed, "frame_ms": 1e3 * elapsed / produced}
    if speculate:
        out["acceptance_rate"] = accepted_total / max(1, speculated)
        out["frames_per_speculation"] = accepted_total / max(1, speculations)
    return out


def _timing(seconds: list[float], per: int) -> dict[str, float]:
    total = sum(seconds)
    produced = per * len(seconds)
    return {"fps": produced / total, "frame_ms": 1e3 * total / produced}
