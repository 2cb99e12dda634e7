"""`dreamrt bench network`: one denoiser pass of dreamrt's DP-T against a reference-style baseline, same run.

    dreamrt bench network [preset=dp_reference] [action_dim=7] [obs_dim=103] [threads=[1,2]]
        [models=[baseline_nn_transformer,dreamrt_dpt]] [backends=[torch,onnxruntime]]
        [passes=300] [warmup=20] [rounds=5] [batch_size=1] [--json PATH]

What it answers: how fast is the network itself, apart from samplers, encoders and
policies. Issue #4 asks for a DP-T of diffusion_policy's size (8 x 256, horizon 16, To=2)
to run one denoiser pass at least 2x faster than diffusion_policy's own implementation.
That code cannot be brought here, so the yardstick is
:class:`dreamrt.policies.dpt_baseline.ReferenceDPT`: the same architecture built the way
diffusion_policy builds it, from stock ``nn.TransformerDecoder`` modules. Both models are
built from one :class:`~dreamrt.policies.dpt.DPTConfig` (the ``preset``, ``action_dim``,
``obs_dim``: same widths, depth, token counts, masks), and the baseline gets dreamrt's
weights (:func:`~dreamrt.policies.dpt_baseline.load_dpt_weights`), so every row computes
the same function; ``max_abs_diff`` shows it.

Rows: every ``models`` x ``backends`` x ``threads``. ``torch`` is eager torch in eval mode
under ``torch.inference_mode()`` with ``threads`` intra-op threads; ``onnxruntime`` is the
model traced to ONNX as ``dreamrt export onnx`` traces a denoiser step
(:mod:`dreamrt.runtime.onnx_backend`) and run by an onnxruntime CPU session with ``threads``
intra-op threads (torch at 1 thread, as the onnxruntime policy backend sets it). Inputs:
batch ``batch_size``, random noisy actions, one timestep, random observation features,
fixed before timing.

Timing: ``warmup`` untimed passes per row, then ``passes`` timed passes per row spread over
``rounds`` rounds that visit every row in turn (each visit starts with a few untimed passes
after switching the thread count), so drift in the machine's speed from other processes
hits every row alike. Each pass is timed alone with ``time.perf_counter``.

Row fields: ``model``, ``backend``, ``threads``, ``params``, ``ms_per_pass_p50``,
``ms_per_pass_p99``, ``ms_per_pass_mean``, ``speedup_vs_baseline`` (the p50 of
baseline_nn_transformer / torch at the same thread count, measured in this run, divided by
the row's p50), ``gflop_per_pass`` and ``gflops_achieved`` (FLOPs at the p50), and
``max_abs_diff`` (largest |output - dreamrt_dpt torch output| on the timed inputs).
FLOPs are counted analytically (:func:`matmul_flops`): 2 per multiply-add of every matmul
(linear layers, attention scores and attention-weighted values over the full, unmasked
score matrices, as the kernels compute them); normalisation, activations, softmax and
additions are left out (about 1% here).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult

if TYPE_CHECKING:
    from dreamrt.policies.dpt import DPTConfig

BASELINE = "baseline_nn_transformer"
DREAMRT = "dreamrt_dpt"
MODELS = (BASELINE, DREAMRT)
BACKENDS = ("torch", "onnxruntime")
ROUND_WARMUP = 3  # untimed passes at the start of every visit of a row (thread pools wake up)
# A state policy's per-step observation features: observation.state (15) +
# observation.environment_state (24) + the instruction projected to 64 (configs/policy_model/state_small.yaml).
STATE_OBS_DIM = 15 + 24 + 64
STATE_ACTION_DIM = 7


@dataclass
class BenchNetworkConfig:
    preset: str = "dp_reference"  # DP-T size preset (policies/dpt.py): dp_reference | small | tiny
    action_dim: int = STATE_ACTION_DIM
    obs_dim: int = STATE_OBS_DIM  # per-step observation features (the encoder's output width)
    models: list[str] = field(default_factory=lambda: [BASELINE, DREAMRT])
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    threads: list[int] = field(default_factory=lambda: [1, 2])
    batch_size: int = 1
    warmup: int = 20  # untimed passes per row before the first round
    passes: int = 300  # timed passes per row
    rounds: int = 5  # timed passes of a row are spread over this many visits
    opset: int = 17
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        from dreamrt.policies.dpt import PRESETS

        choose("DP-T size preset (preset)", self.preset, PRESETS)
        if not self.models or not self.backends or not self.threads:
            raise UserError(
                f"models={self.models}, backends={self.backends}, threads={self.threads}: each needs at least one "
                f"entry, e.g. models=[{BASELINE},{DREAMRT}] backends=[torch,onnxruntime] threads=[1]."
            )
        for model in self.models:
            choose("model (in models)", model, MODELS)
        for backend in self.backends:
            choose("backend (in backends)", backend, BACKENDS)
        if BASELINE not in self.models or "torch" not in self.backends:
            raise UserError(
                f"Every speedup is against {BASELINE} on torch measured in the same run, so models must list "
                f"{BASELINE} and backends must list torch; got models={self.models}, backends={self.backends}."
            )
        for name, value in (("models", self.models), ("backends", self.backends), ("threads", self.threads)):
            if len(set(value)) != len(value):
                raise UserError(f"{name}={value} lists an entry twice; list each once.")
        for t in self.threads:
            if not isinstance(t, int) or isinstance(t, bool) or t < 1:
                raise UserError(f"threads={self.threads}; expected positive ints, e.g. threads=[1,2].")
        for name in ("action_dim", "obs_dim", "batch_size", "passes", "rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}; expected a positive int.")
        if self.rounds > self.passes:
            raise UserError(
                f"rounds={self.rounds} > passes={self.passes}: every round needs at least one timed pass. "
                "Lower rounds or raise passes."
            )
        if self.warmup < 0 or self.seed < 0:
            raise UserError(f"warmup={self.warmup}, seed={self.seed}; expected ints >= 0.")
        if not isinstance(self.opset, int) or not 14 <= self.opset <= 21:
            raise UserError(f"opset={self.opset!r}; expected an int in 14..21 (17 is tested).")

    def model_config(self) -> DPTConfig:
        from dreamrt.policies.dpt import preset

        return preset(self.preset, action_dim=self.action_dim, obs_dim=self.obs_dim)


# ---------------------------------------------------------------------------- FLOPs


def matmul_flops(config: DPTConfig, batch_size: int = 1) -> dict[str, int]:
    """FLOPs of one pass (2 per multiply-add), per part and ``total``; the same for both models.

    Linear layers on every token (``condition``: the observation Linear and the condition
    MLP; ``action_embedding``; ``decoder_linear``: the projections and FFNs of every layer;
    ``head``), plus ``attention``: per attention the scores QK^T and the weighted sum AV
    over the full (unmasked) score matrix, as the kernels compute it.
    """
    c = config
    ta, m, d, ff = c.horizon, c.n_memory, c.n_emb, 4 * c.n_emb
    self_attn = ta * d * 3 * d + ta * d * d  # qkv, out proj
    cross_attn = ta * d * d + m * d * 2 * d + ta * d * d  # q, kv (of the memory), out proj
    ffn = ta * d * ff + ta * ff * d
    macs = {
        "condition": c.n_obs_steps * c.obs_dim * d + m * d * ff + m * ff * d,
        "action_embedding": ta * c.action_dim * d,
        "decoder_linear": c.n_layer * (self_attn + cross_attn + ffn),
        "attention": c.n_layer * (2 * ta * ta * d + 2 * ta * m * d),  # self, cross: QK^T and AV each
        "head": ta * d * c.action_dim,
    }
    parts = {k: 2 * v * batch_size for k, v in macs.items()}
    return {**parts, "total": sum(parts.values())}


# ---------------------------------------------------------------------------- rows


@dataclass
class _Row:
    model: str
    backend: str
    threads: int
    params: int
    call: Any  # () -> np.ndarray output (B, Ta, A)
    times: list[float] = field(default_factory=list)  # seconds per timed pass
    max_abs_diff: float = 0.0


def build_models(cfg: BenchNetworkConfig) -> dict[str, Any]:
    """{model name: torch module in eval mode}; the baseline carries dreamrt's weights."""
    import torch

    from dreamrt.policies.dpt import DPT
    from dreamrt.policies.dpt_baseline import ReferenceDPT, load_dpt_weights

    config = cfg.model_config()
    torch.manual_seed(cfg.seed)
    dpt = DPT(config).eval()
    baseline = load_dpt_weights(ReferenceDPT(config), dpt).eval()
    return {BASELINE: baseline, DREAMRT: dpt}


def export_denoiser(model: Any, inputs: tuple, path: Path, opset: int) -> None:
    # The denoiser-step export of the onnxruntime backend: same wrapper, names and dynamic axes.
    from dreamrt.runtime.onnx_backend import DENOISER_INPUTS, _DenoiserStep, _export

    _export(_DenoiserStep(model), inputs, path, list(DENOISER_INPUTS), ["model_output"], opset)


def build_rows(cfg: BenchNetworkConfig, onnx_dir: Path) -> tuple[list[_Row], Any]:
    """Every models x backends x threads row, ready to time; and the dreamrt torch output (reference)."""
    import torch

    from dreamrt.policies.dpt import example_inputs
    from dreamrt.runtime.onnx_backend import CPU_PROVIDER, make_session

    models = build_models(cfg)
    config = models[DREAMRT].config
    noisy, t, obs = example_inputs(config, cfg.batch_size, seed=cfg.seed)
    t = t[:1]  # one timestep for the batch, as the samplers pass it
    with torch.inference_mode():
        reference = models[DREAMRT](noisy, t, obs).numpy()
    feeds = {"noisy_actions": noisy.numpy(), "timesteps": t.numpy(), "obs_features": obs.numpy()}

    rows = []
    for name in cfg.models:
        model = models[name]
        params = sum(p.numel() for p in model.parameters())
        for backend in cfg.backends:
            if backend == "onnxruntime":
                path = onnx_dir / f"{name}.onnx"
                export_denoiser(model, example_inputs(config, 2, seed=cfg.seed + 1), path, cfg.opset)
            for threads in cfg.threads:
                if backend == "torch":

                    def call(model=model) -> np.ndarray:
                        with torch.inference_mode():
                            return model(noisy, t, obs).numpy()
                else:
                    session = make_session(path, threads, [CPU_PROVIDER])

                    def call(session=session) -> np.ndarray:
                        return session.run(None, feeds)[0]

                rows.append(_Row(name, backend, threads, params, call))
    return rows, reference


def _set_threads(row: _Row) -> None:
    import torch

    # onnxruntime sizes its own pool; torch idles at 1 thread then, as the onnxruntime backend sets it.
    torch.set_num_threads(row.threads if row.backend == "torch" else 1)


def time_rows(cfg: BenchNetworkConfig, rows: list[_Row], reference: np.ndarray) -> None:
    """Fill every row's ``times`` and ``max_abs_diff`` (see the module docstring for the schedule)."""
    from tqdm import tqdm

    per_round = [
        cfg.passes // cfg.rounds + (1 if r < cfg.passes % cfg.rounds else 0) for r in range(cfg.rounds)
    ]
    total = len(rows) * (cfg.warmup + cfg.passes + cfg.rounds * ROUND_WARMUP)
    with tqdm(total=total, desc="bench network", unit="pass", disable=not cfg.progress) as bar:
        for row in rows:
            _set_threads(row)
            for _ in range(cfg.warmup):
                row.call()
            bar.update(cfg.warmup)
        for n in per_round:
            for row in rows:
                _set_threads(row)
                for _ in range(ROUND_WARMUP):
                    out = row.call()
                row.max_abs_diff = max(row.max_abs_diff, float(np.abs(out - reference).max()))
                for _ in range(n):
                    start = time.perf_counter()
                    row.call()
                    row.times.append(time.perf_counter() - start)
                bar.update(ROUND_WARMUP + n)


def summarise_rows(rows: list[_Row], flops: int) -> list[dict[str, Any]]:
    """The summary rows; speedups against the baseline torch row of the same thread count."""
    p50 = {(r.model, r.backend, r.threads): float(np.percentile(r.times, 50)) for r in rows}
    out = []
    for r in rows:
        mine = p50[(r.model, r.backend, r.threads)]
        base = p50[(BASELINE, "torch", r.threads)]
        out.append(
            {
                "model": r.model,
                "backend": r.backend,
                "threads": r.threads,
                "params": r.params,
                "ms_per_pass_p50": round(mine * 1e3, 4),
                "ms_per_pass_p99": round(float(np.percentile(r.times, 99)) * 1e3, 4),
                "ms_per_pass_mean": round(float(np.mean(r.times)) * 1e3, 4),
                "passes": len(r.times),
                "speedup_vs_baseline": round(base / mine, 4),
                "gflop_per_pass": flops / 1e9,
                "gflops_achieved": round(flops / mine / 1e9, 3),
                "max_abs_diff": r.max_abs_diff,
            }
        )
    return out


# ---------------------------------------------------------------------------- job


def run(cfg: BenchNetworkConfig, out_dir: Path | None = None) -> JobResult:
    import onnxruntime
    import torch

    config = cfg.model_config()
    flops = matmul_flops(config, cfg.batch_size)
    threads_before = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="dreamrt-bench-network-") as tmp:
            rows, reference = build_rows(cfg, Path(tmp))
            time_rows(cfg, rows, reference)
    finally:
        torch.set_num_threads(threads_before)
    summary: dict[str, Any] = {
        "rows": summarise_rows(rows, flops["total"]),
        "baseline": f"{BASELINE} on torch at the row's thread count, same run",
        "model_config": {
            "preset": cfg.preset,
            "n_layer": config.n_layer,
            "n_emb": config.n_emb,
            "n_head": config.n_head,
            "horizon": config.horizon,
            "n_obs_steps": config.n_obs_steps,
            "memory_tokens": config.n_memory,
            "action_dim": config.action_dim,
            "obs_dim": config.obs_dim,
            "batch_size": cfg.batch_size,
        },
        "flops_per_pass": flops,
        "passes": cfg.passes,
        "warmup": cfg.warmup,
        "rounds": cfg.rounds,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "cpu_count": os.cpu_count(),
        "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "wall_s": round(time.perf_counter() - start, 3),
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(summary))
    return JobResult(summary=summary)


def format_table(summary: dict[str, Any]) -> str:
    head = (
        f"{'model':<25}{'backend':<13}{'threads':>8}{'params':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'speedup':>9}{'GFLOP/s':>9}{'max diff':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        lines.append(
            f"{r['model']:<25}{r['backend']:<13}{r['threads']:>8}{r['params']:>11,}{r['ms_per_pass_p50']:>9.2f}"
            f"{r['ms_per_pass_p99']:>9.2f}{r['speedup_vs_baseline']:>8.2f}x{r['gflops_achieved']:>9.1f}"
            f"{r['max_abs_diff']:>10.1e}"
        )
    c = summary["model_config"]
    load = summary["load_average_1m"]
    lines.append(
        f"{c['preset']}: {c['n_layer']} x {c['n_emb']}, {c['horizon']} action + {c['memory_tokens']} memory tokens, "
        f"batch {c['batch_size']}; {summary['flops_per_pass']['total'] / 1e9:.3f} GFLOP per pass (matmuls); "
        f"{summary['passes']} timed passes per row; speedup = {BASELINE}/torch p50 at the same threads / row p50; "
        f"load average {load['start']} -> {load['end']} on {summary['cpu_count']} CPUs"
    )
    return "\n".join(lines)
