"""The training loop shared by policies and world models.

    result = fit(model, train_data, TrainerConfig(...), run_dir,
                 checkpoint=CheckpointContent(kind="dpt_policy", config=..., normalizer=...),
                 val_data=..., param_groups=..., evaluate=..., resume=None)

``model(batch) -> loss`` (a scalar tensor) is the whole contract: the batch is whatever the
dataset's items collate to, moved to the device. Around it the loop runs AdamW, a linear
warm-up then cosine LR schedule (``LambdaLR``), gradient clipping, an EMA of the weights
(:mod:`dreamrt.training.ema`), periodic validation loss, an optional ``evaluate(model) ->
dict`` hook (e.g. simulated rollouts), checkpoints, a tqdm bar with loss and samples/s, and
``metrics.csv`` + ``curves.png`` in the run directory.

What a checkpoint holds (``run_dir/checkpoints/step_XXXXXX``, format in docs/checkpoints.md):
``model.safetensors`` holds the EMA weights (what evaluation and deployment load) or the
raw weights when EMA is off. ``training_state/`` holds the optimizer state and, in the
scheduler slot, a :class:`LoopState`: the LR schedule's state plus the raw weights the
optimizer updates (when EMA is on). ``counters`` hold the batches consumed and the EMA
update count.

Exact resume (``resume=RUN_DIR`` or a checkpoint) gives parameters bitwise equal to an
uninterrupted run on the same machine, because nothing a step does depends on history
other than the saved state:
- data order: :class:`EpochBatchSampler` draws epoch ``e``'s permutation from a generator
  seeded by ``(seed, e)``; the position is the number of batches consumed, saved in the
  counters, so the resumed loader starts at the very next batch. Datasets must return the
  same item for the same index (random augmentation belongs in the model, which runs in
  the main process, as the image encoder's random crop does);
- randomness: before every step the global Python, NumPy and torch generators are seeded
  from ``(seed, rank, step)``, so dropout, noise and crops depend on the step alone (and
  differ between DDP ranks). Validation and the evaluate hook run inside
  ``torch.random.fork_rng`` with a fixed seed, so they see the same noise every time and
  never disturb training.

Distributed data parallel: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the
loop joins the process group itself (NCCL on CUDA, gloo on CPU), wraps the model in
``DistributedDataParallel`` and gives each rank its own shard of every epoch's permutation;
``batch_size`` is per process. Rank 0 alone validates, evaluates, writes checkpoints, logs
and shows the bar; the other ranks wait at a barrier.

Stopping: Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and
returns with ``interrupted=True`` (under DDP the ranks agree on the step). A second Ctrl-C
aborts at once.
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dreamrt.errors import UserError, choose
from dreamrt.training import checkpoint as ck
from dreamrt.training.ema import EMA, EMAConfig

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
VAL_SEED = 1234  # noise of the validation loss: fixed so successive values are comparable


# ---------------------------------------------------------------------------- config


COMPILE_MODES = ("off", "default", "reduce-overhead")  # trainer.compile


@dataclass
class TrainerConfig:
    steps: int = 100_000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 64  # per process
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 1e-3  # the main network (Diffusion Policy's transformer value)
    encoder_weight_decay: float = 1e-6  # observation / condition encoders, where the model has one
    warmup_steps: int = 1000  # linear warm-up from 0, then cosine down to min_lr_ratio * lr at `steps`
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    ema: EMAConfig = field(default_factory=EMAConfig)
    log_every: int = 50  # steps between metrics.csv rows
    val_every: int = 1000  # steps between validation losses; 0: never
    val_batches: int = 16  # batches per validation (the first ones of the validation set, in order)
    eval_every: int = 0  # steps between evaluate() calls; 0: never
    save_every: int = 5000  # steps between checkpoints (one is always written at the end); 0: end only
    keep_last: int | None = 3  # checkpoints kept in the run; None: all
    num_workers: int = 0  # DataLoader worker processes (unused when batches are gathered on the device)
    # Gather batches on the training device (a dataset's ``device_windows``: low-dim stores held in
    # memory) instead of a DataLoader: "auto" where the dataset offers it and its arrays take at most
    # 2 GiB, "on" (an error where it cannot), "off". The batches are the same either way.
    data_on_device: str = "auto"
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1"
    # torch intra-op CPU threads while training (None: torch's default). Small models train
    # faster on 1 thread, and far faster when other processes compete for the cores.
    threads: int | None = None
    # On CUDA, float32 matrix products and convolutions in TF32 (a 10-bit mantissa, several times
    # fp32's rate on Ampere and later GPUs), as most training code does; the flags are restored
    # when fit() returns. No effect on CPU.
    tf32: bool = True
    # torch.compile the loss computation (forward and backward): "off", "default", or
    # "reduce-overhead" (CUDA graphs on a GPU, where a small network's step is launch-bound).
    # The optimizer, EMA and validation stay eager. On this CPU "default" made a step slower
    # (docs/benchmarks.md); measure with `dreamrt bench training compile_modes=[...]` first.
    compile: str = "off"
    progress: bool = True  # tqdm bar
    plot: bool = True  # curves.png at each checkpoint and the end (~0.2 s each)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"trainer.{name} must be an int >= 1, got {value!r}.")
        for name in (
            "warmup_steps",
            "log_every",
            "val_every",
            "val_batches",
            "eval_every",
            "save_every",
            "num_workers",
            "seed",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"trainer.{name} must be an int >= 0, got {value!r}.")
        if self.log_every < 1:
            raise UserError(f"trainer.log_every must be >= 1, got {self.log_every}.")
        if not self.lr > 0:
            raise UserError(f"trainer.lr must be > 0, got {self.lr!r}. Diffusion Policy uses 1e-4.")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(
                f"trainer.betas must be two numbers in [0, 1), got {list(self.betas)!r}; e.g. [0.9, 0.95]."
            )
        if self.weight_decay < 0 or self.encoder_weight_decay < 0:
            raise UserError(
                f"Weight decays must be >= 0, got weight_decay={self.weight_decay!r}, "
                f"encoder_weight_decay={self.encoder_weight_decay!r}."
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"trainer.grad_clip must be > 0 or null (no clipping), got {self.grad_clip!r}.")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UserError(
                f"trainer.threads must be an int >= 1 or null (torch's default), got {self.threads!r}."
            )
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise UserError(
                f"trainer.keep_last must be an int >= 1 or null (keep all), got {self.keep_last!r}."
            )
        if isinstance(self.ema, Mapping):
            self.ema = EMAConfig(**self.ema)
        choose("trainer.data_on_device", self.data_on_device, ("auto", "on", "off"))
        choose("trainer.compile", self.compile, COMPILE_MODES)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise UserError(f"trainer.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got '{self.device}'.")


@dataclass
class CheckpointContent:
    """What a run's checkpoints carry besides weights: ``kind`` (meta.json), the model's config
    (config.yaml; a mapping or a dataclass) and the normaliser (normalizer.json)."""

    kind: str
    config: Any
    normalizer: Mapping[str, Any]


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    interrupted: bool  # stopped by Ctrl-C / SIGTERM before `steps`
    model: nn.Module  # raw weights, unwrapped from DDP
    ema_model: nn.Module | None  # the EMA copy (eval mode), None when EMA is off
    checkpoint: Path | None  # the last checkpoint written (rank 0), None on other ranks
    metrics: dict[str, float]  # last values: loss, val_loss, samples_per_s, eval/*
    elapsed_s: float


# ---------------------------------------------------------------------------- schedule, data order, state


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear 0 -> 1 over ``warmup_steps``, then cosine 1 -> ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel for float32


def make_adamw(params: Any, device: torch.device, **hyperparameters: Any) -> torch.optim.AdamW:
    """AdamW, fused into one kernel over all parameters where torch has one for ``device``.

    The optimizer step of these small networks is mostly per-tensor overhead: over the DP-T's
    94 tensors the fused step takes 1.3 ms on this CPU against 5.8 ms for the default loop
    (1.14x per training step at batch 8, nothing measurable at batch 256, where the step is
    arithmetic: `dreamrt bench training`), and on a GPU it launches a handful of kernels
    instead of a few per tensor. Results agree with the default to rounding, not bit for bit.
    """
    fused = True if device.type in FUSED_ADAMW_DEVICES else None
    return torch.optim.AdamW(params, fused=fused, **hyperparameters)


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """``model`` under ``torch.compile`` in ``mode`` (one of COMPILE_MODES; "off" returns it as is)."""
    choose("compile mode", mode, COMPILE_MODES)
    if mode == "off":
        return model
    # Static shapes: a training run has one batch size (the sampler drops incomplete batches),
    # and CUDA graphs need them anyway.
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def _mix(*values: int) -> int:
    """A 64-bit seed from integers (NumPy's SeedSequence hashing)."""
    a, b = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(a) << 32) | int(b)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed every global generator for one training step."""
    s = _mix(seed, rank, step)
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    torch.manual_seed(s)


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches of indices: epoch e is a permutation seeded by (seed, e), sharded over ranks.

    Rank r takes every ``world_size``-th index of the permutation (all ranks the same count),
    in batches of ``batch_size``; the last incomplete batch of an epoch is dropped. Iteration
    starts after ``start_batch`` batches (counted over all epochs), which is how a resumed
    run picks up exactly where the saved one stopped.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.batches_per_epoch = (num_items // world_size) // batch_size
        if self.batches_per_epoch < 1:
            raise UserError(
                f"The training set has {num_items} windows: too few for one batch of {batch_size} per process on "
                f"{world_size} process(es). Lower trainer.batch_size or record more episodes."
            )

    def _epoch_tensor(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch) & 0x7FFF_FFFF_FFFF_FFFF)
        perm = torch.randperm(self.num_items, generator=g)
        shard = perm[self.rank :: self.world_size][: self.num_items // self.world_size]
        return shard[: self.batches_per_epoch * self.batch_size].view(self.batches_per_epoch, self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return self._epoch_tensor(epoch).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def index_tensors(self, device: torch.device) -> Iterator[torch.Tensor]:
        """The same batches as iteration, as index tensors already on ``device`` (one copy per epoch)."""
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            yield from self._epoch_tensor(epoch)[offset:].to(device)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch  # per epoch; iteration itself never ends


class LoopState:
    """The checkpoint's scheduler slot: the LR schedule's state and, with EMA, the raw weights.

    With EMA on, ``model.safetensors`` holds the EMA weights, so the weights the optimizer
    updates travel here (as tensors in ``training_state/tensors.safetensors``).
    """

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler, raw_model: nn.Module | None):
        self.scheduler = scheduler
        self.raw_model = raw_model

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr_schedule": self.scheduler.state_dict(),
            "raw_weights": dict(self.raw_model.state_dict()) if self.raw_model is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"lr_schedule", "raw_weights"}:
            raise ValueError(f"expected keys lr_schedule, raw_weights, got {sorted(state)}")
        if (state["raw_weights"] is None) != (self.raw_model is None):
            raise ValueError(
                "the checkpoint was saved with EMA "
                + ("off" if state["raw_weights"] is None else "on")
                + " but this run has it "
                + ("on" if self.raw_model is not None else "off")
                + "; set trainer.ema.enabled as in the saved run"
            )
        self.scheduler.load_state_dict(state["lr_schedule"])
        if self.raw_model is not None:
            self.raw_model.load_state_dict(state["raw_weights"], strict=True)


# ---------------------------------------------------------------------------- metrics


class MetricsLog:
    """One row per logged step in ``metrics.csv`` (columns grow as new metrics appear)."""

    def __init__(self, path: Path, rows: list[dict[str, float]] | None = None):
        self.path = path
        self.rows: list[dict[str, float]] = rows or []

    @classmethod
    def resume(cls, path: Path, source: Path | None, up_to_step: int) -> MetricsLog:
        """Rows of ``source`` (an earlier run's metrics.csv) up to ``up_to_step``; later ones belong to an abandoned branch."""
        rows: list[dict[str, float]] = []
        if source is not None and source.is_file():
            with source.open(newline="") as f:
                for raw in csv.DictReader(f):
                    row = {k: float(v) for k, v in raw.items() if v not in ("", None)}
                    if row.get("step", math.inf) <= up_to_step:
                        rows.append(row)
        return cls(path, rows)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if self.rows and self.rows[-1].get("step") == step:
            self.rows[-1].update(values)
        else:
            self.rows.append({"step": float(step), **values})

    def columns(self) -> list[str]:
        cols: dict[str, None] = {"step": None}
        for row in self.rows:
            cols.update(dict.fromkeys(row))
        return list(cols)

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        cols = self.columns()
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: (int(v) if k == "step" else f"{v:.6g}") for k, v in row.items()})
        os.replace(tmp, self.path)

    def plot(self, path: Path) -> None:
        """curves.png: training/validation loss, learning rate, and any eval/* metrics."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        evals = [c for c in self.columns() if c.startswith("eval/")]
        panels = 2 + (1 if evals else 0)
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
        ax = axes[0][0]
        for key, label in (("loss", "train"), ("val_loss", "validation")):
            xs, ys = self._series(key)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if key == "val_loss" else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if any(v > 0 for _, v in zip(*self._series("loss"))):
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
        ax = axes[0][1]
        ax.plot(*self._series("lr"))
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        if evals:
            ax = axes[0][2]
            for key in evals:
                ax.plot(*self._series(key), marker="o", markersize=3, label=key[len("eval/") :])
            ax.set_xlabel("step")
            ax.set_ylabel("evaluation")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.subplots_adjust(left=0.1, right=0.98, bottom=0.15, top=0.95, wspace=0.3)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, path)

    def _series(self, key: str) -> tuple[list[float], list[float]]:
        pairs = [(r["step"], r[key]) for r in self.rows if key in r and math.isfinite(r[key])]
        return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------------------- distributed, signals


@dataclass
class _Dist:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"trainer.device is '{name}' but CUDA is not available here. Use device=cpu or auto."
            )
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device("cpu")


def _setup_distributed(cfg: TrainerConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(0, 1, _resolve_device(cfg.device, 0), False)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(cfg.device, local_rank)
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), device, owns)


class _StopFlag:
    """SIGINT / SIGTERM -> finish the step, save, stop. A second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _leave_the_process_group(worker_id: int) -> None:
    # Ctrl-C, and the SIGTERM of `timeout` or a batch scheduler, go to the whole process group.
    # A worker killed by one crashes the loop before it can save, so workers move to a group of
    # their own: the stop request reaches the main process alone, which finishes its step,
    # saves and shuts them down. The DataLoader's own terminate() (a signal to the worker's pid)
    # still reaches them, and they exit by themselves when the main process dies.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


DEVICE_DATA_AUTO_BYTES = 2 << 30  # "auto" holds a dataset on the training device up to this size


def _device_windows(data: Any, cfg: TrainerConfig, device: torch.device, share: Any = None) -> Any:
    """``data.device_windows(device)`` when cfg.data_on_device allows it and the dataset offers it;
    ``share`` (the training split's windows) lends its device arrays to the validation split."""
    if data is None or cfg.data_on_device == "off":
        return None
    gather = getattr(data, "device_windows", None)
    limit = DEVICE_DATA_AUTO_BYTES if cfg.data_on_device == "auto" else None
    windows = gather(device, max_bytes=limit, share=share) if gather is not None else None
    if windows is None and cfg.data_on_device == "on":
        raise UserError(
            f"trainer.data_on_device=on, but this dataset ({type(data).__name__}) cannot be gathered on the "
            "device: only stores whose training keys are all low-dim and cached in memory can. Use "
            "trainer.data_on_device=auto or off."
        )
    return windows


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------- the loop


def fit(
    model: nn.Module,
    train_data: torch.utils.data.Dataset,
    cfg: TrainerConfig,
    run_dir: str | os.PathLike[str],
    *,
    checkpoint: CheckpointContent,
    val_data: torch.utils.data.Dataset | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    resume: str | os.PathLike[str] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> TrainResult:
    """Train ``model`` (``model(batch) -> scalar loss``) for ``cfg.steps`` optimizer steps.

    ``param_groups`` are AdamW groups over ``model``'s parameters (default: all of them with
    ``cfg.weight_decay``). ``evaluate(eval_model) -> {name: value}`` is called every
    ``cfg.eval_every`` steps with the EMA model (or the raw one without EMA) and its values
    are logged as ``eval/<name>``. ``resume`` is a run directory or checkpoint to continue.
    """
    run_dir = Path(run_dir)
    dist_info = _setup_distributed(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    tf32_flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if dist_info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    try:
        return _fit(
            model,
            train_data,
            cfg,
            run_dir,
            dist_info,
            checkpoint,
            val_data,
            param_groups,
            evaluate,
            resume,
            collate_fn,
        )
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_flags
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _fit(
    model: nn.Module,
    train_data: torch.utils.data.Dataset,
    cfg: TrainerConfig,
    run_dir: Path,
    d: _Dist,
    content: CheckpointContent,
    val_data: torch.utils.data.Dataset | None,
    param_groups: list[dict[str, Any]] | None,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None,
    resume: str | os.PathLike[str] | None,
    collate_fn: Callable[[list[Any]], Any] | None,
) -> TrainResult:
    from tqdm.auto import tqdm

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model.to(d.device)
    groups = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
    optimizer = make_adamw(
        groups,
        d.device,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    schedule = partial(
        warmup_cosine, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = EMA(model, cfg.ema) if cfg.ema.enabled else None
    loop_state = LoopState(scheduler, model if ema is not None else None)

    step, batches_seen = 0, 0
    metrics_source: Path | None = run_dir / METRICS_FILE
    last_saved: Path | None = None
    if resume is not None:
        last_saved, batches_seen = _resume(
            resume, model, ema, optimizer, loop_state, content, cfg, d, len(train_data)
        )
        step = ck.read_meta(last_saved).step
        metrics_source = (
            last_saved.parent.parent / METRICS_FILE
        )  # <run>/checkpoints/step_X -> <run>/metrics.csv
    elif ck.latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"{run_dir} already holds the checkpoints of a run ({ck.latest_checkpoint(run_dir).name}). Continue it "
            f"with resume={run_dir}, or write the new run to another directory."
        )
    metrics = MetricsLog.resume(run_dir / METRICS_FILE, metrics_source, step)

    train_model: nn.Module = model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers are constants (masks, normaliser, instruction table): no need to broadcast them per step.
        train_model = DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None, broadcast_buffers=False
        )
    train_model = compiled(train_model, cfg.compile)

    batch_sampler = EpochBatchSampler(
        len(train_data), cfg.batch_size, cfg.seed, d.rank, d.world_size, batches_seen
    )
    device_windows = _device_windows(train_data, cfg, d.device)
    val_windows = _device_windows(val_data, cfg, d.device, share=device_windows) if d.main else None
    if device_windows is not None:
        batches = map(device_windows.batch, batch_sampler.index_tensors(d.device))
    else:
        loader = torch.utils.data.DataLoader(
            train_data,
            batch_sampler=batch_sampler,
            num_workers=cfg.num_workers,
            pin_memory=d.device.type == "cuda",
            collate_fn=collate_fn,
            # Its own generator: creating the iterator must not draw from the global RNG.
            generator=torch.Generator().manual_seed(_mix(cfg.seed, d.rank, step) & 0x7FFF_FFFF_FFFF_FFFF),
            persistent_workers=False,
            worker_init_fn=_leave_the_process_group if cfg.num_workers else None,
        )
        batches = iter(loader)
    eval_model = ema.model if ema is not None else model
    params = [p for g in optimizer.param_groups for p in g["params"]]
    last: dict[str, float] = {}
    saved_step = step if resume is not None else -1
    interrupted = False
    start_time = time.perf_counter()
    start_step = step

    def save(at_step: int) -> None:
        nonlocal last_saved, saved_step
        if d.main:
            state = ck.capture_training_state(
                optimizer,
                loop_state,
                counters={
                    "batches_seen": batches_seen,
                    "ema_updates": ema.num_updates if ema is not None else 0,
                    "dataset_len": len(train_data),
                    "batch_size": cfg.batch_size,
                    "world_size": d.world_size,
                    "seed": cfg.seed,
                },
            )
            last_saved = ck.write_run_checkpoint(
                run_dir,
                model_state=(ema.model if ema is not None else model).state_dict(),
                config=content.config,
                normalizer=content.normalizer,
                step=at_step,
                kind=content.kind,
                training_state=state,
                keep_last=cfg.keep_last,
            )
            metrics.write()
            if cfg.plot:
                metrics.plot(run_dir / CURVES_FILE)
        saved_step = at_step

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not (cfg.progress and d.main),
        dynamic_ncols=True,
        desc="train",
        unit="step",
    )
    window_loss = torch.zeros((), device=d.device)
    window_steps, window_start = 0, time.perf_counter()
    try:
        with _StopFlag() as stop:
            while step < cfg.steps:
                batch = _to_device(next(batches), d.device)
                seed_step(cfg.seed, d.rank, step)
                loss, grad_norm = train_step(
                    train_model, batch, optimizer, scheduler, params, cfg.grad_clip, ema, model
                )
                step += 1
                batches_seen += 1
                window_loss += loss.detach()
                window_steps += 1
                bar.update(1)

                if step % cfg.log_every == 0 or step == cfg.steps:
                    values = _window_metrics(
                        window_loss, window_steps, window_start, cfg, d, grad_norm, scheduler
                    )
                    if not math.isfinite(values["loss"]):
                        raise UserError(
                            f"The training loss became {values['loss']} by step {step}. Lower trainer.lr "
                            f"(now {cfg.lr}), keep trainer.grad_clip on, and check the data for outliers."
                        )
                    last.update(values)
                    if d.main:
                        metrics.log(step, values)
                        bar.set_postfix(
                            loss=f"{values['loss']:.4f}", samples_s=f"{values['samples_per_s']:.0f}"
                        )
                    window_loss.zero_()
                    window_steps, window_start = 0, time.perf_counter()

                main_work = False
                if val_data is not None and cfg.val_every and step % cfg.val_every == 0:
                    main_work = True
                    if d.main:
                        last["val_loss"] = validation_loss(
                            eval_model, val_data, cfg, d.device, collate_fn, val_windows
                        )
                        metrics.log(step, {"val_loss": last["val_loss"]})
                        metrics.write()
                if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    main_work = True
                    if d.main:
                        results = _run_evaluate(evaluate, eval_model, cfg.seed)
                        last.update(results)
                        metrics.log(step, results)
                        metrics.write()
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    main_work = True
                    save(step)
                if main_work and d.world_size > 1:
                    torch.distributed.barrier()
                if _agree_to_stop(stop.requested, d):
                    interrupted = step < cfg.steps
                    break
            if saved_step != step:
                save(step)
            if d.world_size > 1:
                torch.distributed.barrier()
    finally:
        bar.close()
    if d.main:
        metrics.write()
        if interrupted:
            print(
                f"Interrupted at step {step}: saved {last_saved}. Resume with resume={run_dir}.",
                file=sys.stderr,
            )
    elapsed = time.perf_counter() - start_time
    if step > start_step:
        last.setdefault("samples_per_s", (step - start_step) * cfg.batch_size * d.world_size / elapsed)
    return TrainResult(
        step=step,
        interrupted=interrupted,
        model=model,
        ema_model=ema.model if ema is not None else None,
        checkpoint=last_saved,
        metrics=last,
        elapsed_s=elapsed,
    )


def train_step(
    train_model: nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.Tensor],
    grad_clip: float | None,
    ema: EMA | None,
    model: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on ``batch``; returns (loss, gradient norm before clipping or None).

    ``train_model`` computes the loss (``model``, its DDP wrapper, either under
    ``torch.compile``); ``ema`` averages the unwrapped ``model``. Nothing here waits for the device, so a GPU runs behind the host.
    """
    train_model.train()
    loss = train_model(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip is not None else None
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update(model)
    return loss, grad_norm


def _window_metrics(
    window_loss: torch.Tensor,
    window_steps: int,
    window_start: float,
    cfg: TrainerConfig,
    d: _Dist,
    grad_norm: torch.Tensor | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, float]:
    loss = window_loss / max(1, window_steps)
    if d.world_size > 1:
        torch.distributed.all_reduce(loss)
        loss = loss / d.world_size
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    values = {
        "loss": float(loss),
        "lr": float(scheduler.get_last_lr()[0]),
        "samples_per_s": window_steps * cfg.batch_size * d.world_size / elapsed,
    }
    if grad_norm is not None:
        values["grad_norm"] = float(grad_norm)
    return values


def _agree_to_stop(requested: bool, d: _Dist) -> bool:
    if d.world_size == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=d.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    data: torch.utils.data.Dataset,
    cfg: TrainerConfig,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device_windows: Any = None,
) -> float:
    """Mean loss over the first ``cfg.val_batches`` batches of ``data`` (in order), in eval mode, fixed noise.

    ``device_windows`` (``data.device_windows(device)``) gathers the same batches on the device."""
    if device_windows is not None:
        order = torch.arange(len(data), device=device)
        loader = (
            device_windows.batch(order[i : i + cfg.batch_size]) for i in range(0, len(data), cfg.batch_size)
        )
    else:
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=cfg.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=0,
            collate_fn=collate_fn,
            # Its own generator: the loader must not draw from the global RNG, whose draws are the
            # validation noise (the same whichever way the batches are made).
            generator=torch.Generator(),
        )
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(VAL_SEED)
            for i, batch in enumerate(loader):
                if i >= cfg.val_batches:
                    break
                batch = _to_device(batch, device)
                n = len(next(iter(batch.values()))) if isinstance(batch, Mapping) else 1
                total += float(model(batch)) * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise UserError(
            "The validation set has no windows. Raise dataset.val_ratio or set trainer.val_every=0."
        )
    return total / count


def _run_evaluate(
    evaluate: Callable[[nn.Module], Mapping[str, float]], model: nn.Module, seed: int
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            results = evaluate(model)
    finally:
        model.train(was_training)
    if not isinstance(results, Mapping):
        raise UserError(
            f"The evaluate hook must return a mapping of metric names to numbers, got {type(results).__name__}."
        )
    out = {}
    for key, value in results.items():
        try:
            out[f"eval/{key}"] = float(value)
        except (TypeError, ValueError):
            warnings.warn(
                f"evaluate() returned a non-numeric '{key}' ({value!r:.40}); it is not logged.", stacklevel=2
            )
    return out


def _resume(
    resume: str | os.PathLike[str],
    model: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    loop_state: LoopState,
    content: CheckpointContent,
    cfg: TrainerConfig,
    d: _Dist,
    dataset_len: int,
) -> tuple[Path, int]:
    """Load weights, EMA, optimizer, LR schedule and the data position; return (checkpoint, batches_seen)."""
    ckpt = ck.load_checkpoint(resume, kind=content.kind)
    saved, now = ckpt.config, _plain_config(content.config)
    if saved != now:
        diffs = sorted(_diff_keys(saved, now))
        raise UserError(
            f"Cannot resume from {ckpt.path}: the model config differs from the saved one at {diffs[:8]}. Resume with "
            "the same model settings (the saved values are in its config.yaml), or start a new run."
        )
    state = ck.load_training_state(ckpt.path)
    if ema is not None:
        ema.load_state_dict(ckpt.model_state, int(state.counters.get("ema_updates", 0)))
    else:
        ck.load_into(model, ckpt)
    ck.restore_training_state(state, optimizer, loop_state)
    counters = state.counters
    changed = [
        f"{name} {counters.get(name)} -> {value}"
        for name, value in (
            ("dataset_len", dataset_len),
            ("batch_size", cfg.batch_size),
            ("world_size", d.world_size),
            ("seed", cfg.seed),
        )
        if counters.get(name) != value
    ]
    if changed and d.main:
        warnings.warn(
            f"Resuming {ckpt.path} with {', '.join(changed)}: training continues, but the data order is no longer "
            "the one the saved run would have followed.",
            stacklevel=3,
        )
    return ckpt.path, int(counters.get("batches_seen", ckpt.step))


def _plain_config(config: Any) -> Any:
    """The config as load_checkpoint returns it (dataclass -> dict, tuples -> lists) for comparison."""
    import dataclasses

    import yaml

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return yaml.safe_load(yaml.safe_dump(_lists(config)))


def _lists(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
