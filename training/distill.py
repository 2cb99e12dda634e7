"""`dreamrt distill`: consistency distillation of a DP-T policy into a 1-3 step student.

    dreamrt distill teacher=RUN_OR_CHECKPOINT dataset.path=STORE steps=N [num_steps=1] [resume=RUN_DIR]

Method: consistency distillation (CD, Song et al., ICML 2023) along the teacher's DDIM ODE
solver, as LCM (Luo et al. 2023) does for epsilon-prediction teachers. Per training window
(observations o, clean normalised actions a, both from the episode store):

1. draw t uniformly from {0, ..., t_max} (t_max = where 1-step sampling starts, 90 of 100)
   and noise the actions: x_t = sqrt(ab_t) a + sqrt(1 - ab_t) z;
2. one deterministic DDIM step of the frozen teacher from t to t' = t - k
   (``objective.solver_step``; t' = -1, clean data, when t < k): x_t', with the teacher's
   x0 clipped as its own sampler clips it;
3. target = f(x_t', t') of the student itself under no_grad, without dropout (stop-gradient;
   no EMA target copy, as iCT recommends and as measured); at t' = -1 it is x_t' (the
   boundary condition);
4. loss = d(f(x_t, t), target), d = mean squared error (or pseudo-Huber).

f is the student's DP-T read through :class:`dreamrt.policies.consistency.ConsistencyParameterisation`
(c_skip / c_out, f(x, -1) = x). The student starts as a copy of the teacher (encoder and
DP-T weights) but reads its output as the clean sample (``prediction_type="sample"``); the
measurements behind each choice are in docs/distillation.md.

The student is an ordinary DiffusionPolicy: every checkpoint in ``<run>/checkpoints/`` has
kind ``dpt_policy`` and a config whose sampler is ``SamplerConfig(name="consistency",
num_steps=num_steps)``, so ``load_diffusion_policy(run)`` (and every tool built on it)
returns a policy that samples in the student's steps; ``load_diffusion_policy(run,
sampler=SamplerConfig(name="consistency", num_steps=3))`` overrides the count. The trainer
(:func:`dreamrt.training.trainer.fit`) does the rest: AdamW, warm-up + cosine, EMA weights in
the checkpoints, resume, ``metrics.csv``, ``curves.png``, the progress bar. Its evaluate hook
logs the student's closeness to the teacher as ``eval/*`` (:class:`TeacherReference`).
``<run>/teacher.json`` records which teacher weights were distilled; resuming with other
teacher weights is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult
from dreamrt.training.language_augment import LanguageAugmentConfig, paraphrase_mixer
from dreamrt.training.train_policy import MISSING, DataConfig
from dreamrt.training.trainer import TrainerConfig, TrainResult

if TYPE_CHECKING:
    from dreamrt.policies.diffusion_policy import DiffusionPolicy

TEACHER_FILE = "teacher.json"  # in the run directory: the distilled teacher's identity
LOSSES = ("l2", "pseudo_huber")


# ---------------------------------------------------------------------------- config


@dataclass
class ConsistencyDistillationConfig:
    """The distillation objective (see the module docstring)."""

    solver_step: int = 10  # k: the teacher's DDIM step spans k training timesteps (t -> t - k)
    loss: str = "l2"  # "l2" | "pseudo_huber"
    huber_c: float = 0.03  # pseudo-Huber's c (Song & Dhariwal 2023 use 0.00054 * sqrt(dim))

    def __post_init__(self) -> None:
        if (
            not isinstance(self.solver_step, int)
            or isinstance(self.solver_step, bool)
            or self.solver_step < 1
        ):
            raise UserError(
                f"objective.solver_step (k, teacher DDIM step length in training timesteps) must be an int >= 1, "
                f"got {self.solver_step!r}. LCM and this job use 10 for a 100-step schedule."
            )
        choose("distillation loss", self.loss, LOSSES)
        if not self.huber_c > 0:
            raise UserError(f"objective.huber_c must be > 0, got {self.huber_c!r}.")


def _distill_trainer() -> TrainerConfig:
    # Distillation starts from a trained network: a short warm-up, no decay pulling weights to 0,
    # frequent closeness checks. lr 3e-4 beat 1e-4 on the small DP-T (docs/distillation.md).
    return TrainerConfig(
        lr=3e-4,
        warmup_steps=100,
        weight_decay=0.0,
        encoder_weight_decay=0.0,
        val_every=0,
        eval_every=500,
        save_every=1000,
    )


@dataclass
class DistillConfig:
    teacher: str = (
        MISSING  # a dpt_policy checkpoint or a `dreamrt train` run directory (its newest checkpoint)
    )
    dataset: DataConfig = field(default_factory=DataConfig)  # the episode store (usually the teacher's)
    steps: int = 2000  # optimizer steps of distillation (trainer.steps is set from this)
    num_steps: int = 1  # the student's default sampling steps, saved in its checkpoints (1-3)
    objective: ConsistencyDistillationConfig = field(default_factory=ConsistencyDistillationConfig)
    eval_windows: int = 256  # training windows the closeness metrics (eval/*) are computed on
    trainer: TrainerConfig = field(default_factory=_distill_trainer)
    resume: str | None = None  # a distill run directory (its newest checkpoint) or a checkpoint to continue
    # Paraphrase mixing (dreamrt.training.language_augment), as the teacher was trained with it.
    language_augment: LanguageAugmentConfig = field(default_factory=LanguageAugmentConfig)
    # Warm start: an earlier consistency student (e.g. of the teacher this one was fine-tuned
    # from) whose weights the student starts from instead of the teacher's. Its network and
    # normaliser must equal the teacher's; the instruction table stays the teacher's.
    student_init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.objective, Mapping):
            self.objective = ConsistencyDistillationConfig(**self.objective)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise UserError(f"distill steps must be an int >= 1, got {self.steps!r}.")
        if self.trainer.steps not in (TrainerConfig.steps, self.steps):
            raise UserError(
                f"`dreamrt distill` takes its length from steps=N (now {self.steps}), but trainer.steps is "
                f"{self.trainer.steps}. Drop trainer.steps and pass steps={self.trainer.steps}."
            )
        from dreamrt.policies.consistency import MAX_STEPS

        if not isinstance(self.num_steps, int) or not 1 <= self.num_steps <= MAX_STEPS:
            raise UserError(
                f"num_steps (the student's sampling steps) must be an int in 1..{MAX_STEPS}, got {self.num_steps!r}; "
                "consistency students are meant for 1-3."
            )
        if not isinstance(self.eval_windows, int) or self.eval_windows < 1:
            raise UserError(f"eval_windows must be an int >= 1, got {self.eval_windows!r}.")


# ---------------------------------------------------------------------------- the objective


class ConsistencyDistillation(nn.Module):
    """``forward(batch) -> CD loss`` for :func:`dreamrt.training.trainer.fit`.

    The state dict (what checkpoints, resume and the trainer's EMA see) is the student's
    own, so every checkpoint the trainer writes is a plain ``dpt_policy`` checkpoint. The
    teacher is a submodule so that ``.to(device)`` moves it, but it is not part of the state,
    and it stays frozen in eval mode whatever ``train()`` is called with. The target is the
    student's DP-T itself in eval mode under ``no_grad`` (stop-gradient, no target copy: see
    docs/distillation.md).
    """

    def __init__(
        self, student: DiffusionPolicy, teacher: DiffusionPolicy, config: ConsistencyDistillationConfig
    ):
        from dreamrt.policies.consistency import ConsistencyParameterisation, consistency_timesteps

        super().__init__()
        # The student reads its output as x0 ("sample"); everything else about the noise must match.
        if replace(student.schedule.config, prediction_type="sample") != replace(
            teacher.schedule.config, prediction_type="sample"
        ):
            raise UserError(
                f"The student's noise schedule {student.schedule.config} differs from the teacher's "
                f"{teacher.schedule.config}; build the student with build_student(teacher, ...)."
            )
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config
        self.parameterisation = ConsistencyParameterisation(student.schedule)
        schedule = student.schedule
        self.t_max = consistency_timesteps(schedule.num_train_timesteps, 1)[0]  # where 1-step sampling starts
        if config.solver_step > self.t_max + 1:
            raise UserError(
                f"objective.solver_step={config.solver_step} is longer than the distilled range 0..{self.t_max}; "
                f"use a value <= {self.t_max + 1} (10 is the default)."
            )
        ab = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod])  # (T+1,), row t + 1
        self.register_buffer("sqrt_ab", ab.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_ab", (1.0 - ab).sqrt().float(), persistent=False)

    # -- the state is the student's --------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> ConsistencyDistillation:
        super().train(mode)
        self.teacher.eval()
        return self

    # -- the objective -----------------------------------------------------------------------

    def teacher_ddim_step(self, x_t: Tensor, t: Tensor, t_prev: Tensor, features: Tensor) -> Tensor:
        """One deterministic DDIM step of the teacher from t to t_prev, per sample (t_prev = -1: clean data).

        The same update as :class:`dreamrt.policies.schedulers.DDIMSampler` with eta 0: the
        teacher's x0 estimate clipped, and the epsilon that clipped x0 implies.
        """
        shape = (-1, *([1] * (x_t.ndim - 1)))
        s_t, n_t = self.sqrt_ab[t + 1].reshape(shape), self.sqrt_one_minus_ab[t + 1].reshape(shape)
        s_p, n_p = self.sqrt_ab[t_prev + 1].reshape(shape), self.sqrt_one_minus_ab[t_prev + 1].reshape(shape)
        out = self.teacher.model(x_t, t, features)
        cfg = self.teacher.schedule.config
        x0 = (x_t - n_t * out) / s_t if cfg.prediction_type == "epsilon" else out
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        eps = (x_t - s_t * x0) / n_t
        return s_p * x0 + n_p * eps

    def consistency(self, x_t: Tensor, t: Tensor, features: Tensor) -> Tensor:
        """The student's f(x_t, t) (not clipped)."""
        return self.parameterisation(self.student.model(x_t, t, features), x_t, t)

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        student = self.student
        x0 = normalized_actions(student, batch)  # (B, H, A)
        b = x0.shape[0]
        t = torch.randint(0, self.t_max + 1, (b,), device=x0.device)  # (B,)
        t_prev = (t - self.config.solver_step).clamp(min=-1)
        x_t = student.schedule.add_noise(x0, torch.randn_like(x0), t)
        # Teacher and student read the same (possibly paraphrase-mixed) instruction embeddings.
        batch = student.augment_instructions(batch)
        features = student.encode_observations(batch)  # (B, To, O)
        with torch.no_grad():
            x_prev = self.teacher_ddim_step(x_t, t, t_prev, self.teacher.encode_observations(batch))
            # The target without dropout: a noisy target only adds variance to the loss.
            was_training = student.model.training
            student.model.eval()
            try:
                target = self.consistency(x_prev, t_prev, features.detach())
            finally:
                student.model.train(was_training)
        pred = self.consistency(x_t, t, features)
        if self.config.loss == "l2":
            return F.mse_loss(pred, target)
        c = self.config.huber_c
        sq = (pred - target).pow(2).flatten(1).sum(1)  # (B,)
        return ((sq + c * c).sqrt() - c).mean()


def normalized_actions(policy: DiffusionPolicy, batch: Mapping[str, Any]) -> Tensor:
    """The batch's action windows (B, H, A) in the policy's normalised space (about [-1, 1])."""
    from dreamrt.policies.diffusion_policy import _module_key

    key = policy.config.action_key
    return policy.norms[_module_key(key)].normalize(policy._tensor(batch, key).float())


# ---------------------------------------------------------------------------- closeness to the teacher


@torch.no_grad()
def sample_normalized(policy: DiffusionPolicy, sampler: Any, batch: Mapping[str, Any], seed: int) -> Tensor:
    """Action sequences (B, H, A) in normalised units from ``sampler`` with ``policy``'s network.

    As ``policy.predict_actions`` without unnormalising and with an explicit sampler. x_T
    and every step's noise are drawn on the CPU from ``seed`` and then moved, so two
    policies given the same seed start from the same x_T on any device. Returns CPU tensors.
    """
    features = policy.encode_observations(batch)  # (B, To, O)
    shape = (features.shape[0], policy.config.horizon, policy.config.action_dim)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g).to(features)
    noise = (
        torch.randn((sampler.num_steps, *shape), generator=g).to(features) if sampler.is_stochastic else None
    )

    def denoise(x: Tensor, t: int) -> Tensor:
        return policy.model(x, torch.tensor(t, device=x.device), features)

    return sampler.sample(denoise, x_T, noise=noise).cpu()


def _mean_distance(a: Tensor, b: Tensor) -> float:
    """Mean over windows and horizon steps of the Euclidean distance between action vectors."""
    return float((a - b).pow(2).sum(-1).sqrt().mean())


class TeacherReference:
    """The teacher's samples on fixed windows, computed once; :meth:`compare` scores a student against them.

    All distances are mean Euclidean distances between action vectors (over windows and
    horizon steps) in the policy's normalised action units, where min-max normalisation
    maps the store's action range to [-1, 1]:

    - ``spread``: data actions to their mean over the windows (how much actions vary);
    - ``teacher_vs_data``: the teacher's samples to the recorded actions;
    - ``teacher_self``: the teacher's samples to its samples from other noise (its own variability);
    - ``random_vs_teacher``: uniform random actions in [-1, 1] to the teacher's samples;
    - ``student{n}_vs_teacher``: the student's n-step samples from the same x_T to the teacher's.
    """

    def __init__(self, teacher: DiffusionPolicy, batch: Mapping[str, Any], seed: int = 0):
        self.batch = batch
        self.seed = seed
        teacher_was_training = teacher.training
        teacher.eval()
        try:
            self.data = normalized_actions(teacher, batch).cpu()  # (B, H, A)
            self.samples = sample_normalized(teacher, teacher.sampler, batch, seed)
            other = sample_normalized(teacher, teacher.sampler, batch, seed + 1)
        finally:
            teacher.train(teacher_was_training)
        g = torch.Generator().manual_seed(seed + 2)
        random = torch.rand(self.samples.shape, generator=g) * 2.0 - 1.0
        self.metrics = {
            "spread": _mean_distance(self.data, self.data.mean(0, keepdim=True)),
            "teacher_vs_data": _mean_distance(self.samples, self.data),
            "teacher_self": _mean_distance(self.samples, other),
            "random_vs_teacher": _mean_distance(random.to(self.samples), self.samples),
        }

    def compare(self, student: DiffusionPolicy, num_steps: list[int]) -> dict[str, float]:
        """``student{n}_vs_teacher`` and ``student{n}_vs_data`` for each n in ``num_steps``, plus the reference metrics."""
        from dreamrt.policies.consistency import ConsistencySampler

        was_training = student.training
        student.eval()
        out = dict(self.metrics)
        try:
            for n in num_steps:
                sampler = ConsistencySampler(student.schedule, num_steps=n)
                samples = sample_normalized(student, sampler, self.batch, self.seed)
                out[f"student{n}_vs_teacher"] = _mean_distance(samples, self.samples)
                out[f"student{n}_vs_data"] = _mean_distance(samples, self.data)
        finally:
            student.train(was_training)
        return out


def reference_windows(dataset: torch.utils.data.Dataset, count: int, seed: int = 0) -> dict[str, Tensor]:
    """``count`` windows of ``dataset`` (a seeded choice, the same every call), collated into one batch."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=g)[: min(count, len(dataset))]
    return torch.utils.data.default_collate([dataset[int(i)] for i in index])


# ---------------------------------------------------------------------------- the job


def build_student(teacher: DiffusionPolicy, num_steps: int) -> DiffusionPolicy:
    """A trainable copy of ``teacher`` (its weights, normaliser and config) that predicts the clean
    sample and samples with consistency-``num_steps``."""
    from dreamrt.policies.consistency import SAMPLER_NAME
    from dreamrt.policies.diffusion_policy import DiffusionPolicy
    from dreamrt.policies.schedulers import SamplerConfig

    config = replace(
        teacher.config,
        noise=replace(teacher.config.noise, prediction_type="sample"),
        sampler=SamplerConfig(name=SAMPLER_NAME, num_steps=num_steps),
    )
    table = teacher.instruction_embeddings if teacher.config.encoder.use_language else None
    student = DiffusionPolicy(config, teacher.normalizer, instruction_embeddings=table)
    student.load_state_dict(teacher.state_dict(), strict=True)
    return student.to(teacher.device).train().requires_grad_(True)


def warm_start_student(student: DiffusionPolicy, path: str) -> None:
    """Load the weights of the consistency student at ``path`` into ``student`` (built by
    :func:`build_student`), keeping ``student``'s instruction table.

    Refuses a checkpoint that is not a consistency student, whose network or noise schedule
    differs, or whose normaliser differs (its weights would read differently scaled inputs).
    """
    from dreamrt.policies.consistency import SAMPLER_NAME
    from dreamrt.policies.diffusion_policy import load_diffusion_policy

    earlier = load_diffusion_policy(path)
    if earlier.config.sampler.name != SAMPLER_NAME or earlier.config.noise.prediction_type != "sample":
        raise UserError(
            f"student_init={path} is not a consistency student (sampler '{earlier.config.sampler.name}', "
            f"prediction_type '{earlier.config.noise.prediction_type}'); pass a checkpoint written by "
            "`dreamrt distill`, or drop student_init to start from the teacher's weights."
        )
    # What the network reads is compared; the instruction table (and its labels) stays the teacher's.
    unread = {
        "instructions": [],
        "language_fingerprint": "",
        "instruction_tasks": [],
        "instruction_grounding": "none",
    }
    ours = replace(student.config, sampler=earlier.config.sampler, **unread)
    theirs = replace(earlier.config, **unread)
    if ours != theirs:
        differing = [f.name for f in fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name)]
        raise UserError(
            f"student_init={path} has another network than the teacher's student (differs in: "
            f"{', '.join(differing)}); warm-start only from a student of the same architecture."
        )
    if earlier.normalizer.to_dict() != student.normalizer.to_dict():
        raise UserError(
            f"student_init={path} was trained with another normaliser than the teacher's; its weights "
            "read inputs scaled differently. Warm-start from a student whose teacher shared this normaliser "
            "(e.g. the teacher was fine-tuned with init_from= from that student's teacher)."
        )
    state = earlier.state_dict()
    if "instruction_embeddings" in state:  # the table belongs to the teacher's store, not the weights
        state["instruction_embeddings"] = student.instruction_embeddings
    student.load_state_dict(state, strict=True)


def distill(cfg: DistillConfig, out_dir: str | os.PathLike[str]) -> tuple[TrainResult, dict[str, float]]:
    """Distil ``cfg.teacher`` into a consistency student; returns the trainer's result and the final closeness."""
    from dreamrt.episodes import SamplerConfig as WindowConfig
    from dreamrt.episodes import open_store
    from dreamrt.policies.diffusion_policy import (
        POLICY_KIND,
        TASK_INDEX_KEY,
        checkpoint_config,
        load_diffusion_policy,
    )
    from dreamrt.training.dataset import EpisodeDataset, EpisodeDatasetConfig
    from dreamrt.training.trainer import CheckpointContent, fit

    if not cfg.teacher or cfg.teacher == MISSING:
        raise UserError(
            "`dreamrt distill` needs a teacher: pass teacher=PATH (a `dreamrt train` run directory or one of its "
            "checkpoints)."
        )
    if not cfg.dataset.path or cfg.dataset.path == MISSING:
        raise UserError(
            "`dreamrt distill` needs an episode store: pass dataset.path=PATH (usually the store the teacher was "
            "trained on)."
        )
    out_dir = Path(out_dir)
    teacher = load_diffusion_policy(cfg.teacher)
    check_teacher_identity(cfg.teacher, out_dir, resuming=cfg.resume is not None)
    tc = teacher.config
    store = open_store(cfg.dataset.path)
    task_index_map = _check_store(store, teacher)

    obs_keys = [*tc.lowdim_keys, *tc.image_keys, *([TASK_INDEX_KEY] if tc.encoder.use_language else [])]
    windows = WindowConfig(
        horizon=tc.horizon,
        n_obs_steps=tc.n_obs_steps,
        n_action_steps=tc.n_action_steps,
        obs_keys=obs_keys,
        action_keys=[tc.action_key],
    )
    has_val = cfg.dataset.val_ratio > 0 and store.num_episodes >= 2
    train_data = EpisodeDataset(
        EpisodeDatasetConfig(
            path=cfg.dataset.path,
            sampler=windows,
            split="train",
            val_ratio=cfg.dataset.val_ratio if has_val else 0.0,
            seed=cfg.dataset.split_seed,
            cache=cfg.dataset.cache,
        ),
        task_index_map=task_index_map,
    )
    val_data = train_data.split_dataset("val") if has_val else None

    student = build_student(teacher, cfg.num_steps)
    if cfg.student_init and cfg.resume is None:  # a resumed run restores its own weights
        warm_start_student(student, cfg.student_init)
    if cfg.language_augment.enabled:
        student.instruction_augment = paraphrase_mixer(
            store, cfg.language_augment, len(tc.instructions), tc.encoder.use_language, task_index_map
        )
    objective = ConsistencyDistillation(student, teacher, cfg.objective)
    reference = TeacherReference(
        teacher, reference_windows(train_data, cfg.eval_windows), seed=cfg.trainer.seed
    )
    report_steps = sorted({1, cfg.num_steps})

    def evaluate(model: nn.Module) -> dict[str, float]:
        return reference.compare(model.student, report_steps)

    trainer_cfg = replace(cfg.trainer, steps=cfg.steps)
    result = fit(
        objective,
        train_data,
        trainer_cfg,
        out_dir,
        checkpoint=CheckpointContent(POLICY_KIND, checkpoint_config(student), teacher.normalizer.to_dict()),
        val_data=val_data,
        param_groups=student.optim_groups(trainer_cfg.weight_decay, trainer_cfg.encoder_weight_decay),
        evaluate=evaluate if trainer_cfg.eval_every else None,
        resume=cfg.resume,
    )
    final_model = result.ema_model if result.ema_model is not None else result.model
    closeness = reference.compare(final_model.student, sorted({1, 2, 3, cfg.num_steps}))
    return result, closeness


def run(cfg: DistillConfig, out_dir: Path | None) -> JobResult:
    if out_dir is None:
        raise UserError("`dreamrt distill` needs an output directory for checkpoints and logs (--out DIR).")
    result, closeness = distill(cfg, out_dir)
    summary = {
        "run_dir": str(out_dir),
        "teacher": str(cfg.teacher),
        "student_steps": cfg.num_steps,
        "steps": result.step,
        "interrupted": result.interrupted,
        "checkpoint": str(result.checkpoint) if result.checkpoint is not None else None,
        "elapsed_s": round(result.elapsed_s, 3),
        **{k: round(v, 6) for k, v in result.metrics.items() if not k.startswith("eval/")},
        **{f"closeness/{k}": round(v, 6) for k, v in closeness.items()},
    }
    return JobResult(summary=summary, exit_code=130 if result.interrupted else 0)


def _teacher_identity(path: str) -> dict[str, Any]:
    from dreamrt.training.checkpoint import MODEL_FILE, read_meta, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    meta = read_meta(checkpoint)
    return {"path": str(checkpoint), "step": meta.step, "model_sha256": meta.files[MODEL_FILE]}


def check_teacher_identity(path: str, out_dir: Path, *, resuming: bool) -> None:
    """Write ``<run>/teacher.json``; when resuming, refuse a teacher with other weights than the saved run's.
    Any checkpoint kind (the world model's distillation uses it too)."""
    identity = _teacher_identity(path)
    record = out_dir / TEACHER_FILE
    if resuming and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("model_sha256") != identity["model_sha256"]:
            raise UserError(
                f"This distill run was made from the teacher {saved.get('path')} (step {saved.get('step')}), but "
                f"teacher={path} has other weights. Resume with the original teacher, or start a new run."
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps(identity, indent=2) + "\n")
    os.replace(tmp, record)


def _check_store(store: Any, teacher: DiffusionPolicy) -> np.ndarray | None:
    """The store holds what the teacher reads, with the same widths and (for language) only
    instructions the teacher has in its table. Returns the store-to-teacher task index map where
    the two task lists differ in order (None where the store's list starts the teacher's)."""
    tc = teacher.config
    features = store.features
    wanted = [*tc.lowdim_keys, *tc.image_keys, tc.action_key]
    missing = [k for k in wanted if k not in features]
    if missing:
        raise UserError(
            f"The episode store {store.path} has no {missing}, which the teacher reads; it holds {store.user_keys}. "
            "Distil on the store the teacher was trained on (or one recorded the same way)."
        )
    widths = {
        k: int(features[k].shape[0]) for k in [*tc.lowdim_keys, tc.action_key] if len(features[k].shape) == 1
    }
    expected = {**dict(zip(tc.lowdim_keys, tc.encoder.lowdim_dims)), tc.action_key: tc.action_dim}
    if widths != expected:
        raise UserError(
            f"The store's feature widths {widths} differ from the teacher's {expected}. Distil on the store the "
            "teacher was trained on."
        )
    if tc.encoder.use_language:
        from dreamrt.policies.language import normalize_instruction

        tasks = [normalize_instruction(t) for t in store.tasks]
        teacher_rows = {text: row for row, text in enumerate(tc.instructions)}
        unknown = [t for t in tasks if t not in teacher_rows]
        if unknown:
            raise UserError(
                f"The store holds {len(unknown)} instruction(s) the teacher was not trained on, e.g. "
                f"{unknown[:3]}: the teacher's {len(tc.instructions)} instructions are fixed in its table. "
                "Distil on the store the teacher was trained on, or one recorded with the same tasks."
            )
        # A store appended to later keeps its task list in order, so the teacher's own store
        # indexes the table as it is; another recording of the same tasks lists them in the
        # order it met them, and its indices are translated.
        if tasks != list(tc.instructions)[: len(tasks)]:
            return np.array([teacher_rows[t] for t in tasks], dtype=np.int64)
    return None
