"""`dreamrt export onnx`: export a DP-T policy checkpoint's encoder and denoiser step for ONNX Runtime.

    dreamrt export onnx policy.path=CKPT [out=DIR] [opset=17] [blocks=true] [tolerance=1e-4]

Writes ``CKPT/onnx/`` (or ``out``): ``encoder.onnx``, ``denoiser.onnx`` (one network
evaluation, the timestep an input), ``blocks/`` (the sub-block graphs BAC caching runs on
under onnxruntime; ``blocks=false`` skips them), ``normalizer.json`` and ``manifest.json``
(inputs and shapes, opset, versions, weights' sha256, and each graph's max abs error
against torch measured during the export). See :mod:`dreamrt.runtime.onnx_backend` and
docs/onnx.md. ``policy.backend=onnxruntime`` in any job exports on first use; this command
does it ahead of time (e.g. on a build machine) and always writes a fresh export.

Exit code 1 when the measured error exceeds ``tolerance``: the export is written anyway, so
it can be inspected, but ``backend=onnxruntime`` would refuse it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult

MISSING = "???"  # OmegaConf's marker for a required value


@dataclass
class ExportPolicySection:
    path: str = MISSING  # a dpt_policy checkpoint directory, or a run directory (its newest checkpoint)


@dataclass
class ExportConfig:
    policy: ExportPolicySection = field(default_factory=ExportPolicySection)
    out: str | None = None  # the export directory; null: <checkpoint>/onnx, where backend=onnxruntime looks
    opset: int = 17
    blocks: bool = True  # also export the per-sub-block graphs (BAC caching under onnxruntime)
    tolerance: float = 1e-4  # exit 1 when any graph differs from torch by more than this

    def __post_init__(self) -> None:
        if not self.policy.path or self.policy.path == MISSING:
            raise UserError("`dreamrt export onnx` needs a checkpoint: pass policy.path=CKPT.")
        if not isinstance(self.opset, int) or not 14 <= self.opset <= 21:
            raise UserError(f"opset={self.opset!r}; expected an int in 14..21 (17 is tested).")
        if not self.tolerance > 0:
            raise UserError(f"tolerance={self.tolerance!r}; expected a positive float such as 1e-4.")


def run(cfg: ExportConfig, out_dir: Path | None = None) -> JobResult:
    from dreamrt.policies.diffusion_policy import POLICY_KIND, load_diffusion_policy
    from dreamrt.runtime.onnx_backend import ONNX_DIR, export_policy
    from dreamrt.training.checkpoint import read_meta, resolve_checkpoint

    checkpoint = resolve_checkpoint(cfg.policy.path)
    kind = read_meta(checkpoint).kind
    if kind != POLICY_KIND:
        raise UserError(
            f"{checkpoint} holds a '{kind}'; `dreamrt export onnx` exports DP-T policies ({POLICY_KIND})."
        )
    target = Path(cfg.out) if cfg.out else checkpoint / ONNX_DIR
    start = time.perf_counter()
    policy = load_diffusion_policy(checkpoint)
    manifest = export_policy(policy, target, checkpoint=checkpoint, opset=cfg.opset, blocks=cfg.blocks)
    graphs = {name: g["max_abs_error"] for name, g in manifest["graphs"].items()}
    if manifest["blocks"]:
        graphs["blocks"] = manifest["blocks"]["max_abs_error"]
    summary: dict[str, Any] = {
        "onnx_dir": str(target),
        "checkpoint": str(checkpoint),
        "files": sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()),
        "opset": cfg.opset,
        "max_abs_error": manifest["max_abs_error"],
        "max_abs_error_per_graph": graphs,
        "tolerance": cfg.tolerance,
        "within_tolerance": manifest["max_abs_error"] <= cfg.tolerance,
        "encoder_inputs": manifest["graphs"]["encoder"]["inputs"],
        "denoiser_inputs": manifest["graphs"]["denoiser"]["inputs"],
        "wall_s": round(time.perf_counter() - start, 3),
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    return JobResult(summary=summary, exit_code=0 if summary["within_tolerance"] else 1)


def format_summary(summary: dict[str, Any]) -> str:
    shapes = "; ".join(f"{i['name']} {i['shape']}" for i in summary["denoiser_inputs"])
    lines = [
        f"ONNX export of {summary['checkpoint']} -> {summary['onnx_dir']} (opset {summary['opset']}, "
        f"{len(summary['files'])} files, {summary['wall_s']:.1f} s)",
        f"  denoiser step inputs: {shapes}",
        "  max abs error vs torch: "
        + ", ".join(f"{k} {v:.2g}" for k, v in summary["max_abs_error_per_graph"].items()),
    ]
    if not summary["within_tolerance"]:
        lines.append(
            f"  ERROR: {summary['max_abs_error']:.3g} exceeds tolerance {summary['tolerance']:.3g}; "
            "backend=onnxruntime will refuse this export"
        )
    return "\n".join(lines)
