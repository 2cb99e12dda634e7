"""`dreamrt bench world-model`: latency per generated frame at batch 1, and FLOPs per frame.

For each sampler step count, a randomly initialised model (latency does not depend on the
weights) is prefilled with a full window of context and then generates ``frames`` frames
with :class:`~dreamrt.world_models.sampling.Rollout` (cached, eager torch); the tokenizer's
decoder turns each into pixels. Reported per setting: median and p90 milliseconds per frame
(and the 10th percentile, closer to an undisturbed machine when cores are shared) for the
dynamics alone and with decoding, the frames per second of the median, a reference linear
layer's GFLOP/s measured in the same run (to scale the figures to another load), and the analytic
FLOPs per frame (linear layers and attention matmuls; see ``dynamics.flops_per_pass``).

The FLOP count is for the keys a frame may see (its window). A pass with a mask computes
scores over every cache slot, which the count leaves out (a few per cent with the default
sizes).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult


@dataclass
class BenchWorldModelConfig:
    preset: str = "small"  # dynamics size preset (dreamrt.world_models.dynamics.PRESETS)
    tokenizer_preset: str = "small"
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # sampler steps to measure
    kv_write: str = "fused"
    frames: int = 40  # generated frames timed per setting
    warmup: int = 5
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    speculate: int = 0  # > 0: also time speculate(k) + accept(k), per generated frame
    action_dim: int = 7
    state_dim: int = 15
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            not self.steps
            or any(s < 1 for s in self.steps)
            or self.frames < 1
            or self.warmup < 0
            or self.speculate < 0
        ):
            raise UserError(
                f"bench needs steps >= 1 each, frames >= 1 and warmup >= 0; got steps={self.steps}, "
                f"frames={self.frames}, warmup={self.warmup}."
            )


def frame_flops(config, steps: int, kv_write: str) -> int:
    """Analytic FLOPs to generate one frame with a full window (fused: the previous frame rides in pass 1)."""
    from dreamrt.world_models.dynamics import flops_per_pass

    one = flops_per_pass(config, 1, config.window)
    if kv_write == "fused":
        return flops_per_pass(config, 2, config.window) + (steps - 1) * one
    return (steps + 1) * one


def run(cfg: BenchWorldModelConfig, out_dir: Path | None = None) -> JobResult:
    import torch

    from dreamrt.world_models.dynamics import NextFrameDiT, preset
    from dreamrt.world_models.sampling import FrameSamplerConfig, Rollout
    from dreamrt.world_models.tokenizer import Tokenizer, decoder_flops
    from dreamrt.world_models.tokenizer import preset as tokenizer_preset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer(tokenizer_preset(cfg.tokenizer_preset)).eval()
    tc = tok.config
    dyn_cfg = preset(
        cfg.preset,
        action_dim=cfg.action_dim,
        state_dim=cfg.state_dim,
        latent_channels=tc.latent_channels,
        latent_size=tc.latent_size,
    )
    model = NextFrameDiT(dyn_cfg).eval()
    with torch.no_grad():  # random weights everywhere (adaLN-Zero would skip nothing, but be safe)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    context = torch.randn(1, dyn_cfg.window - 1, tc.latent_channels, tc.latent_size, tc.latent_size)
    actions = torch.randn(1, dyn_cfg.window - 1, cfg.action_dim)
    states = torch.randn(1, dyn_cfg.window - 1, cfg.state_dim)
    action, state = torch.randn(1, cfg.action_dim), torch.randn(1, cfg.state_dim)

    rows = []
    for steps in cfg.steps:
        rollout = Rollout(model, FrameSamplerConfig(steps=steps, kv_write=cfg.kv_write))
        rollout.prefill(context, actions, states)
        dyn_ms, total_ms = [], []
        with torch.inference_mode():
            for i in range(cfg.warmup + cfg.frames):
                t0 = time.perf_counter()
                z = rollout.step(action, state)
                t1 = time.perf_counter()
                tok.decode(z)
                t2 = time.perf_counter()
                if i >= cfg.warmup:
                    dyn_ms.append((t1 - t0) * 1e3)
                    total_ms.append((t2 - t0) * 1e3)
        if cfg.speculate:
            spec_ms = []
            with torch.inference_mode():
                for i in range(cfg.warmup + max(1, cfg.frames // cfg.speculate)):
                    rollout = _fresh(rollout, model, steps, cfg, context, actions, states)
                    t0 = time.perf_counter()
                    rollout.speculate(cfg.speculate, action, state)
                    rollout.accept(cfg.speculate)
                    if i >= cfg.warmup:
                        spec_ms.append((time.perf_counter() - t0) * 1e3 / cfg.speculate)
        med_total = statistics.median(total_ms)
        rows.append(
            {
                "steps": steps,
                "dynamics_ms": statistics.median(dyn_ms),
                "dynamics_p90_ms": _quantile(dyn_ms, 0.9),
                "dynamics_p10_ms": _quantile(dyn_ms, 0.1),
                "decode_ms": statistics.median(t - d for t, d in zip(total_ms, dyn_ms)),
                "frame_ms": med_total,
                "frame_p10_ms": _quantile(total_ms, 0.1),
                "fps": 1e3 / med_total,
                "dynamics_gflop": frame_flops(dyn_cfg, steps, cfg.kv_write) / 1e9,
                "decode_gflop": decoder_flops(tc) / 1e9,
                **({"speculate_ms_per_frame": statistics.median(spec_ms)} if cfg.speculate else {}),
            }
        )
    summary = {
        "preset": cfg.preset,
        "parameters": model.num_parameters(),
        "tokenizer_parameters": tok.num_parameters(),
        "tokens_per_frame": dyn_cfg.tokens_per_frame,
        "window": dyn_cfg.window,
        "kv_write": cfg.kv_write,
        "threads": torch.get_num_threads(),
        "reference_gflops": reference_gflops(),
        "speculate": cfg.speculate,
        "rows": rows,
    }
    print(format_table(summary))
    return JobResult(summary=summary)


def _fresh(rollout, model, steps, cfg, context, actions, states):
    """A rollout with room to speculate, prefilled with the context."""
    from dreamrt.world_models.sampling import FrameSamplerConfig, Rollout

    if rollout.max_speculation < cfg.speculate:
        rollout = Rollout(
            model, FrameSamplerConfig(steps=steps, kv_write=cfg.kv_write), max_speculation=cfg.speculate
        )
    rollout.prefill(context, actions, states)
    return rollout


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def reference_gflops(repeats: int = 300) -> float:
    """fp32 GFLOP/s of a (64 x 128) @ (128 x 512) linear, the typical shape here (p10 of the times),
    to put the latencies of a shared machine in context."""
    import torch

    x, w = torch.randn(64, 128), torch.randn(512, 128)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
    return 2 * 64 * 128 * 512 / _quantile(times, 0.1) / 1e9


def format_table(summary: dict) -> str:
    lines = [
        f"world model '{summary['preset']}' ({summary['parameters'] / 1e6:.2f}M params, "
        f"{summary['tokens_per_frame']} tokens/frame, window {summary['window']}, kv_write={summary['kv_write']}, "
        f"{summary['threads']} thread(s), reference linear {summary['reference_gflops']:.0f} GFLOP/s), batch 1",
        f"{'steps':>5} {'dyn ms':>8} {'p10':>7} {'p90':>7} {'decode':>7} {'frame ms':>9} {'p10':>7} {'FPS':>6} "
        f"{'dyn GFLOP':>10}" + (f" {'spec/frame':>10}" if summary["speculate"] else ""),
    ]
    for r in summary["rows"]:
        lines.append(
            f"{r['steps']:>5} {r['dynamics_ms']:>8.1f} {r['dynamics_p10_ms']:>7.1f} {r['dynamics_p90_ms']:>7.1f} "
            f"{r['decode_ms']:>7.1f} {r['frame_ms']:>9.1f} {r['frame_p10_ms']:>7.1f} {r['fps']:>6.1f} "
            f"{r['dynamics_gflop']:>10.3f}"
            + (f" {r['speculate_ms_per_frame']:>10.1f}" if "speculate_ms_per_frame" in r else "")
        )
    return "\n".join(lines)
