"""Training jobs for the world model: the frame tokenizer, then the next-frame dynamics model.

    run_tokenizer(TokenizerTrainConfig(store=..., ...), out_dir)   -> checkpoints of kind world_model/tokenizer
    run_dynamics(DynamicsTrainConfig(store=..., tokenizer=..., ...), out_dir)
                                                                   -> checkpoints of kind world_model/dynamics

Both read the store into memory once (``dreamrt.world_models.data``), train with AdamW and a
warm-up + cosine learning rate, show a tqdm bar, append ``metrics.csv`` in ``out_dir`` and
write resumable checkpoints (``out_dir/checkpoints/step_*``, training state included); a run
started on a directory that already has checkpoints continues from the newest. Randomness
comes from the global generators seeded with ``seed``, which the checkpoints capture.

The dynamics job encodes every frame with the (frozen) tokenizer once, normalises actions and
states to [-1, 1] (min-max over the store; the normaliser goes into the checkpoint) and trains
on T-frame clips with :func:`~dreamrt.world_models.dynamics.flow_matching_loss`. At the end it
measures one-step prediction on held-out clips: the cached sampler predicts the last frame of
each clip from the others, compared with repeating the last context frame (latent MSE, and
PSNR after decoding).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult
from dreamrt.world_models.dynamics import (
    DYNAMICS_KIND,
    DynamicsConfig,
    FlowMatchingConfig,
    NextFrameDiT,
    flow_matching_loss,
    frame_conditions,
)
from dreamrt.world_models.proprio import (
    STATE_KIND,
    StatePredictor,
    StatePredictorConfig,
    open_loop_error,
    state_rollout_loss,
    wrapping_dims,
)
from dreamrt.world_models.sampling import FrameSamplerConfig, own_rollout_context
from dreamrt.world_models.tokenizer import TOKENIZER_KIND, Tokenizer, TokenizerConfig, psnr

MISSING = "???"  # OmegaConf's marker for a required value


@dataclass
class OptimConfig:
    steps: int = 20000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 50
    save_every: int = 2000
    keep_last: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise UserError(f"optim.{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip <= 0:
            raise UserError(
                f"optim needs lr > 0, warmup_steps >= 0, min_lr_ratio in [0, 1], grad_clip > 0; got lr={self.lr}, "
                f"warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio}, grad_clip={self.grad_clip}."
            )


@dataclass
class TokenizerTrainConfig:
    store: str = MISSING  # episode store
    camera: str = "observation.images.static"
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(batch_size=64, lr=1e-3, warmup_steps=200))
    kl_weight: float = 1e-6
    max_frames: int = 200_000  # whole episodes up to this many frames are read into memory
    val_ratio: float = 0.05  # held-out episodes for the PSNR reported at the end
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default

    def __post_init__(self) -> None:
        _check_common(self)
        if self.kl_weight < 0:
            raise UserError(f"kl_weight must be >= 0, got {self.kl_weight}.")


@dataclass
class DynamicsTrainConfig:
    store: str = MISSING  # episode store
    tokenizer: str = MISSING  # tokenizer checkpoint (or its run directory)
    camera: str = "observation.images.static"
    action_key: str = "action"
    state_key: str = "observation.state"  # "" conditions on actions only
    # action_dim, state_dim, latent_channels and latent_size are taken from the store and tokenizer.
    model: DynamicsConfig = field(default_factory=DynamicsConfig)
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    sampler: FrameSamplerConfig = field(default_factory=FrameSamplerConfig)  # for the final evaluation
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip_frames: int = 16  # T; at least model.window, so training sees the full window
    max_frames: int = 200_000
    val_ratio: float = 0.05
    eval_clips: int = 64
    seed: int = 0
    threads: int = 0
    # A trained dynamics checkpoint (or run) whose weights and architecture start a new run; see
    # start_from. The run's optimiser and schedule start fresh.
    init: str = ""

    def __post_init__(self) -> None:
        _check_common(self)
        if self.tokenizer in ("", MISSING):
            raise UserError(
                "tokenizer is required: the checkpoint of a trained tokenizer (run_tokenizer's output)."
            )
        if self.clip_frames < 2 or self.eval_clips < 1:
            raise UserError(
                f"clip_frames must be >= 2 and eval_clips >= 1, got {self.clip_frames}, {self.eval_clips}."
            )
        if self.flow.rollout_prob and self.model.source != "last_frame":
            raise UserError(
                "flow.rollout_prob needs a model.source=last_frame model: own-rollout context is laid out as "
                "generation lays it out (context, then targets from the last context frame)."
            )
        if self.flow.rollout_prob and self.clip_frames - 1 - self.flow.max_targets < 1:
            raise UserError(
                f"flow.rollout_prob needs clip_frames >= flow.max_targets + 2 (a real frame to start the rollout "
                f"from and one generated frame), got clip_frames={self.clip_frames}, max_targets="
                f"{self.flow.max_targets}."
            )


@dataclass
class StatePredictorTrainConfig:
    """The robot-state predictor (``dreamrt.world_models.proprio``): low-dim data only, minutes on a CPU."""

    store: str = MISSING
    action_key: str = "action"
    state_key: str = "observation.state"
    # state_dim, action_dim and held dims are taken from the store.
    model: StatePredictorConfig = field(default_factory=StatePredictorConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            steps=3000, batch_size=64, lr=1e-3, warmup_steps=100, save_every=1000
        )
    )
    unroll: int = 16  # open-loop steps per training clip: the horizon the world model is measured at
    max_frames: int = 200_000
    val_ratio: float = 0.05
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        _check_common(self)
        if not self.state_key:
            raise UserError(
                "state_key is required: the robot-state key the predictor learns, e.g. observation.state."
            )
        if self.unroll < 1:
            raise UserError(f"unroll must be >= 1, got {self.unroll}.")


def _check_common(cfg: Any) -> None:
    if cfg.store in ("", MISSING):
        raise UserError("store is required: the episode store to train on, e.g. store=demos.zarr.")
    if not 0 <= cfg.val_ratio < 1 or cfg.max_frames < 1:
        raise UserError(
            f"val_ratio must be in [0, 1) and max_frames >= 1, got {cfg.val_ratio}, {cfg.max_frames}."
        )
    if cfg.threads < 0:
        raise UserError(f"threads must be >= 0, got {cfg.threads}.")


@dataclass
class TrainWorldModelConfig:
    """`dreamrt train world-model`: ``stage=tokenizer``, ``stage=dynamics tokenizer=RUN`` or
    ``stage=both`` (the tokenizer into OUT/tokenizer, then the dynamics into OUT/dynamics)."""

    store: str = MISSING
    stage: str = "both"  # tokenizer | dynamics | both | state
    tokenizer: str = ""  # stage=dynamics: the trained tokenizer's run directory or checkpoint
    camera: str = "observation.images.static"
    action_key: str = "action"
    state_key: str = (
        "observation.state"  # "" conditions on actions only (what WorldModelEnv runs closed loop)
    )
    tokenizer_model: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenizer_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(batch_size=64, lr=1e-3, warmup_steps=200)
    )
    kl_weight: float = 1e-6
    model: DynamicsConfig = field(default_factory=DynamicsConfig)
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    sampler: FrameSamplerConfig = field(default_factory=FrameSamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip_frames: int = 16
    max_frames: int = 200_000
    val_ratio: float = 0.05
    eval_clips: int = 64
    seed: int = 0
    threads: int = 0
    init: str = ""  # stage=dynamics: start from this dynamics checkpoint's weights (DynamicsTrainConfig.init)
    # stage=state: the robot-state predictor a state-conditioned model needs to run without recorded states
    state_model: StatePredictorConfig = field(default_factory=StatePredictorConfig)
    state_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            steps=3000, batch_size=64, lr=1e-3, warmup_steps=100, save_every=1000
        )
    )
    state_unroll: int = 16

    def __post_init__(self) -> None:
        from dreamrt.errors import choose

        choose("train world-model stage", self.stage, ("tokenizer", "dynamics", "both", "state"))
        if self.stage == "dynamics" and self.tokenizer in ("", MISSING):
            raise UserError(
                "stage=dynamics needs tokenizer=RUN: the run directory of a trained tokenizer (stage=tokenizer's "
                "output/tokenizer), or use stage=both."
            )
        if self.stage == "state":
            self.state_stage()
            return
        self.tokenizer_stage()  # validates everything shared with the stage configs
        if self.stage != "tokenizer":
            self.dynamics_stage(self.tokenizer or "pending")

    def tokenizer_stage(self) -> TokenizerTrainConfig:
        return TokenizerTrainConfig(
            store=self.store,
            camera=self.camera,
            model=self.tokenizer_model,
            optim=self.tokenizer_optim,
            kl_weight=self.kl_weight,
            max_frames=self.max_frames,
            val_ratio=self.val_ratio,
            seed=self.seed,
            threads=self.threads,
        )

    def state_stage(self) -> StatePredictorTrainConfig:
        return StatePredictorTrainConfig(
            store=self.store,
            action_key=self.action_key,
            state_key=self.state_key,
            model=self.state_model,
            optim=self.state_optim,
            unroll=self.state_unroll,
            max_frames=self.max_frames,
            val_ratio=self.val_ratio,
            seed=self.seed,
            threads=self.threads,
        )

    def dynamics_stage(self, tokenizer: str) -> DynamicsTrainConfig:
        return DynamicsTrainConfig(
            store=self.store,
            tokenizer=tokenizer,
            camera=self.camera,
            action_key=self.action_key,
            state_key=self.state_key,
            model=self.model,
            flow=self.flow,
            sampler=self.sampler,
            optim=self.optim,
            clip_frames=self.clip_frames,
            max_frames=self.max_frames,
            val_ratio=self.val_ratio,
            eval_clips=self.eval_clips,
            seed=self.seed,
            threads=self.threads,
            init=self.init,
        )


def run(cfg: TrainWorldModelConfig, out_dir: Path) -> JobResult:
    """`dreamrt train world-model`: the stages of ``cfg.stage`` into ``out_dir/tokenizer`` and
    ``out_dir/dynamics`` (rerunning on the same ``--out`` resumes each stage)."""
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"stage": cfg.stage}
    if cfg.stage == "state":
        summary["state"] = s = run_state_predictor(cfg.state_stage(), out_dir / "state").summary
        h = cfg.state_unroll
        print(
            f"state predictor: open-loop error {s[f'state_mae_h{h}']:.4f} at {h} frames vs "
            f"{s[f'state_mae_hold_h{h}']:.4f} holding the state -> {out_dir / 'state'}"
        )
        return JobResult(summary=summary)
    tokenizer = cfg.tokenizer
    if cfg.stage in ("tokenizer", "both"):
        summary["tokenizer"] = run_tokenizer(cfg.tokenizer_stage(), out_dir / "tokenizer").summary
        tokenizer = str(out_dir / "tokenizer")
        print(
            f"tokenizer: PSNR {summary['tokenizer']['val_psnr_db']:.2f} dB on held-out frames -> {tokenizer}"
        )
    if cfg.stage in ("dynamics", "both"):
        summary["dynamics"] = run_dynamics(cfg.dynamics_stage(tokenizer), out_dir / "dynamics").summary
        d = summary["dynamics"]
        print(
            f"dynamics: one-step PSNR {d.get('eval_psnr_db', float('nan')):.2f} dB (relative decoding "
            f"{d.get('eval_psnr_db_relative', float('nan')):.2f}) vs "
            f"{d.get('eval_psnr_db_copy_last', float('nan')):.2f} dB repeating the last frame -> {out_dir / 'dynamics'}"
        )
    return JobResult(summary=summary)


# ---------------------------------------------------------------------------- shared loop


def _lr_lambda(o: OptimConfig):
    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _split_rows(episode_ends: np.ndarray, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation episode indices (validation falls back to the training episodes)."""
    from dreamrt.episodes import split_episodes

    val = split_episodes(len(episode_ends), val_ratio, seed)
    train_eps, val_eps = np.flatnonzero(~val), np.flatnonzero(val)
    return train_eps, (val_eps if len(val_eps) else train_eps)


def _episode_rows(episode_ends: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], episode_ends[:-1]])
    return np.concatenate([np.arange(starts[e], episode_ends[e]) for e in episodes])


def _fit(
    model: torch.nn.Module,
    cfg: Any,
    out_dir: Path,
    kind: str,
    loss_fn,
    save_state,
    normalizer: dict[str, Any],
) -> tuple[int, list[dict[str, float]]]:
    """The optimisation loop shared by both jobs; returns the final step and the logged rows."""
    from tqdm.auto import tqdm

    from dreamrt.training import checkpoint as ck
    from dreamrt.training.trainer import make_adamw

    o: OptimConfig = cfg.optim
    opt = make_adamw(
        model.parameters(), next(model.parameters()).device, lr=o.lr, weight_decay=o.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(o))
    step = 0
    if ck.latest_checkpoint(out_dir) is not None:
        checkpoint = ck.load_checkpoint(out_dir, kind=kind)
        ck.load_into(model, checkpoint)
        ck.restore_training_state(ck.load_training_state(checkpoint.path), opt, sched)
        step = checkpoint.step
    metrics_path = out_dir / "metrics.csv"
    rows: list[dict[str, float]] = []
    writer = None
    model.train()
    bar = tqdm(total=o.steps, initial=step, desc=kind, dynamic_ncols=True)
    with open(metrics_path, "a", newline="") as f:
        while step < o.steps:
            loss, info = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip))
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if not math.isfinite(info["loss"]):
                raise UserError(f"The {kind} loss became {info['loss']} at step {step}; lower optim.lr.")
            if step % o.log_every == 0 or step == o.steps:
                row = {"step": step, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm, **info}
                rows.append(row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()})
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    if f.tell() == 0:
                        writer.writeheader()
                writer.writerow(row)
                f.flush()
            if step % o.save_every == 0 or step == o.steps:
                model.eval()
                save_state(model)
                ck.write_run_checkpoint(
                    out_dir,
                    model_state=model.state_dict(),
                    config=model.config,
                    normalizer=normalizer,
                    step=step,
                    kind=kind,
                    training_state=ck.capture_training_state(opt, sched),
                    keep_last=o.keep_last,
                )
                model.train()
    bar.close()
    model.eval()
    return step, rows


# ---------------------------------------------------------------------------- tokenizer


@torch.no_grad()
def _mean_psnr(model: Tokenizer, images: torch.Tensor) -> float:
    out = torch.cat([model.decode(model.encode(images[i : i + 128])) for i in range(0, len(images), 128)])
    return float(psnr(out.clamp(0, 1), images).mean())


def run_tokenizer(cfg: TokenizerTrainConfig, out_dir: Path) -> JobResult:
    """Train the frame tokenizer; see the module docstring."""
    from dreamrt.world_models.data import load_frames

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_frames(cfg.store, cfg.camera, cfg.model.image_size, max_frames=cfg.max_frames)
    train_eps, val_eps = _split_rows(data.episode_ends, cfg.val_ratio, cfg.seed)
    train_rows = torch.as_tensor(_episode_rows(data.episode_ends, train_eps))
    val_rows = _episode_rows(data.episode_ends, val_eps)
    val_images = data.images(val_rows[np.linspace(0, len(val_rows) - 1, min(256, len(val_rows))).astype(int)])
    stats_images = data.images(
        train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed))[:2048]]
    )

    torch.manual_seed(cfg.seed)
    model = Tokenizer(cfg.model)
    psnr_before = _mean_psnr(model.eval(), val_images)

    def loss_fn():
        rows = train_rows[torch.randint(len(train_rows), (cfg.optim.batch_size,))]
        return model.loss(data.images(rows), cfg.kl_weight)

    step, rows = _fit(
        model, cfg, out_dir, TOKENIZER_KIND, loss_fn, lambda m: m.fit_latent_stats(stats_images), {}
    )
    summary = {
        "kind": TOKENIZER_KIND,
        "steps": step,
        "frames": len(data.frames),
        "parameters": model.num_parameters(),
        "val_psnr_db_initial": psnr_before,
        "val_psnr_db": _mean_psnr(model, val_images),
        "final_loss": rows[-1]["loss"] if rows else None,
        "latent_shape": [cfg.model.latent_channels, cfg.model.latent_size, cfg.model.latent_size],
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return JobResult(summary=summary)


# ---------------------------------------------------------------------------- state predictor


def run_state_predictor(cfg: StatePredictorTrainConfig, out_dir: Path) -> JobResult:
    """Train the robot-state predictor on a store's low-dim columns; see ``dreamrt.world_models.proprio``.
    States and actions are min-max normalised over the store, the units a dynamics model trained on
    the same store uses."""
    from dreamrt.episodes import Normalizer, open_store
    from dreamrt.world_models.data import ClipIndex

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    store = open_store(cfg.store)
    for key in (cfg.action_key, cfg.state_key):
        if key not in store.features:
            raise UserError(f"Store '{cfg.store}' has no key '{key}'. Stored keys: {store.keys}.")
    ends = store.episode_ends
    if len(ends) == 0:
        raise UserError(f"Store '{cfg.store}' has no episodes yet.")
    ends = ends[: max(1, int(np.searchsorted(ends, cfg.max_frames, side="right")))].astype(np.int64)
    n = int(ends[-1])
    normalizer = Normalizer.from_stats(store.stats, {cfg.action_key: "min_max", cfg.state_key: "min_max"})
    states = torch.from_numpy(normalizer.normalize(cfg.state_key, store.read(cfg.state_key, 0, n))).float()
    actions = torch.from_numpy(normalizer.normalize(cfg.action_key, store.read(cfg.action_key, 0, n))).float()
    model_cfg = dataclasses.replace(
        cfg.model,
        state_dim=states.shape[1],
        action_dim=actions.shape[1],
        held=wrapping_dims(states.numpy(), ends),
    )
    train_eps, val_eps = _split_rows(ends, cfg.val_ratio, cfg.seed)
    clip = cfg.unroll + 1
    train_clips, val_clips = ClipIndex(ends, clip, train_eps), ClipIndex(ends, clip, val_eps)

    torch.manual_seed(cfg.seed)
    model = StatePredictor(model_cfg)

    def loss_fn():
        rows = train_clips.sample(cfg.optim.batch_size)
        return state_rollout_loss(model, states[rows], actions[rows])

    step, rows = _fit(model, cfg, out_dir, STATE_KIND, loss_fn, lambda m: None, normalizer.to_dict())
    val_rows = torch.as_tensor(val_clips.starts)[:, None] + torch.arange(clip)
    horizons = sorted({h for h in (1, 4, 16, cfg.unroll) if h <= cfg.unroll})
    summary = {
        "kind": STATE_KIND,
        "steps": step,
        "frames": n,
        "parameters": model.num_parameters(),
        "final_loss": rows[-1]["loss"] if rows else None,
        "store": str(cfg.store),
        "action_key": cfg.action_key,
        "state_key": cfg.state_key,
        "held_dims": list(model_cfg.held),
        "val_episodes": [int(e) for e in val_eps],
        **open_loop_error(model, states[val_rows], actions[val_rows], horizons),
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return JobResult(summary=summary)


# ---------------------------------------------------------------------------- dynamics


def run_dynamics(cfg: DynamicsTrainConfig, out_dir: Path) -> JobResult:
    """Train the next-frame dynamics model on tokenizer latents; see the module docstring."""
    from dreamrt.world_models.data import ClipIndex, load_latent_episodes
    from dreamrt.world_models.tokenizer import load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer)
    tc = tokenizer.config
    episodes = load_latent_episodes(
        cfg.store,
        tokenizer,
        camera=cfg.camera,
        action_key=cfg.action_key,
        state_key=cfg.state_key,
        max_frames=cfg.max_frames,
    )
    data, latents, actions, states = episodes.frames, episodes.latents, episodes.actions, episodes.states
    normalizer = episodes.normalizer

    model_cfg = dataclasses.replace(
        cfg.model if not cfg.init else _init_architecture(cfg),
        action_dim=actions.shape[1],
        state_dim=states.shape[1],
        latent_channels=tc.latent_channels,
        latent_size=tc.latent_size,
    )
    train_eps, val_eps = _split_rows(data.episode_ends, cfg.val_ratio, cfg.seed)
    train_clips = ClipIndex(data.episode_ends, cfg.clip_frames, train_eps)
    val_clips = ClipIndex(data.episode_ends, cfg.clip_frames, val_eps)

    torch.manual_seed(cfg.seed)
    model = NextFrameDiT(model_cfg)
    if cfg.init:
        start_from(model, cfg.init)

    flow = cfg.flow
    rollout_sampler = FrameSamplerConfig(steps=flow.rollout_steps, temperature=0.0)
    # Own-rollout context starts at a real frame and ends at the earliest possible anchor or later.
    last_first = cfg.clip_frames - 1 - flow.max_targets

    def loss_fn():
        rows = train_clips.sample(cfg.optim.batch_size)  # (B, T)
        clips, a, s = latents[rows], actions[rows], states[rows]
        shown = None
        if flow.rollout_prob and float(torch.rand(())) < flow.rollout_prob:
            first = int(torch.randint(1, last_first + 1, ()))
            shown = own_rollout_context(model, clips, a, s, first, rollout_sampler)
        return flow_matching_loss(model, clips, frame_conditions(a, s), flow, context_latents=shown)

    step, rows = _fit(model, cfg, out_dir, DYNAMICS_KIND, loss_fn, lambda m: None, normalizer.to_dict())
    evaluation = evaluate_one_step(
        model, tokenizer, latents, actions, states, val_clips, data, cfg.sampler, cfg.eval_clips, cfg.seed
    )
    summary = {
        "kind": DYNAMICS_KIND,
        "steps": step,
        "frames": len(latents),
        "parameters": model.num_parameters(),
        "final_loss": rows[-1]["loss"] if rows else None,
        "tokenizer": str(cfg.tokenizer),
        "store": str(cfg.store),
        "camera": cfg.camera,
        "action_key": cfg.action_key,
        "state_key": cfg.state_key,
        "val_episodes": [int(e) for e in val_eps],  # what `dreamrt bench world-model` evaluates on
        **evaluation,
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return JobResult(summary=summary)


def _init_architecture(cfg: DynamicsTrainConfig) -> DynamicsConfig:
    """The architecture of ``cfg.init``; a ``model.*`` override that contradicts it is an error, not ignored."""
    from dreamrt.training.checkpoint import config_from_dict, load_checkpoint

    ckpt = load_checkpoint(cfg.init, kind=DYNAMICS_KIND)
    saved = config_from_dict(DynamicsConfig, ckpt.config, source=f"{ckpt.path}/config.yaml")
    defaults = DynamicsConfig()
    shape_fields = ("action_dim", "state_dim", "latent_channels", "latent_size")
    clashes = [
        f.name
        for f in dataclasses.fields(DynamicsConfig)
        if f.name not in shape_fields
        and getattr(cfg.model, f.name) != getattr(defaults, f.name)
        and getattr(cfg.model, f.name) != getattr(saved, f.name)
    ]
    if clashes:
        raise UserError(
            f"init={cfg.init} fixes the architecture, but model.{clashes[0]}="
            f"{getattr(cfg.model, clashes[0])!r} differs from its {getattr(saved, clashes[0])!r}. Drop the "
            f"model.* overrides ({', '.join(clashes)}) or start without init."
        )
    return saved


def start_from(model: NextFrameDiT, path: str) -> None:
    """Copy a trained dynamics checkpoint's weights into ``model`` (same architecture).

    The one shape allowed to differ is the condition's input: a checkpoint trained on actions
    alone may start a model that also reads the robot state (state columns after the action
    columns, as ``NextFrameDiT.condition`` concatenates them). Those columns start at zero, so
    the new model begins exactly as the checkpoint and learns what the state adds."""
    from dreamrt.training.checkpoint import load_checkpoint, load_into

    ckpt = load_checkpoint(path, kind=DYNAMICS_KIND)
    weights = dict(ckpt.model_state)
    key = "cond_mlp.0.weight"
    want = model.state_dict()[key]
    got = weights.get(key)
    a = model.config.action_dim
    if got is not None and got.shape != want.shape and got.shape[0] == want.shape[0] and got.shape[1] == a:
        widened = torch.zeros_like(want)
        widened[:, :a] = got
        weights[key] = widened
    load_into(model, dataclasses.replace(ckpt, model_state=weights))


@torch.no_grad()
def evaluate_one_step(
    model: NextFrameDiT,
    tokenizer: Tokenizer | None,
    latents: torch.Tensor,
    actions: torch.Tensor,
    states: torch.Tensor,
    clips: Any,
    data: Any,
    sampler: FrameSamplerConfig,
    n_clips: int,
    seed: int,
) -> dict[str, float]:
    """Predict the last frame of ``n_clips`` clips from the frames before it (cached rollout, batched)
    and compare with repeating the last context frame: latent MSE, and PSNR when a tokenizer is given."""
    from dreamrt.world_models.sampling import Rollout

    g = torch.Generator().manual_seed(seed)
    rows = clips.sample(n_clips, generator=g)  # (B, T)
    b, t = rows.shape
    rollout = Rollout(model.eval(), sampler, batch_size=b)
    rollout.prefill(latents[rows[:, :-1]], actions[rows[:, :-1]], states[rows[:, :-1]])
    pred = rollout.step(actions[rows[:, -2]], states[rows[:, -2]] if states.shape[1] else None)
    truth, last = latents[rows[:, -1]], latents[rows[:, -2]]
    result = {
        "eval_latent_mse": float((pred - truth).pow(2).mean()),
        "eval_latent_mse_copy_last": float((last - truth).pow(2).mean()),
    }
    if tokenizer is not None:
        truth_img = data.images(rows[:, -1])
        last_img = data.images(rows[:, -2])
        result["eval_psnr_db"] = float(psnr(tokenizer.decode(pred).clamp(0, 1), truth_img).mean())
        relative = tokenizer.decode(pred, tokenizer.detail(last_img)).clamp(0, 1)
        result["eval_psnr_db_relative"] = float(psnr(relative, truth_img).mean())
        result["eval_psnr_db_copy_last"] = float(psnr(last_img, truth_img).mean())
        result["eval_psnr_db_tokenizer"] = float(psnr(tokenizer.decode(truth).clamp(0, 1), truth_img).mean())
    return result
