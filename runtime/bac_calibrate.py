"""`dreamrt bac calibrate`: record sub-block outputs over a sampler's steps and write a BAC schedule.

    dreamrt bac calibrate policy.path=CKPT observations.dataset=STORE [schedule.num_updates=10]
        [sampler.name=ddpm sampler.num_steps=100] [copy_to_checkpoint=true]
    dreamrt bac calibrate policy.preset=dp_reference          # random weights: timing only

Steps:
1. load the ``dpt_policy`` checkpoint with the sampler to calibrate for (DDPM over every
   training step by default), or build a randomly initialised DP-T from a size preset;
2. observation features: ``observations.num`` windows spread evenly over the episode store,
   through the policy's normaliser and encoder (a bare preset gets standard-normal features);
3. run the full sampler on them, recording every sub-block's residual at every step, and
   average per block the (K, K) error matrix of ``schedule.metric`` and the L1 distances
   (:func:`record_statistics`);
4. the Adaptive Caching Scheduler and Bubbling Union (:mod:`dreamrt.runtime.bac_schedule`),
   or uniform caching with ``schedule.method=uniform``;
5. write ``bac_schedule.json`` and ``bac_calibration.safetensors`` (the matrices) to the run
   directory and, with ``copy_to_checkpoint``, the schedule beside the checkpoint's weights;
6. check the schedule: the action error of cached vs full sampling with the same noise on the
   calibration observations, and the per-chunk latency with and without caching (batch 1).

Dimensions: K sampler steps, N sub-blocks, B observations per recording batch, F = Ta * D
(one block's residual per sample, flattened).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult
from dreamrt.policies.schedulers import SamplerConfig
from dreamrt.runtime.bac import (
    SCHEDULE_FILE,
    BACSchedule,
    CachedDenoiser,
    is_ffn,
    make_schedule,
    model_blocks,
    save_schedule,
)
from dreamrt.runtime.bac_schedule import (
    METRICS,
    SchedulerConfig,
    adaptive_schedule,
    uniform_update_steps,
    volatility,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

STATISTICS_FILE = "bac_calibration.safetensors"


# ---------------------------------------------------------------------------- config


@dataclass
class PolicySection:
    path: str = ""  # a dpt_policy checkpoint, or a run directory (its newest checkpoint)
    preset: str = ""  # without path: a randomly initialised DP-T of this size preset (timing only)
    action_dim: int = 7  # preset only
    obs_dim: int = 64  # preset only: width of the per-step observation features
    seed: int = 0  # preset only: the random weights


@dataclass
class SamplerSection:
    """The sampler to calibrate for (a schedule only fits the sampler it was made for)."""

    name: str = "ddpm"
    num_steps: int | None = None  # None: every training timestep (Diffusion Policy's DDPM-100)
    eta: float = SamplerConfig.eta
    spacing: str = SamplerConfig.spacing

    def build(self) -> SamplerConfig:
        return SamplerConfig(**vars(self))


@dataclass
class ObservationsSection:
    dataset: str = ""  # the episode store the policy was trained on; windows spread evenly over it
    num: int = 8  # calibration observations (the paper's code uses 1; more make the schedule robust)
    seed: int = 0  # the initial noise and step noise of the calibration runs; a preset's features


@dataclass
class ScheduleSection:
    method: str = "bac"  # "bac" (scheduler + Bubbling Union) or "uniform" (every k-th step)
    num_updates: int = SchedulerConfig.num_updates  # bac: update steps per block, step 0 included
    metric: str = SchedulerConfig.metric  # bac: "cosine" | "l1" | "l2"
    bubble_top_n: int = SchedulerConfig.bubble_top_n  # bac: Bubbling Union picks (0: off)
    always_update_last: bool = SchedulerConfig.always_update_last  # bac
    every: int = 10  # uniform: update at steps 0, every, 2*every, ...

    def build(self) -> SchedulerConfig:
        return SchedulerConfig(
            num_updates=self.num_updates,
            metric=self.metric,
            bubble_top_n=self.bubble_top_n,
            always_update_last=self.always_update_last,
        )


@dataclass
class CalibrateConfig:
    policy: PolicySection = field(default_factory=PolicySection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    observations: ObservationsSection = field(default_factory=ObservationsSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    batch_size: int = 4  # observations recorded at once; memory ~ N * K * batch_size * F floats
    copy_to_checkpoint: bool = False  # also write bac_schedule.json into the checkpoint directory
    overwrite: bool = False  # replace an existing bac_schedule.json in the checkpoint
    latency_repeats: int = 5  # timed chunks per variant at batch 1 (0: no latency check)
    threads: int = 0  # torch CPU threads for the job (0: torch's default)
    device: str = "cpu"
    progress: bool = True  # tqdm bar over the recorded sampler steps

    def __post_init__(self) -> None:
        p = self.policy
        if bool(p.path) == bool(p.preset):
            raise UserError(
                "bac calibrate needs exactly one model: policy.path=CKPT (a dpt_policy checkpoint or run directory) "
                f"or policy.preset=NAME (random weights, for timing); got path={p.path!r}, preset={p.preset!r}."
            )
        if p.preset:
            from dreamrt.policies.dpt import PRESETS

            choose("DP-T size preset (policy.preset)", p.preset, PRESETS)
        if p.preset and (p.action_dim < 1 or p.obs_dim < 1):
            raise UserError(
                f"policy.action_dim and policy.obs_dim must be >= 1, got {p.action_dim}, {p.obs_dim}."
            )
        if p.path and not self.observations.dataset:
            raise UserError(
                "bac calibrate with a policy checkpoint needs observations to calibrate on: pass "
                "observations.dataset=STORE (the episode store the policy was trained on)."
            )
        if p.preset and self.observations.dataset:
            raise UserError(
                "observations.dataset needs a policy checkpoint (its encoder and normaliser turn windows into "
                "features); a random-weight policy.preset uses random features. Drop one of the two."
            )
        if self.observations.num < 1 or self.batch_size < 1:
            raise UserError(
                f"observations.num and batch_size must be >= 1, got {self.observations.num}, {self.batch_size}."
            )
        if self.latency_repeats < 0 or self.threads < 0:
            raise UserError(
                f"latency_repeats and threads must be >= 0, got {self.latency_repeats}, {self.threads}."
            )
        if self.overwrite and not self.copy_to_checkpoint:
            raise UserError("overwrite=true only applies with copy_to_checkpoint=true; set both or neither.")
        if self.copy_to_checkpoint and not p.path:
            raise UserError("copy_to_checkpoint=true needs policy.path: a preset model has no checkpoint.")
        choose("schedule.method", self.schedule.method, ("bac", "uniform"))
        self.sampler.build()
        self.schedule.build()
        if self.schedule.method == "uniform" and self.schedule.every < 1:
            raise UserError(f"schedule.every must be >= 1 for uniform caching, got {self.schedule.every}.")


# ---------------------------------------------------------------------------- recording


@dataclass
class CalibrationStatistics:
    """Per-block step-to-step statistics averaged over the calibration observations."""

    blocks: list[str]
    metric: str
    errors: np.ndarray  # (N, K, K): error[a, t] of serving step t with step a's output, in ``metric``
    l1_distances: np.ndarray  # (N, K, K): mean |output_a - output_t| (Bubbling Union's volatility)
    num_observations: int

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        save_file(
            {"errors": self.errors.astype(np.float64), "l1_distances": self.l1_distances.astype(np.float64)},
            str(path),
            metadata={
                "blocks": json.dumps(self.blocks),
                "metric": self.metric,
                "num_observations": str(self.num_observations),
            },
        )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStatistics:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                errors, l1 = f.get_tensor("errors"), f.get_tensor("l1_distances")
            return cls(json.loads(meta["blocks"]), meta["metric"], errors, l1, int(meta["num_observations"]))
        except (OSError, KeyError, ValueError, SafetensorError) as error:
            raise UserError(
                f"{path} is not a BAC calibration file ({error}); rerun `dreamrt bac calibrate`."
            ) from None

    def schedule(
        self, model: nn.Module, sampler: Any, config: SchedulerConfig, **settings: Any
    ) -> BACSchedule:
        """Run the scheduler and Bubbling Union on these statistics (e.g. for another budget)."""
        if config.metric != self.metric:
            raise UserError(
                f"These statistics measure '{self.metric}', the scheduler asks for '{config.metric}'; record "
                f"with metric='{config.metric}'."
            )
        names = list(model_blocks(model)[0])
        if names != self.blocks or self.errors.shape[1] != len(sampler.timesteps):
            raise UserError(
                f"Calibration statistics for {len(self.blocks)} blocks and {self.errors.shape[1]} steps do not fit "
                f"this model ({len(names)} blocks) and sampler ({len(sampler.timesteps)} steps)."
            )
        steps, bubbled = adaptive_schedule(self.errors, self.l1_distances, [is_ffn(b) for b in names], config)
        scores = volatility(self.l1_distances)
        info = {
            **asdict(config),
            "bubbled_blocks": [names[i] for i in bubbled],
            "volatility": {b: round(float(v), 6) for b, v in zip(names, scores)},
            "num_observations": self.num_observations,
            **settings,
        }
        return make_schedule(model, sampler, steps, method="bac", settings=info)


def record_statistics(
    model: nn.Module,
    sampler: Any,
    features: Tensor,
    metric: str = "cosine",
    *,
    batch_size: int = 4,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> CalibrationStatistics:
    """Run ``sampler`` with ``model`` on every row of ``features`` (B, To, O) and measure each block.

    Every sub-block runs at every step; its residual (B, Ta, D) is recorded, and per
    observation the (K, K) matrices between its steps are averaged over all observations.
    The initial noise and step noise come from ``generator``.
    """
    import torch
    from tqdm import tqdm

    choose("BAC metric", metric, METRICS)
    names = list(model_blocks(model)[0])
    n, k = len(names), len(sampler.timesteps)
    errors = np.zeros((n, k, k))
    l1 = np.zeros((n, k, k))
    total = features.shape[0]
    bar = tqdm(total=-(-total // batch_size) * k, unit="step", desc="bac calibrate", disable=not progress)
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            record = _record_run(model, sampler, features[start : start + batch_size], n, generator, bar)
            for j in range(n):
                f = record[j].transpose(0, 1).double()  # (B, K, F)
                dist = torch.cdist(f, f, p=1) / f.shape[-1]  # (B, K, K) mean absolute difference
                l1[j] += dist.sum(0).cpu().numpy()
                if metric == "cosine":
                    unit = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    err = 1.0 - unit @ unit.transpose(1, 2)
                elif metric == "l1":
                    err = dist
                else:
                    err = torch.cdist(f, f, p=2) / f.shape[-1] ** 0.5  # root-mean-square difference
                errors[j] += err.sum(0).cpu().numpy()
    bar.close()
    return CalibrationStatistics(names, metric, errors / total, l1 / total, total)


def _record_run(model: nn.Module, sampler: Any, obs: Tensor, n: int, generator: Any, bar: Any) -> Tensor:
    """One full sampling run on ``obs`` (B, To, O) with every block's residual recorded: (N, K, B, F)."""
    import torch

    b, k = obs.shape[0], len(sampler.timesteps)
    sample_shape = (b, model.config.horizon, model.config.action_dim)  # (B, Ta, A)
    x_t = torch.randn(sample_shape, generator=generator, device=obs.device, dtype=obs.dtype)
    record: Tensor | None = None  # allocated once the residual width is known
    step = 0

    def run_block(j: int, block: nn.Module, h: Tensor, memory: Tensor) -> Tensor:
        nonlocal record
        r = block(h, memory)
        if record is None:
            record = torch.empty((n, k, b, r[0].numel()), dtype=torch.float32, device=r.device)
        record[j, step] = r.reshape(b, -1)
        return r

    def denoise(x: Tensor, t: int) -> Tensor:
        nonlocal step
        out = model(x, torch.tensor(t, device=x.device), obs, run_block=run_block)
        step += 1
        bar.update(1)
        return out

    sampler.sample(denoise, x_t, generator=generator)
    assert record is not None and step == k, (step, k)
    return record


def calibrate(
    model: nn.Module,
    sampler: Any,
    features: Tensor,
    config: SchedulerConfig,
    *,
    batch_size: int = 4,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **settings: Any,
) -> tuple[BACSchedule, CalibrationStatistics]:
    """Record statistics on ``features`` (B, To, O) and build the BAC schedule for ``model`` and ``sampler``."""
    config.check_steps(len(sampler.timesteps))
    stats = record_statistics(
        model, sampler, features, config.metric, batch_size=batch_size, generator=generator, progress=progress
    )
    return stats.schedule(model, sampler, config, **settings), stats


# ---------------------------------------------------------------------------- checks


def sample_chunks(
    model: nn.Module,
    sampler: Any,
    features: Tensor,
    schedule: BACSchedule | None,
    seed: int,
) -> Tensor:
    """(B, Ta, A) samples for ``features`` (B, To, O), cached by ``schedule`` or not (None); noise from ``seed``."""
    import torch

    g = torch.Generator(device=features.device).manual_seed(seed)
    shape = (features.shape[0], model.config.horizon, model.config.action_dim)
    with torch.inference_mode():
        x_t = torch.randn(shape, generator=g, device=features.device, dtype=features.dtype)
        if schedule is None:
            return sampler.sample(
                lambda x, t: model(x, torch.tensor(t, device=x.device), features), x_t, generator=g
            )
        return sampler.sample(CachedDenoiser(model, schedule, sampler)(features), x_t, generator=g)


def chunk_latency(
    model: nn.Module,
    sampler: Any,
    features: Tensor,
    schedules: Sequence[BACSchedule | None],
    repeats: int,
) -> list[float]:
    """Median seconds per chunk (one full sampling run on ``features``) for each schedule (None: uncached).

    The variants are interleaved, after one warm-up run each, so drift in the machine's
    speed affects them alike.
    """
    import torch

    def one(schedule: BACSchedule | None) -> float:
        start = time.perf_counter()
        sample_chunks(model, sampler, features, schedule, seed=0)
        if features.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for schedule in schedules:
        one(schedule)
    times: list[list[float]] = [[] for _ in schedules]
    for _ in range(repeats):
        for i, schedule in enumerate(schedules):
            times[i].append(one(schedule))
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------------------- the job


def _load_model(cfg: CalibrateConfig) -> tuple[Any, nn.Module, Any, dict[str, Any]]:
    """(policy or None, the DP-T, the sampler, settings describing them)."""
    import torch

    from dreamrt.policies.schedulers import NoiseSchedule, NoiseScheduleConfig, make_sampler

    sampler_cfg = cfg.sampler.build()
    if cfg.policy.path:
        from dreamrt.policies.diffusion_policy import load_diffusion_policy
        from dreamrt.training.checkpoint import resolve_checkpoint

        checkpoint = resolve_checkpoint(cfg.policy.path)
        policy = load_diffusion_policy(checkpoint, sampler=sampler_cfg, device=cfg.device)
        return policy, policy.model, policy.sampler, {"checkpoint": str(checkpoint)}
    from dreamrt.policies.dpt import DPT, preset

    torch.manual_seed(cfg.policy.seed)
    model = DPT(preset(cfg.policy.preset, cfg.policy.action_dim, cfg.policy.obs_dim)).eval().to(cfg.device)
    model.requires_grad_(False)
    sampler = make_sampler(NoiseSchedule(NoiseScheduleConfig()), sampler_cfg)
    return None, model, sampler, {"preset": cfg.policy.preset, "weights": f"random (seed {cfg.policy.seed})"}


def _features(cfg: CalibrateConfig, policy: Any, model: nn.Module) -> Tensor:
    """(num, To, O) observation features to calibrate on."""
    import torch

    obs_cfg = cfg.observations
    if policy is None:
        g = torch.Generator().manual_seed(obs_cfg.seed)
        c = model.config
        return torch.randn((obs_cfg.num, c.n_obs_steps, c.obs_dim), generator=g).to(cfg.device)
    from dreamrt.episodes import SamplerConfig as WindowConfig
    from dreamrt.policies.diffusion_policy import TASK_INDEX_KEY
    from dreamrt.training.dataset import EpisodeDataset, EpisodeDatasetConfig

    pc = policy.config
    windows = WindowConfig(
        horizon=pc.horizon,
        n_obs_steps=pc.n_obs_steps,
        n_action_steps=pc.n_action_steps,
        obs_keys=[*pc.lowdim_keys, *pc.image_keys, *([TASK_INDEX_KEY] if pc.encoder.use_language else [])],
        action_keys=[pc.action_key],
    )
    data = EpisodeDataset(EpisodeDatasetConfig(path=obs_cfg.dataset, sampler=windows, split="all"))
    if len(data) == 0:
        raise UserError(f"The episode store {obs_cfg.dataset} yields no windows of horizon {pc.horizon}.")
    picks = np.unique(np.linspace(0, len(data) - 1, min(obs_cfg.num, len(data))).round().astype(int))
    items = [data[int(i)] for i in picks]
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != pc.action_key}
    with torch.inference_mode():
        return policy.encode_observations(batch)  # (num, To, O)


def run(cfg: CalibrateConfig, out_dir: Path | None) -> JobResult:
    import torch

    if out_dir is None:
        raise UserError(
            "`dreamrt bac calibrate` writes the schedule into its output directory; pass --out DIR."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy, model, sampler, source = _load_model(cfg)
    checkpoint_target = None
    if cfg.copy_to_checkpoint:
        checkpoint_target = Path(source["checkpoint"]) / SCHEDULE_FILE
        if checkpoint_target.exists() and not cfg.overwrite:
            raise UserError(
                f"{checkpoint_target} already exists; pass overwrite=true to replace it, or drop "
                "copy_to_checkpoint to keep the new schedule in the run directory only."
            )
    sampler_cfg = cfg.sampler.build()
    settings = {
        **source,
        "sampler_config": asdict(sampler_cfg),
        "observations": {"dataset": cfg.observations.dataset or None, "seed": cfg.observations.seed},
    }

    start = time.perf_counter()
    features = _features(cfg, policy, model)  # (num, To, O)
    stats = None
    if cfg.schedule.method == "uniform":
        steps = uniform_update_steps(len(sampler.timesteps), cfg.schedule.every)
        n = len(model_blocks(model)[0])
        schedule = make_schedule(
            model, sampler, [steps] * n, "uniform", {"every": cfg.schedule.every, **settings}
        )
    else:
        g = torch.Generator(device=features.device).manual_seed(cfg.observations.seed)
        schedule, stats = calibrate(
            model,
            sampler,
            features,
            cfg.schedule.build(),
            batch_size=cfg.batch_size,
            generator=g,
            progress=cfg.progress,
            **settings,
        )
    calibration_s = time.perf_counter() - start

    schedule_path = save_schedule(schedule, out_dir / SCHEDULE_FILE)
    summary: dict[str, Any] = {"schedule": str(schedule_path), **schedule.describe()}
    if stats is not None:
        summary["statistics"] = str(stats.save(out_dir / STATISTICS_FILE))
        summary["bubbled_blocks"] = list(schedule.settings["bubbled_blocks"])
    if checkpoint_target is not None:
        shutil.copyfile(schedule_path, checkpoint_target)
        summary["checkpoint_schedule"] = str(checkpoint_target)
    summary["calibration_s"] = round(calibration_s, 3)

    # The action error of caching, in the sampler's (normalised) action space, same noise.
    check = features[: cfg.batch_size]
    full = sample_chunks(model, sampler, check, None, seed=cfg.observations.seed + 1)
    cached = sample_chunks(model, sampler, check, schedule, seed=cfg.observations.seed + 1)
    diff = (cached - full).abs()
    summary["action_error_mean"] = round(float(diff.mean()), 6)
    summary["action_error_max"] = round(float(diff.max()), 6)
    if cfg.latency_repeats:
        full_s, cached_s = chunk_latency(model, sampler, features[:1], [None, schedule], cfg.latency_repeats)
        summary.update(
            latency_full_ms=round(1e3 * full_s, 3),
            latency_bac_ms=round(1e3 * cached_s, 3),
            speedup=round(full_s / cached_s, 3),
            threads=torch.get_num_threads(),
        )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(format_summary(summary))
    return JobResult(summary=summary)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"BAC schedule ({summary['method']}, {summary['sampler']}-{summary['num_steps']}, "
        f"{summary['num_blocks']} blocks): {summary['schedule']}",
        f"  updates per block: {summary['updates_min']}..{summary['updates_max']} "
        f"(mean {summary['updates_mean']}), block compute {100 * summary['compute_fraction']:.1f}% of full",
        f"  action error vs full sampling: mean {summary['action_error_mean']:.4g}, "
        f"max {summary['action_error_max']:.4g}",
    ]
    if summary.get("bubbled_blocks"):
        lines.append(f"  Bubbling Union refreshed: {', '.join(summary['bubbled_blocks'])}")
    if "speedup" in summary:
        lines.append(
            f"  chunk latency (batch 1, {summary['threads']} threads): full {summary['latency_full_ms']:.1f} ms, "
            f"BAC {summary['latency_bac_ms']:.1f} ms, speedup {summary['speedup']:.2f}x"
        )
    if "checkpoint_schedule" in summary:
        lines.append(f"  copied to {summary['checkpoint_schedule']}")
    return "\n".join(lines)
