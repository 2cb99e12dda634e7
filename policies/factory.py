"""`policy=expert|random` or `policy.path=DIR`: the one way every job picks a policy.

A checkpoint policy (``policy.path``) takes runtime options; each is optional and the
defaults load the checkpoint exactly as saved:

- ``sampler`` (ddpm | ddim | consistency) and ``steps``: the inference sampler. ``steps``
  alone changes the checkpoint's own sampler's step count; a sampler other than the
  checkpoint's starts from its defaults (DDPM: every training step, DDIM: 10, consistency:
  1). ``consistency`` needs a consistency-distilled student (``dreamrt distill``).
- ``noise_scale``: the sampler's temperature, x_T = noise_scale * N(0, I) (0..1; null: the
  checkpoint's, 1 unless saved otherwise). Below 1 leans toward the modes of the learned action
  distribution; 0 makes DDIM (eta 0) and the consistency student deterministic.
- ``task_noise_scale``: a temperature per task, ``{rotate_red_block_left: 0.5, ...}`` (task
  names of :mod:`dreamrt.sim.tasks`); tasks not named keep ``noise_scale``. A language policy
  applies it to the task its instruction names, which needs its rows' task labels (``dreamrt
  label-tasks``). Entries are laid over the checkpoint's own (a task set to the base
  temperature undoes a saved entry); null keeps the checkpoint's.
- ``cache`` (none | bac | uniform) and ``cache_updates``: BAC caching of the denoiser's
  sub-blocks. ``bac`` reads ``bac_schedule.json`` beside the checkpoint (``dreamrt bac
  calibrate ... copy_to_checkpoint=true`` writes it; it must be for this sampler);
  ``uniform`` recomputes every block at ``cache_updates`` evenly spaced steps (default 10).
- ``backend`` (torch | onnxruntime): onnxruntime runs the encoder and the denoiser from
  ``<checkpoint>/onnx/``, exported there on first use (:mod:`dreamrt.runtime.onnx_backend`),
  on the CUDA provider when onnxruntime has it, else the CPU.
- ``n_action_steps``: how many actions of each predicted chunk are executed before the next
  inference (the checkpoint's Ta; at most horizon - n_obs_steps + 1). Fewer re-plan more often:
  more reactive, more inference calls.
- ``threads``: the CPU threads of the backend's pool (torch's intra-op threads, or
  onnxruntime's). With onnxruntime, torch is set to one thread: what is left to it (the
  sampler arithmetic on a (1, H, A) tensor) gains nothing from more, and its idle workers
  would spin on the cores onnxruntime needs.
- ``grounding`` (none | task): how a language policy reads an instruction outside its
  instruction table; ``task`` classifies it into one of the policy's tasks and acts on that
  task's nearest training paraphrase (:mod:`dreamrt.policies.grounding`; the checkpoint needs
  its rows' task labels, ``dreamrt label-tasks``).

The runtime options apply in :func:`load_policy`; this module imports torch (and the
runtime modules, lazily) only when a checkpoint is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreamrt.errors import UserError, choose
from dreamrt.policies.protocol import Policy

if TYPE_CHECKING:
    from dreamrt.policies.diffusion_policy import DiffusionPolicy
    from dreamrt.runtime.bac import BACSchedule

BUILTIN_POLICIES = ("expert", "random")
SAMPLER_CHOICES = ("ddpm", "ddim", "consistency")
CACHE_CHOICES = ("none", "bac", "uniform")
BACKEND_CHOICES = ("torch", "onnxruntime")
DEFAULT_STEPS = {"ddpm": None, "ddim": 10, "consistency": 1}  # a sampler other than the checkpoint's
DEFAULT_CACHE_UPDATES = 10  # uniform caching: update steps per block (BAC's usual budget of 100 steps)
CONSISTENCY = "consistency"


@dataclass
class PolicyConfig:
    name: str = "expert"  # a built-in policy; ignored when `path` is set
    path: str | None = None  # a checkpoint directory (or a run directory: its newest checkpoint)
    seed: int = 0
    # Runtime options of checkpoint policies (see the module docstring); the defaults keep the checkpoint's.
    sampler: str | None = None  # ddpm | ddim | consistency; null: the checkpoint's sampler
    steps: int | None = (
        None  # sampler steps; null: the checkpoint's (its own sampler) or the sampler's default
    )
    noise_scale: float | None = None  # x_T = noise_scale * N(0, I), 0..1; null: the checkpoint's (1)
    # {task name: temperature}, laid over the checkpoint's; null: the checkpoint's. Typed Any so
    # that `policy.task_noise_scale={task: 0.5}` sets it whole (Hydra will not add keys to a typed dict).
    task_noise_scale: Any = None
    cache: str = "none"  # none | bac (bac_schedule.json beside the checkpoint) | uniform
    cache_updates: int | None = None  # update steps per block: uniform's budget (null: 10); bac: checked
    backend: str = "torch"  # torch | onnxruntime (exports <checkpoint>/onnx on first use)
    n_action_steps: int | None = None  # actions executed per chunk (Ta); null: the checkpoint's
    threads: int | None = None  # CPU threads of the backend's pool; null: the library default
    # How an instruction outside the policy's table is read: none | task (dreamrt.policies.grounding);
    # null: the checkpoint's instruction_grounding.
    grounding: str | None = None

    def __post_init__(self) -> None:
        if self.path is None:
            choose("policy", self.name, BUILTIN_POLICIES)
        if self.sampler is not None:
            choose("policy.sampler", self.sampler, SAMPLER_CHOICES)
        choose("policy.cache", self.cache, CACHE_CHOICES)
        choose("policy.backend", self.backend, BACKEND_CHOICES)
        if self.grounding is not None:
            from dreamrt.policies.grounding import GROUNDING_MODES

            choose("policy.grounding", self.grounding, GROUNDING_MODES)
        if self.noise_scale is not None and not (
            isinstance(self.noise_scale, int | float)
            and not isinstance(self.noise_scale, bool)
            and 0.0 <= self.noise_scale <= 1.0
        ):
            raise UserError(
                f"policy.noise_scale must be in [0, 1] or null (1: the learned distribution), got {self.noise_scale!r}."
            )
        if self.task_noise_scale is not None:
            from dreamrt.policies.schedulers import task_temperatures  # torch: only with a checkpoint policy

            self.task_noise_scale = task_temperatures(self.task_noise_scale, "policy.task_noise_scale")
        for name in ("steps", "cache_updates", "n_action_steps", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"policy.{name} must be a positive integer or null, got {value!r}.")
        if self.cache_updates is not None and self.cache == "none":
            raise UserError(
                f"policy.cache_updates={self.cache_updates} needs a cache: set policy.cache=uniform (or bac), or "
                "drop cache_updates."
            )
        if self.path is None and self.runtime_options():
            raise UserError(
                f"{', '.join(f'policy.{k}' for k in self.runtime_options())} apply to checkpoint policies "
                f"(policy.path=CKPT); the built-in '{self.name}' policy has no sampler, cache or backend."
            )

    def runtime_options(self) -> dict[str, Any]:
        """The runtime options that differ from their defaults."""
        defaults = PolicyConfig.__dataclass_fields__
        names = (
            "sampler",
            "steps",
            "noise_scale",
            "task_noise_scale",
            "cache",
            "cache_updates",
            "backend",
            "n_action_steps",
            "threads",
            "grounding",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) != defaults[n].default}


def make_policy(
    cfg: PolicyConfig,
    *,
    action_dim: int = 7,
    rate_hz: float = 30.0,
    scene: str = "D",
    expert_noise=None,
    action_mode: str = "rel_cartesian",
) -> Policy:
    """Build the configured policy. ``scene`` is the env's scene variant (the expert needs its
    layout); ``expert_noise`` (a ``dreamrt.sim.expert.ExpertNoise`` or None) varies the expert's
    demonstrations and is ignored by other policies; ``action_mode`` is the env's, which the
    expert speaks (relative or absolute Cartesian targets)."""
    if cfg.path is not None:
        return load_policy(cfg.path, cfg)
    if cfg.name == "random":
        from dreamrt.policies.random_policy import RandomPolicy

        return RandomPolicy(action_dim=action_dim, rate_hz=rate_hz, seed=cfg.seed)
    # The expert reads privileged scene state, so it lives with the simulator it scripts.
    from dreamrt.sim.expert import ScriptedExpert

    return ScriptedExpert(scene=scene, seed=cfg.seed, noise=expert_noise, action_mode=action_mode)


def load_policy(
    path: str, cfg: PolicyConfig | None = None, *, bac_schedule: BACSchedule | None = None
) -> Policy:
    """Load the checkpoint at ``path`` (a directory, or ``shipped:<name>``) with ``cfg``'s runtime options (None: as saved).

    ``bac_schedule`` replaces the checkpoint's ``bac_schedule.json`` for ``cache=bac`` (e.g.
    one calibrated on the fly); it is checked against the model and the sampler all the same.
    """
    from dreamrt.policies.shipped import resolve_policy_path
    from dreamrt.training.checkpoint import read_meta, resolve_checkpoint

    checkpoint_dir = resolve_checkpoint(resolve_policy_path(path))
    kind = read_meta(checkpoint_dir).kind
    cfg = cfg if cfg is not None else PolicyConfig(path=str(path))
    # Match on the kind string so that choosing a built-in policy never imports torch.
    match kind:
        case "dpt_policy":
            return _load_diffusion_policy(checkpoint_dir, cfg, bac_schedule)
        case _:
            raise UserError(
                f"Checkpoint {checkpoint_dir} holds a '{kind}', which is not a policy dreamrt can load "
                "(policies: dpt_policy)."
            )


# ---------------------------------------------------------------------------- DP-T checkpoints


def saved_sampler(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The ``sampler`` mapping of a checkpoint's config.yaml (read without loading the weights)."""
    import yaml

    from dreamrt.training.checkpoint import CONFIG_FILE

    path = Path(checkpoint_dir) / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"Cannot read {path} ({error}); the checkpoint is incomplete or damaged.") from None
    sampler = config.get("sampler") if isinstance(config, dict) else None
    return dict(sampler) if isinstance(sampler, dict) else {}


def is_consistency_student(checkpoint_dir: str | Path) -> bool:
    """Whether a checkpoint samples with the consistency sampler (what ``dreamrt distill`` saves)."""
    return saved_sampler(checkpoint_dir).get("name") == CONSISTENCY


def sampler_config(
    saved: dict[str, Any],
    sampler: str | None,
    steps: int | None,
    checkpoint_dir: Path,
    noise_scale: float | None = None,
    task_noise_scale: dict[str, float] | None = None,
):
    """The SamplerConfig the options ask for, or None to keep the checkpoint's."""
    from dreamrt.policies.schedulers import SamplerConfig

    if sampler is None and steps is None and noise_scale is None and task_noise_scale is None:
        return None
    saved_name = saved.get("name", SamplerConfig.name)
    name = sampler or saved_name
    if name == CONSISTENCY and saved_name != CONSISTENCY:
        raise UserError(
            f"policy.sampler=consistency needs a consistency-distilled student (`dreamrt distill teacher=CKPT`); "
            f"{checkpoint_dir} is a diffusion policy sampled with {saved_name}. Pass the student's checkpoint, or "
            "pick sampler=ddpm|ddim for this one."
        )
    known = {f.name for f in fields(SamplerConfig)}
    if name == saved_name:
        base = {k: v for k, v in saved.items() if k in known}  # keeps eta and spacing
        base["num_steps"] = steps if steps is not None else saved.get("num_steps")
    else:
        base = {"num_steps": steps if steps is not None else DEFAULT_STEPS[name]}
        # The temperatures are the policy's, not one sampler's: they carry over.
        for temperature in ("noise_scale", "task_noise_scale"):
            if temperature in saved:
                base[temperature] = saved[temperature]
    if noise_scale is not None:
        base["noise_scale"] = float(noise_scale)
    if task_noise_scale is not None:
        base["task_noise_scale"] = {**base.get("task_noise_scale", {}), **task_noise_scale}
    return SamplerConfig(**{**base, "name": name})


def _load_diffusion_policy(
    checkpoint_dir: Path, cfg: PolicyConfig, bac_schedule: BACSchedule | None
) -> DiffusionPolicy:
    from dreamrt.policies.diffusion_policy import load_diffusion_policy

    sampler = sampler_config(
        saved_sampler(checkpoint_dir),
        cfg.sampler,
        cfg.steps,
        checkpoint_dir,
        cfg.noise_scale,
        cfg.task_noise_scale,
    )
    policy = load_diffusion_policy(
        checkpoint_dir,
        sampler=sampler,
        n_action_steps=cfg.n_action_steps,
        instruction_grounding=cfg.grounding,
    )
    schedule = cache_schedule(policy, cfg, checkpoint_dir, bac_schedule)
    _set_threads(cfg)
    if cfg.backend == "onnxruntime":
        from dreamrt.runtime.onnx_backend import attach_onnxruntime, ensure_export

        onnx_dir = ensure_export(policy, checkpoint_dir, blocks=schedule is not None)
        attach_onnxruntime(policy, onnx_dir, threads=cfg.threads, schedule=schedule)
    elif schedule is not None:
        from dreamrt.runtime.bac import CachedDenoiser

        policy.denoiser_factory = CachedDenoiser(policy.model, schedule, policy.sampler)
    return policy


def cache_schedule(
    policy: DiffusionPolicy, cfg: PolicyConfig, checkpoint_dir: Path, bac_schedule: BACSchedule | None = None
) -> BACSchedule | None:
    """The BAC schedule ``cfg.cache`` asks for, checked against the policy's model and sampler (None: no cache)."""
    if cfg.cache == "none":
        return None
    from dreamrt.runtime.bac import SCHEDULE_FILE, check_schedule, load_schedule, uniform_schedule

    sampler = policy.sampler
    if cfg.cache == "uniform":
        k = len(sampler.timesteps)
        every = math.ceil(k / (cfg.cache_updates or DEFAULT_CACHE_UPDATES))
        return uniform_schedule(policy.model, sampler, every)
    schedule = bac_schedule
    if schedule is None:
        path = checkpoint_dir / SCHEDULE_FILE
        if not path.is_file():
            name = getattr(policy.sampler_config, "name", None) or type(sampler).__name__
            raise UserError(
                f"policy.cache=bac reads {SCHEDULE_FILE} beside the checkpoint, and {checkpoint_dir} has none. "
                f"Calibrate one for this sampler: `dreamrt bac calibrate policy.path={checkpoint_dir} "
                f"observations.dataset=STORE sampler.name={name} sampler.num_steps={len(sampler.timesteps)} "
                "copy_to_checkpoint=true`, or use policy.cache=uniform."
            )
        schedule = load_schedule(path)
    check_schedule(schedule, policy.model, sampler)
    budget = schedule.settings.get("num_updates")
    if cfg.cache_updates is not None and budget is not None and budget != cfg.cache_updates:
        raise UserError(
            f"policy.cache_updates={cfg.cache_updates}, but {schedule.origin} was calibrated with {budget} updates "
            "per block (a BAC budget is fixed at calibration). Drop cache_updates, or recalibrate with "
            f"`dreamrt bac calibrate ... schedule.num_updates={cfg.cache_updates}`."
        )
    return schedule


def _set_threads(cfg: PolicyConfig) -> None:
    import torch

    if cfg.backend == "onnxruntime":
        torch.set_num_threads(1)  # see the module docstring; onnxruntime gets cfg.threads
    elif cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
