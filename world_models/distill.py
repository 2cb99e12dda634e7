"""`dreamrt distill world-model`: consistency distillation of the next-frame dynamics model into a
1-2 step student.

    dreamrt distill world-model teacher=RUN store=STORE [optim.steps=N] --out OUT

Method: discrete consistency distillation (CD, Song et al. 2023) along the teacher's Euler
solver of the flow ODE, in the layout the model generates in. A training clip of T frames is
split at a random c: frames < c are context (clean latents with a little noise, t ~ U[0,
``context_noise_max``], no loss, as at inference), frames >= c are *targets*, all noised to
the same time t_n of an N-point grid (``sampling_times`` with ``teacher_steps`` and ``shift``):

1. x_{t_n} = (1 - t_n) x_0 + t_n eps for every target frame;
2. one Euler step of the frozen teacher from t_n to t_{n+1} < t_n, all target frames together
   (the context stays as it is);
3. target = the student's own x_0 estimate at t_{n+1} under no_grad (stop-gradient, no EMA copy,
   as the DP-T distillation measured); at t_{n+1} = 0 the stepped sample itself;
4. loss = mean squared error between the student's x_0 estimate at t_n and the target, on target
   frames.

With ``rollout_prob`` a batch's context frames (and so the targets' anchor) are the student's own
1-step rollout instead of real frames (``own_rollout_context``), as the teacher's training does
with ``FlowMatchingConfig.rollout_prob``; the targets stay real frames.

With ``direct_prob`` a batch instead trains the one map the deployed sampler uses, directly
(knowledge distillation of a deterministic sampler, Luhman & Luhman 2021): at temperature 0 (the
sampler default) a frame starts at its source's mean (for ``source="last_frame"`` models the anchor
frame itself), so the 1-step student is a function of the context alone. The loss is the squared
distance of the student's x_0 estimate at t = 1 from that start to ``direct_target``: the teacher's
own temperature-0 sample (``direct_teacher_steps`` Euler steps, all target frames together, as
generation does) or the recorded frame (``"data"``, the conditional mean that maximises PSNR), or
the teacher's sample after real context and the recorded frame after the student's own rollout
(``"data_on_rollouts"``: from frames it drifted to, the teacher would only continue the drift,
while the recorded frame pulls the rollout back to what happened). CD
alone spends its steps on the whole noise distribution at every time of the grid, of which the
deployed sampler visits one point; the mix keeps CD for the rest (the 2-step sampler, temperature 1).

Block-causal attention makes this one recipe cover both ways the model generates: the first
target frame sees only context, so its ODE is the one of single-frame generation; the frames
after it see it at the same noise level, which is exactly how ``Rollout.speculate`` denoises k
frames in one pass. ``max_targets`` bounds k.

The student's x_0 estimate is read from the velocity it predicts, ``x_0 = x_t - t v``, so it is an
ordinary ``NextFrameDiT`` checkpoint (kind ``world_model/dynamics``, the teacher's normaliser)
that every tool loads with ``load_dynamics``; it samples with the ``x0`` solver:
``FrameSamplerConfig(solver="x0", steps=1)`` (t = 1) or ``steps=2`` (t = 1, 0.5); the boundary
condition f(x, 0) = x holds by construction. It starts as a copy of the teacher. The run ends by
measuring one-step prediction on held-out clips for the teacher (its own sampler) and the
student at 1 and 2 steps, against repeating the last frame (summary.json).

Why CD and not the alternatives the issue names: sCM needs Jacobian-vector products through
attention (slow and memory-hungry in eager CPU torch) and was built for large models; shortcut
models retrain from scratch with a step-size input. CD reuses the teacher's weights and
optimiser loop and costs two extra forward passes per step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult
from dreamrt.world_models.dynamics import (
    DYNAMICS_KIND,
    FrameCond,
    NextFrameDiT,
    flow_source,
    frame_conditions,
    generation_layout,
)
from dreamrt.world_models.sampling import FrameSamplerConfig, own_rollout_context, sampling_times
from dreamrt.world_models.train import MISSING, OptimConfig, _fit, _split_rows, evaluate_one_step

DIRECT_TARGETS = ("teacher", "data", "data_on_rollouts")


@dataclass
class WorldModelDistillConfig:
    teacher: str = MISSING  # a trained dynamics run directory or checkpoint
    store: str = MISSING  # the episode store the teacher was trained on
    tokenizer: str = ""  # empty: the tokenizer the teacher's run used (its summary.json)
    # Empty: the student starts as a copy of the teacher. Else a dynamics checkpoint of the teacher's
    # architecture to start from, e.g. a student to go on distilling with another objective.
    student_init: str = ""
    teacher_steps: int = 16  # N: Euler steps of the teacher's ODE the grid has
    shift: float = 1.0  # the grid's time shift (FrameSamplerConfig.shift)
    clip_frames: int = 8  # T
    max_targets: int = 4  # target frames per clip at most (the rest is context); 1..T-1
    context_noise_max: float = 0.05  # context frames draw t ~ U[0, this]
    # Chance a batch's context is the student's own 1-step rollout (``own_rollout_context``) instead of
    # real frames, as for the teacher (``FlowMatchingConfig.rollout_prob``): the teacher's ODE step
    # and the target then start from the frames the student will really continue.
    rollout_prob: float = 0.0
    # Chance a batch trains the temperature-0 1-step map directly (module docstring) instead of CD,
    # towards the teacher's temperature-0 sample ("teacher"), the recorded frame ("data"), or the
    # teacher's after real context and the recorded frame after the student's rollout ("data_on_rollouts").
    direct_prob: float = 0.0
    direct_target: str = "teacher"
    direct_teacher_steps: int = 4
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            steps=2000, batch_size=8, lr=1e-4, warmup_steps=100, save_every=250
        )
    )
    eval_clips: int = 64
    max_frames: int = 200_000
    val_ratio: float = 0.05  # must match the teacher's run so the held-out episodes stay held out
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.teacher_steps < 1 or self.shift <= 0:
            raise UserError(
                f"teacher_steps must be >= 1 and shift > 0, got {self.teacher_steps}, {self.shift}."
            )
        if self.clip_frames < 2 or not 1 <= self.max_targets < self.clip_frames:
            raise UserError(
                f"clip_frames must be >= 2 and max_targets in [1, clip_frames), got clip_frames="
                f"{self.clip_frames}, max_targets={self.max_targets}: a clip needs at least one context frame."
            )
        if not 0.0 <= self.rollout_prob <= 1.0:
            raise UserError(f"rollout_prob must be in [0, 1], got {self.rollout_prob}.")
        if not 0.0 <= self.direct_prob <= 1.0 or self.direct_teacher_steps < 1:
            raise UserError(
                f"direct_prob must be in [0, 1] and direct_teacher_steps >= 1, got {self.direct_prob}, "
                f"{self.direct_teacher_steps}."
            )
        choose("direct_target", self.direct_target, DIRECT_TARGETS)
        if self.rollout_prob and self.clip_frames - 1 - self.max_targets < 1:
            raise UserError(
                f"rollout_prob needs clip_frames >= max_targets + 2 (a real frame to start the rollout from and "
                f"one generated frame), got clip_frames={self.clip_frames}, max_targets={self.max_targets}."
            )
        if not 0.0 <= self.context_noise_max < 1.0 or self.threads < 0:
            raise UserError(
                f"context_noise_max must be in [0, 1) and threads >= 0, got {self.context_noise_max}, "
                f"{self.threads}."
            )


def consistency_loss(
    student: NextFrameDiT,
    teacher: NextFrameDiT,
    latents: Tensor,
    cond: FrameCond,
    cfg: WorldModelDistillConfig,
    generator: torch.Generator | None = None,
    context_latents: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The CD loss of the module docstring on a batch of clips: latents (B, T, C, gh, gw).
    ``context_latents`` (default ``latents``) are what context frames show and targets start from;
    target frames are noised from ``latents``."""
    b = latents.shape[0]
    times = torch.tensor(sampling_times(FrameSamplerConfig(steps=cfg.teacher_steps, shift=cfg.shift)))
    n = torch.randint(cfg.teacher_steps, (b,), generator=generator)
    t_hi, t_lo = times[n].view(b, 1), times[n + 1].view(b, 1)  # (B, 1)
    target, anchor, t_ctx, noise = _clip_layout(latents, cfg, generator)
    shown = latents if context_latents is None else context_latents
    source = flow_source(student.config, shown, noise, target, anchor)
    t = torch.where(target, t_hi, t_ctx)
    clean = torch.where(_frames(target), latents, shown)
    x_t = (1 - _frames(t)) * clean + _frames(t) * source
    with torch.no_grad():
        v_teacher = teacher(x_t, t, cond)
        step = torch.where(target, t_lo - t_hi, torch.zeros(()))  # context frames stay put
        x_next = x_t + _frames(step) * v_teacher
        t_next = torch.where(target, t_lo, t_ctx)
        goal = x_next - _frames(t_next) * student(x_next, t_next, cond)  # x_0 estimate; = x_next at t = 0
    estimate = x_t - _frames(t) * student(x_t, t, cond)
    return _target_frames_loss(estimate, goal, target)


def direct_loss(
    student: NextFrameDiT,
    teacher: NextFrameDiT,
    latents: Tensor,
    cond: FrameCond,
    cfg: WorldModelDistillConfig,
    generator: torch.Generator | None = None,
    context_latents: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The direct loss of the module docstring on a batch of clips (arguments as :func:`consistency_loss`):
    the student's 1-step temperature-0 frames against the teacher's temperature-0 sample or the data."""
    target, anchor, t_ctx, noise = _clip_layout(latents, cfg, generator)
    shown = latents if context_latents is None else context_latents
    # Temperature 0: targets start at their source's mean (zero noise); context frames keep their noise.
    start = flow_source(student.config, shown, torch.where(_frames(target), 0.0, noise), target, anchor)
    x_1 = torch.where(_frames(target), start, (1 - _frames(t_ctx)) * shown + _frames(t_ctx) * start)
    t_1 = torch.where(target, torch.ones(()), t_ctx)
    if cfg.direct_target == "data" or (
        cfg.direct_target == "data_on_rollouts" and context_latents is not None
    ):
        goal = latents
    else:
        times = sampling_times(FrameSamplerConfig(steps=cfg.direct_teacher_steps))
        x, t = x_1, t_1
        with torch.no_grad():
            for t_hi, t_lo in zip(times[:-1], times[1:]):
                x = x + _frames(torch.where(target, t_lo - t_hi, 0.0)) * teacher(x, t, cond)
                t = torch.where(target, t_lo, t_ctx)
        goal = x
    estimate = x_1 - _frames(t_1) * student(x_1, t_1, cond)
    return _target_frames_loss(estimate, goal, target)


def _clip_layout(
    latents: Tensor, cfg: WorldModelDistillConfig, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per clip of a batch: the target mask and anchor (``generation_layout``), the context frames'
    noise times and the noise."""
    b, frames = latents.shape[:2]
    target, anchor = generation_layout(b, frames, cfg.max_targets, generator)
    t_ctx = torch.rand((b, frames), generator=generator) * cfg.context_noise_max
    return target, anchor, t_ctx, torch.randn(latents.shape, generator=generator)


def _target_frames_loss(estimate: Tensor, goal: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Mean squared error over target frames only, and the numbers for logs."""
    per_frame = (estimate - goal).pow(2).mean(dim=(2, 3, 4))  # (B, T)
    loss = (per_frame * target).sum() / target.sum()
    return loss, {"loss": float(loss.detach()), "targets_per_clip": float(target.float().sum(1).mean())}


def _frames(t: Tensor) -> Tensor:
    return t.view(*t.shape, 1, 1, 1)


def run(cfg: WorldModelDistillConfig, out_dir: Path) -> JobResult:
    """Distil ``cfg.teacher`` into ``out_dir`` (resumable: rerun on the same directory)."""
    from dreamrt.training.checkpoint import latest_checkpoint
    from dreamrt.training.distill import check_teacher_identity
    from dreamrt.world_models.bench import run_summary, trained_keys
    from dreamrt.world_models.data import ClipIndex, load_latent_episodes
    from dreamrt.world_models.dynamics import load_dynamics
    from dreamrt.world_models.tokenizer import load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher, normalizer = load_dynamics(cfg.teacher)
    teacher.requires_grad_(False)
    # Before reading the store: a resumed run from other teacher weights is refused at once.
    check_teacher_identity(cfg.teacher, out_dir, resuming=latest_checkpoint(out_dir) is not None)
    saved = run_summary(cfg.teacher)
    tokenizer_path = cfg.tokenizer or saved.get("tokenizer", "")
    if not tokenizer_path:
        raise UserError(
            f"Cannot tell which tokenizer the teacher {cfg.teacher} was trained with (no summary.json next to "
            f"it); pass tokenizer=RUN."
        )
    tokenizer = load_tokenizer(tokenizer_path)
    keys = trained_keys(cfg.teacher)
    episodes = load_latent_episodes(
        cfg.store, tokenizer, max_frames=cfg.max_frames, normalizer=normalizer, **keys
    )
    tc, dc = tokenizer.config, teacher.config
    if (tc.latent_channels, tc.latent_size) != (dc.latent_channels, dc.latent_size) or (
        episodes.actions.shape[1],
        episodes.states.shape[1],
    ) != (dc.action_dim, dc.state_dim):
        raise UserError(
            f"The teacher {cfg.teacher} does not fit tokenizer {tokenizer_path} and store {cfg.store}: latents "
            f"{dc.latent_channels}x{dc.latent_size} vs {tc.latent_channels}x{tc.latent_size}, action/state dims "
            f"{dc.action_dim}/{dc.state_dim} vs {episodes.actions.shape[1]}/{episodes.states.shape[1]}."
        )
    data = episodes.frames
    train_eps, val_eps = _split_rows(data.episode_ends, cfg.val_ratio, cfg.seed)
    if "val_episodes" in saved and sorted(saved["val_episodes"]) != sorted(int(e) for e in val_eps):
        raise UserError(
            f"This split holds out episodes {sorted(int(e) for e in val_eps)}, the teacher's run held out "
            f"{sorted(saved['val_episodes'])}: use the teacher's val_ratio and seed so the student never trains on "
            f"the episodes its figures are measured on."
        )
    train_clips = ClipIndex(data.episode_ends, cfg.clip_frames, train_eps)
    val_clips = ClipIndex(data.episode_ends, max(cfg.clip_frames, dc.window), val_eps)

    torch.manual_seed(cfg.seed)
    student = NextFrameDiT(dc)
    student.load_state_dict(teacher.state_dict())
    if cfg.student_init:
        initial, _ = load_dynamics(cfg.student_init)
        if initial.config != dc:
            raise UserError(
                f"student_init {cfg.student_init} has another architecture than the teacher {cfg.teacher}: "
                f"{initial.config} vs {dc}."
            )
        student.load_state_dict(initial.state_dict())
    latents, actions, states = episodes.latents, episodes.actions, episodes.states

    rollout_sampler = FrameSamplerConfig(solver="x0", steps=1, temperature=0.0)
    last_first = cfg.clip_frames - 1 - cfg.max_targets  # the rollout ends at the earliest anchor or later

    def loss_fn():
        rows = train_clips.sample(cfg.optim.batch_size)
        clips, a, s = latents[rows], actions[rows], states[rows]
        shown = None
        if cfg.rollout_prob and float(torch.rand(())) < cfg.rollout_prob:
            first = int(torch.randint(1, last_first + 1, ()))
            shown = own_rollout_context(student, clips, a, s, first, rollout_sampler)
        direct = cfg.direct_prob and float(torch.rand(())) < cfg.direct_prob
        loss = direct_loss if direct else consistency_loss
        return loss(student, teacher, clips, frame_conditions(a, s), cfg, context_latents=shown)

    step, logged = _fit(student, cfg, out_dir, DYNAMICS_KIND, loss_fn, lambda m: None, normalizer)

    def one_step(model: NextFrameDiT, sampler: FrameSamplerConfig) -> dict[str, float]:
        return evaluate_one_step(
            model, tokenizer, latents, actions, states, val_clips, data, sampler, cfg.eval_clips, cfg.seed
        )

    evaluation = {
        "teacher": one_step(teacher, FrameSamplerConfig(steps=8)),
        "student_1_step": one_step(student, FrameSamplerConfig(solver="x0", steps=1)),
        "student_2_steps": one_step(student, FrameSamplerConfig(solver="x0", steps=2)),
        "teacher_weights_1_step": one_step(teacher, FrameSamplerConfig(solver="x0", steps=1)),
    }
    summary = {
        "kind": DYNAMICS_KIND,
        "distilled_from": str(cfg.teacher),
        "student_init": str(cfg.student_init),
        "steps": step,
        "final_loss": logged[-1]["loss"] if logged else None,
        "tokenizer": str(tokenizer_path),
        "store": str(cfg.store),
        **keys,
        "val_episodes": [int(e) for e in val_eps],
        "sampler": {"solver": "x0", "steps": 1},
        "evaluation": evaluation,
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, figures in evaluation.items():
        print(
            f"{name:>24}: one-step PSNR {figures['eval_psnr_db']:.2f} dB (relative decoding "
            f"{figures['eval_psnr_db_relative']:.2f}) vs {figures['eval_psnr_db_copy_last']:.2f} repeating the "
            f"last frame"
        )
    return JobResult(summary=summary)
