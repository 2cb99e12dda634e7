"""`dreamrt bench training`: what one DP-T training step costs, per network, batch size and optimizer.

    dreamrt bench training [policy_model=state_relative] [networks=[4x128,4x256]] [batch_sizes=[8,256]]
        [optimizers=[default,fused]] [compile_modes=[off]] [device=auto] [threads=1] [steps=20]
        [warmup=5] [rounds=3] [--json PATH]

What it answers: how many optimizer steps a second `dreamrt train` takes for a given network
and batch on this machine, and what the fused AdamW the trainer uses
(:func:`dreamrt.training.trainer.make_adamw`) saves against torch's default. A lent GPU is
held for minutes, and a step of these small networks there is mostly host time (launching
kernels one by one), not arithmetic, so the number of steps a lease buys depends on the
network and the optimizer more than the FLOPs suggest; this bench measures it in a minute.

The step is the trainer's own (:func:`dreamrt.training.trainer.train_step`: loss, backward,
gradient clipping at 1.0, AdamW, LR schedule, EMA) on a state policy built from
``policy_model`` (the same config group as `dreamrt train`) with the network's depth and width
set by each ``networks`` entry ``<layers>x<width>``. The batch is synthetic and fixed, already
on the device: low-dim observations uniform over the normaliser's range, random instruction
rows, random actions; so the figures leave out reading and gathering windows (with
``trainer.data_on_device`` that gather is one indexing op per key on the device).

Baseline: ``default`` is ``torch.optim.AdamW`` as torch builds it (a loop over the tensors on a
CPU, its multi-tensor ``foreach`` kernels on CUDA); ``fused`` is the single fused kernel.
``compile_modes`` adds rows with the loss computation under ``torch.compile`` as
``trainer.compile`` sets it (``reduce-overhead`` captures CUDA graphs on a GPU); each compiled
row's warm-up includes its compilation. ``speedup_vs_default`` divides the time per step of the
default optimizer without compilation by the row's, at the same network and batch size,
measured in the same run.

Timing: ``warmup`` untimed steps per row, then ``rounds`` rounds that visit every row in turn
(so drift in the machine's speed hits every row alike); each visit times ``steps``
consecutive steps and waits for the device once at their end, as the trainer never waits
inside a step. ``ms_per_step`` is the median over the rounds. On CUDA the run uses TF32 as the
trainer does by default.

Row fields: ``network``, ``batch_size``, ``optimizer``, ``compile``, ``params``, ``ms_per_step``,
``steps_per_s``, ``windows_per_s``, ``speedup_vs_default``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult
from dreamrt.training.train_policy import PolicyModelConfig
from dreamrt.training.trainer import COMPILE_MODES

OPTIMIZERS = ("default", "fused")
NUM_INSTRUCTIONS = 34  # one per CALVIN-style task: the size of the instruction table does not matter


@dataclass
class BenchTrainingConfig:
    policy_model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    networks: list[str] = field(default_factory=lambda: ["4x128", "4x256"])  # <layers>x<width>
    batch_sizes: list[int] = field(default_factory=lambda: [8, 256])
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    compile_modes: list[str] = field(default_factory=lambda: ["off"])  # trainer.compile values
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # torch intra-op threads (the trainer's trainer.threads)
    action_dim: int = 7
    steps: int = 20  # timed consecutive steps per visit of a row
    warmup: int = 5  # untimed steps per row before the first round
    rounds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("threads", "action_dim", "steps", "rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"bench training: {name} must be an integer >= 1, got {value!r}.")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UserError(f"bench training: warmup must be an integer >= 0, got {self.warmup!r}.")
        if not self.networks or not self.batch_sizes or not self.optimizers:
            raise UserError("bench training needs at least one network, batch size and optimizer.")
        for n in self.networks:
            parse_network(n)
        for b in self.batch_sizes:
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                raise UserError(f"bench training: batch sizes must be integers >= 1, got {b!r}.")
        for o in self.optimizers:
            choose("optimizer", o, OPTIMIZERS)
        for c in self.compile_modes:
            choose("compile mode", c, COMPILE_MODES)


def parse_network(text: str) -> tuple[int, int]:
    """'4x256' -> (4 layers, width 256)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"bench training: a network is <layers>x<width>, e.g. 4x128 or 8x256; got {text!r}.")
    return int(parts[0]), int(parts[1])


@dataclass
class _Row:
    network: str
    batch_size: int
    optimizer: str
    compile: str
    params: int
    step: Any  # () -> None: one training step
    times: list[float] = field(default_factory=list)  # seconds per step, one per visit


def _synthetic_batch(pm: PolicyModelConfig, action_dim: int, batch_size: int, device: Any, seed: int) -> dict:
    import torch

    from dreamrt.policies.diffusion_policy import TASK_INDEX_KEY

    g = torch.Generator().manual_seed(seed)
    batch = {
        key: torch.rand(batch_size, pm.n_obs_steps, dim, generator=g) * 2 - 1
        for key, dim in zip(pm.encoder.lowdim_keys, pm.encoder.lowdim_dims)
    }
    if pm.encoder.use_language:
        batch[TASK_INDEX_KEY] = torch.randint(0, NUM_INSTRUCTIONS, (batch_size, pm.n_obs_steps), generator=g)
    batch[pm.action_key] = torch.rand(batch_size, pm.horizon, action_dim, generator=g) * 2 - 1
    return {k: v.to(device) for k, v in batch.items()}


def _build_row(
    cfg: BenchTrainingConfig, network: str, batch_size: int, optimizer: str, compile_mode: str, device: Any
) -> _Row:
    import dataclasses

    import torch
    import torch.nn.functional as F

    from dreamrt.episodes.normalize import Normalizer
    from dreamrt.policies.language import EMBED_DIM
    from dreamrt.training.ema import EMA, EMAConfig
    from dreamrt.training.train_policy import build_policy
    from dreamrt.training.trainer import compiled, make_adamw, train_step

    layers, width = parse_network(network)
    pm = dataclasses.replace(cfg.policy_model, n_layer=layers, n_emb=width)
    enc = pm.encoder
    ranges = {k: {"min": [-1.0] * d, "max": [1.0] * d} for k, d in zip(enc.lowdim_keys, enc.lowdim_dims)}
    ranges[pm.action_key] = {"min": [-1.0] * cfg.action_dim, "max": [1.0] * cfg.action_dim}
    normalizer = Normalizer.from_stats(ranges, {k: "min_max" for k in ranges})
    instructions, table = [], None
    if enc.use_language:
        instructions = [f"task {i}" for i in range(NUM_INSTRUCTIONS)]
        table = F.normalize(
            torch.randn(NUM_INSTRUCTIONS, EMBED_DIM, generator=torch.Generator().manual_seed(1)), dim=-1
        )
    torch.manual_seed(cfg.seed)
    policy = build_policy(
        pm,
        normalizer,
        action_dim=cfg.action_dim,
        rate_hz=30.0,
        instructions=instructions,
        instruction_embeddings=table,
    ).to(device)
    groups = policy.optim_groups(1e-3, 1e-6)
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-3)
    opt = make_adamw(groups, device, **hyper) if optimizer == "fused" else torch.optim.AdamW(groups, **hyper)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    ema = EMA(policy, EMAConfig())
    params = [p for g in opt.param_groups for p in g["params"]]
    batch = _synthetic_batch(pm, cfg.action_dim, batch_size, device, cfg.seed)
    loss_model = compiled(policy, compile_mode)

    def step() -> None:
        train_step(loss_model, batch, opt, scheduler, params, 1.0, ema, policy)

    params_count = sum(p.numel() for p in policy.parameters())
    return _Row(network, batch_size, optimizer, compile_mode, params_count, step)


def _wait(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(cfg: BenchTrainingConfig, rows: list[_Row], device: Any) -> None:
    for row in rows:
        for _ in range(cfg.warmup):
            row.step()
    _wait(device)
    for _ in range(cfg.rounds):
        for row in rows:
            row.step()  # one untimed step after switching rows
            _wait(device)
            start = time.perf_counter()
            for _ in range(cfg.steps):
                row.step()
            _wait(device)
            row.times.append((time.perf_counter() - start) / cfg.steps)


def summarise_rows(rows: list[_Row]) -> list[dict[str, Any]]:
    default = {
        (r.network, r.batch_size): float(np.median(r.times))
        for r in rows
        if r.optimizer == "default" and r.compile == "off"
    }
    out = []
    for r in rows:
        per_step = float(np.median(r.times))
        base = default.get((r.network, r.batch_size))
        out.append(
            {
                "network": r.network,
                "batch_size": r.batch_size,
                "optimizer": r.optimizer,
                "compile": r.compile,
                "params": r.params,
                "ms_per_step": round(per_step * 1e3, 3),
                "steps_per_s": round(1.0 / per_step, 2),
                "windows_per_s": round(r.batch_size / per_step, 1),
                "speedup_vs_default": round(base / per_step, 3) if base is not None else None,
            }
        )
    return out


def run(cfg: BenchTrainingConfig, out_dir: Path | None = None) -> JobResult:
    import torch

    if cfg.policy_model.encoder.cameras:
        raise UserError(
            "bench training measures state policies: its synthetic batch has no images. Use a state "
            "policy_model (state_small, state_relative)."
        )
    name = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    name = "cpu" if name == "auto" else name
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"bench training: device={cfg.device} but CUDA is not available here. Use device=cpu."
        )
    device = torch.device(name)
    threads_before = torch.get_num_threads()
    tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    start = time.perf_counter()
    try:
        torch.set_num_threads(cfg.threads)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        rows = [
            _build_row(cfg, network, batch_size, optimizer, compile_mode, device)
            for network in cfg.networks
            for batch_size in cfg.batch_sizes
            for compile_mode in cfg.compile_modes
            for optimizer in cfg.optimizers
        ]
        time_rows(cfg, rows, device)
    finally:
        torch.set_num_threads(threads_before)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
    summary: dict[str, Any] = {
        "rows": summarise_rows(rows),
        "baseline": "torch.optim.AdamW with torch's default implementation, same network and batch, same run",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": cfg.threads,
        "policy_model": {
            "preset": cfg.policy_model.preset,
            "horizon": cfg.policy_model.horizon,
            "n_obs_steps": cfg.policy_model.n_obs_steps,
            "lowdim_keys": list(cfg.policy_model.encoder.lowdim_keys),
            "language": cfg.policy_model.encoder.use_language,
        },
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "rounds": cfg.rounds,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.perf_counter() - start, 3),
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(summary))
    return JobResult(summary=summary)


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        f"training step on {summary['device']}, {summary['threads']} thread(s)",
        f"{'network':>8} {'batch':>6} {'optimizer':>9} {'compile':>15} {'params':>9} {'ms/step':>9} {'steps/s':>8} "
        f"{'windows/s':>10} {'vs default':>10}",
    ]
    for r in summary["rows"]:
        ratio = f"{r['speedup_vs_default']:.2f}x" if r["speedup_vs_default"] is not None else "-"
        lines.append(
            f"{r['network']:>8} {r['batch_size']:>6} {r['optimizer']:>9} {r['compile']:>15} {r['params']:>9} "
            f"{r['ms_per_step']:>9.2f} "
            f"{r['steps_per_s']:>8.1f} {r['windows_per_s']:>10.0f} {ratio:>10}"
        )
    return "\n".join(lines)
