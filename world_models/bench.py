"""`dreamrt bench world-model`: speed and quality of the world model, one row per configuration.

With trained checkpoints (``tokenizer=RUN dynamics=RUN store=STORE``) every row of
``configs`` (a sampler, its step count, KV cache on/off, speculative frames) is timed at
batch 1 on a recorded action stream of a held-out episode, decoding every frame, and its
quality is measured open loop on held-out clips (PSNR/SSIM at ``horizons`` against the real
frames, see :mod:`dreamrt.world_models.quality`); a ``repeat_last_frame`` row gives the
baseline and the summary the tokenizer's reconstruction PSNR. Held-out episodes are the ones
the dynamics run held out (its summary.json lists them). Rows carry ``sampler``, ``steps``,
``kv_cache``, ``speculative``, ``fps``, FLOPs per frame and the fraction of the measured
matmul peak that generation reaches (``reference_gflops``: a typical linear layer here).

Without checkpoints (latency only, random weights): for each sampler step count, a randomly initialised model (latency does not depend on the
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
from dreamrt.policies.shipped import resolve_policy_path


@dataclass
class BenchRowConfig:
    """One configuration to time (and, with a trained model, to evaluate)."""

    name: str = "teacher"  # a label for the row ("teacher", "student", ...)
    solver: str = "euler"  # FrameSamplerConfig.solver
    steps: int = 8
    kv_cache: bool = True  # False: recompute the whole window for every denoising step
    speculate: int = 0  # > 0: speculate this many frames per parallel pass on the recorded stream
    model: str = "teacher"  # "teacher" (dynamics=) | "student" (student=, a distilled checkpoint)
    action_hold: int = 1  # > 1: the stream holds every n-th recorded action for n frames (actions repeat)

    def __post_init__(self) -> None:
        from dreamrt.errors import choose
        from dreamrt.world_models.sampling import FrameSamplerConfig

        FrameSamplerConfig(solver=self.solver, steps=self.steps)  # validates both
        choose(f"bench row '{self.name}' model", self.model, ("teacher", "student"))
        if self.speculate < 0 or (self.speculate and not self.kv_cache) or self.action_hold < 1:
            raise UserError(
                f"bench row '{self.name}': speculate must be >= 0 and needs kv_cache=true, action_hold >= 1; got "
                f"speculate={self.speculate}, kv_cache={self.kv_cache}, action_hold={self.action_hold}."
            )


def _default_rows() -> list[BenchRowConfig]:
    """The teacher without and with the cache, the teacher's own weights in one x0 step (what the
    distillation has to beat), the distilled student at 1-2 steps (1 step also without the cache), and speculation on the recorded
    stream and on one whose actions repeat (each against the same row without it)."""
    return [
        BenchRowConfig("teacher", "euler", 8, kv_cache=False),
        BenchRowConfig("teacher", "euler", 8),
        BenchRowConfig("teacher", "euler", 4),
        BenchRowConfig("teacher weights, 1 step", "x0", 1),
        BenchRowConfig("student", "x0", 2, model="student"),
        BenchRowConfig("student", "x0", 1, kv_cache=False, model="student"),
        BenchRowConfig("student", "x0", 1, model="student"),
        BenchRowConfig("student + speculation", "x0", 1, speculate=4, model="student"),
        BenchRowConfig("student, held actions", "x0", 1, model="student", action_hold=4),
        BenchRowConfig("student + spec., held actions", "x0", 1, speculate=4, model="student", action_hold=4),
    ]


def _teacher_only_rows() -> list[BenchRowConfig]:
    """Without a student: the same rows with the teacher's weights under the few-step solver."""
    rows = []
    for r in _default_rows():
        if r.model == "teacher" and r.solver == "x0":
            continue  # the few-step rows below are this row
        if r.model == "student":
            r = BenchRowConfig(
                **{**r.__dict__, "model": "teacher", "name": r.name.replace("student", "few-step")}
            )
        rows.append(r)
    return rows


@dataclass
class BenchWorldModelConfig:
    # Trained checkpoints (run directories or checkpoints); empty: latency of random weights only.
    tokenizer: str = ""
    dynamics: str = ""
    student: str = (
        ""  # a distilled dynamics checkpoint (`dreamrt distill world-model`) for model=student rows
    )
    store: str = ""  # the episode store the dynamics model was trained on (held-out episodes from it)
    # A state-conditioned model's state predictor (`dreamrt train world-model stage=state`): quality is
    # then measured with predicted states, seeing no future state. Without it such a model gets the
    # recorded states of the frames it generates (summary "states": "recorded").
    state_model: str = ""
    # null: _default_rows() with a student, else the same rows on the teacher's weights.
    configs: list[BenchRowConfig] | None = None
    horizons: list[int] = field(default_factory=lambda: [1, 4, 16])
    clips_per_episode: int = 8  # held-out clips per held-out episode for the quality figures
    max_clips: int = 64
    context: int = 0  # real frames before generation; 0: window - 1
    context_noise: float = 0.0  # FrameSamplerConfig.context_noise of every row
    # FrameSamplerConfig.temperature of every row. 0: each frame starts at its source's mean; for
    # a 2,400-step teacher 38.72 / 34.62 / 24.52 dB at horizons 1 / 4 / 16 against 38.39 / 34.15 /
    # 23.24 at 1.0 (4 Euler steps): sampling noise otherwise accumulates over a rollout.
    temperature: float = 0.0
    tolerance: float = 0.05  # speculation: max abs difference of normalised actions still "the same"
    val_episodes: list[int] | None = None  # held-out episodes; null: the dynamics run's (summary.json)
    # "held_out": the episodes above; "all": every episode of `store`, for a store recorded apart
    # from the training one (another seed), which holds many more clips than a run's validation split.
    episodes: str = "held_out"
    # Latency-only mode (no checkpoints):
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
        if bool(self.tokenizer) != bool(self.dynamics) or (self.dynamics and not self.store):
            raise UserError(
                f"bench world-model measures a trained model with tokenizer=RUN dynamics=RUN store=STORE (all "
                f"three), or random weights with none; got tokenizer={self.tokenizer!r}, "
                f"dynamics={self.dynamics!r}, store={self.store!r}."
            )
        if not self.horizons or any(h < 1 for h in self.horizons) or self.context < 0:
            raise UserError(
                f"horizons must be a non-empty list of positive ints and context >= 0, got {self.horizons}, "
                f"{self.context}."
            )
        from dreamrt.errors import choose

        choose("bench world-model episodes", self.episodes, ("held_out", "all"))
        if self.configs is None:
            self.configs = _default_rows() if self.student else _teacher_only_rows()
        self.configs = [BenchRowConfig(**c) if isinstance(c, dict) else c for c in self.configs]
        if any(c.model == "student" for c in self.configs) and not self.student:
            raise UserError(
                "A bench row has model=student but no student checkpoint was given: pass student=RUN (from "
                "`dreamrt distill world-model`)."
            )


def frame_flops(config, steps: int, kv_write: str) -> int:
    """Analytic FLOPs to generate one frame with a full window (fused: the previous frame rides in pass 1)."""
    from dreamrt.world_models.dynamics import flops_per_pass

    one = flops_per_pass(config, 1, config.window)
    if kv_write == "fused":
        return flops_per_pass(config, 2, config.window) + (steps - 1) * one
    return (steps + 1) * one


def run(cfg: BenchWorldModelConfig, out_dir: Path | None = None) -> JobResult:
    if cfg.dynamics:
        return run_trained(cfg, out_dir)
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
                "sampler": "euler",
                "kv_cache": True,
                "speculative": cfg.speculate,
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


# ---------------------------------------------------------------------------- trained checkpoints


def held_out_episodes(dynamics: str, num_episodes: int, given: list[int] | None) -> list[int]:
    """The episodes a dynamics run held out: ``given``, else its summary.json's ``val_episodes``."""
    if given is None:
        given = run_summary(dynamics).get("val_episodes")
        if given is None:
            raise UserError(
                f"Cannot tell which episodes the dynamics run {dynamics} held out (no val_episodes in a "
                f"summary.json beside it); pass val_episodes=[...]."
            )
    bad = [e for e in given if not 0 <= e < num_episodes]
    if not given or bad:
        raise UserError(
            f"val_episodes must be a non-empty list of episode indices below {num_episodes}, got {given}."
        )
    return list(given)


def run_trained(cfg: BenchWorldModelConfig, out_dir: Path | None = None) -> JobResult:
    """Speed and quality rows of trained checkpoints; see the module docstring."""
    import numpy as np
    import torch

    from dreamrt.world_models.dynamics import flops_per_pass, load_dynamics
    from dreamrt.world_models.quality import clip_starts, horizon_quality, load_eval_data, timed_stream
    from dreamrt.world_models.sampling import FrameSamplerConfig
    from dreamrt.world_models.tokenizer import decoder_flops, load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = load_tokenizer(cfg.tokenizer)
    model, normalizer = load_dynamics(cfg.dynamics)
    from dreamrt.episodes import open_store

    keys = trained_keys(cfg.dynamics)
    num_episodes = open_store(cfg.store).num_episodes
    if cfg.episodes == "all":
        val = list(range(num_episodes))
    else:
        val = held_out_episodes(cfg.dynamics, num_episodes, cfg.val_episodes)
    # Only the held-out episodes are read and encoded (renumbered 0..len(val)-1 in `data`).
    data = load_eval_data(cfg.store, tok, normalizer, episodes=val, **keys)
    if model.config.state_dim != data.states.shape[1] or model.config.action_dim != data.actions.shape[1]:
        raise UserError(
            f"The dynamics model takes action/state dims {model.config.action_dim}/{model.config.state_dim}, the "
            f"store gives {data.actions.shape[1]}/{data.states.shape[1]} ({keys})."
        )
    dc = model.config
    context = cfg.context or dc.window - 1
    local = np.arange(len(val))
    starts = clip_starts(
        data.episode_ends, local, context + max(cfg.horizons), cfg.clips_per_episode, cfg.seed
    )
    starts = starts[np.linspace(0, len(starts) - 1, min(cfg.max_clips, len(starts))).round().astype(int)]
    stream_len = (
        context + cfg.warmup + cfg.frames + max(1, max((r.speculate for r in cfg.configs), default=0))
    )
    stream_start = clip_starts(data.episode_ends, local, stream_len, 1, cfg.seed)[0]
    ref = reference_gflops()
    decode_gflop = decoder_flops(tok.config) / 1e9

    predictor = None
    if cfg.state_model:
        from dreamrt.world_models.proprio import load_state_predictor_for

        predictor = load_state_predictor_for(cfg.state_model, model, normalizer, keys["state_key"])
    models = {"teacher": model}
    if cfg.student:
        student, student_normalizer = load_dynamics(cfg.student)
        if student.config != dc or student_normalizer != normalizer:
            raise UserError(
                f"The student {cfg.student} does not match the teacher {cfg.dynamics} (model config or action "
                f"normaliser differ); distil it from this teacher with `dreamrt distill world-model`."
            )
        models["student"] = student
    rows, quality_cache, timed = [], {}, {}
    for rc in cfg.configs:
        net = models[rc.model]
        sampler = FrameSamplerConfig(
            steps=rc.steps,
            solver=rc.solver,
            context_noise=cfg.context_noise,
            temperature=cfg.temperature,
            seed=cfg.seed,
        )
        speed = timed_stream(
            net, tok, data, int(stream_start), cfg.frames, sampler, context=context, kv_cache=rc.kv_cache,
            speculate=rc.speculate, tolerance=cfg.tolerance, warmup=cfg.warmup, action_hold=rc.action_hold,
        )  # fmt: skip
        key = (rc.model, rc.solver, rc.steps)
        if (
            key not in quality_cache
        ):  # cache, speculation and the stream do not change the frames of a step-by-step rollout
            quality_cache[key] = horizon_quality(
                net, tok, data, starts, sampler, context=context, horizons=list(cfg.horizons),
                state_predictor=predictor,
            )  # fmt: skip
        q = quality_cache[key]
        same_without = (rc.model, rc.solver, rc.steps, rc.kv_cache, rc.action_hold)
        if not rc.speculate:
            timed[same_without] = speed["fps"]
        elif same_without in timed:  # the speculative speedup against the same row without speculation
            speed["speedup"] = speed["fps"] / timed[same_without]
        if rc.kv_cache:
            dyn_gflop = frame_flops(dc, rc.steps, sampler.kv_write) / 1e9
        else:
            dyn_gflop = rc.steps * flops_per_pass(dc, dc.window, dc.window) / 1e9
        row = {
            "name": rc.name,
            "model": rc.model,
            "sampler": rc.solver,
            "steps": rc.steps,
            "kv_cache": rc.kv_cache,
            "speculative": rc.speculate,
            "action_hold": rc.action_hold,
            **speed,
            "dynamics_gflop": dyn_gflop,
            "decode_gflop": decode_gflop,
            "peak_fraction": (dyn_gflop + decode_gflop) * speed["fps"] / ref,
        }
        for h in cfg.horizons:
            row[f"psnr_h{h}"] = q[f"model_psnr_h{h}"]
            row[f"ssim_h{h}"] = q[f"model_ssim_h{h}"]
            row[f"psnr_plain_h{h}"] = q[f"model_plain_psnr_h{h}"]
            row[f"gain_vs_repeat_h{h}"] = q[f"gain_psnr_h{h}"]
            row[f"gain_vs_repeat_se_h{h}"] = q[f"gain_psnr_se_h{h}"]
        rows.append(row)
    q = next(iter(quality_cache.values()))
    rows.append(
        _reference_row(
            "repeat last frame", "repeat_last_frame", q, "repeat_last", "repeat_last", cfg.horizons
        )
    )
    rows.append(
        _reference_row(
            "perfect latent prediction", "real_latents", q, "perfect_latents", "tokenizer", cfg.horizons
        )
    )
    summary = {
        "tokenizer": cfg.tokenizer,
        "dynamics": cfg.dynamics,
        "student": cfg.student,
        "store": cfg.store,
        "parameters": model.num_parameters(),
        "tokenizer_parameters": tok.num_parameters(),
        "tokens_per_frame": dc.tokens_per_frame,
        "window": dc.window,
        "context": context,
        "held_out_episodes": val,
        "states": "none" if not dc.state_dim else ("predicted" if predictor is not None else "recorded"),
        "quality_clips": q["clips"],
        "quality_episodes": q["episodes"],
        "tokenizer_psnr": sum(q[f"tokenizer_psnr_h{h}"] for h in cfg.horizons) / len(cfg.horizons),
        "tokenizer_ssim": sum(q[f"tokenizer_ssim_h{h}"] for h in cfg.horizons) / len(cfg.horizons),
        "threads": torch.get_num_threads(),
        "reference_gflops": ref,
        "tolerance": cfg.tolerance,
        "rows": rows,
    }
    print(format_trained_table(summary, cfg.horizons))
    return JobResult(summary=summary)


def _reference_row(name: str, sampler: str, q: dict, who: str, plain: str, horizons: list[int]) -> dict:
    """A quality-only row (no generation to time) from ``horizon_quality``'s figures for ``who``."""
    row = {"name": name, "sampler": sampler, "steps": 0, "kv_cache": False, "speculative": 0, "fps": None}
    for h in horizons:
        row[f"psnr_h{h}"] = q[f"{who}_psnr_h{h}"]
        row[f"ssim_h{h}"] = q[f"{who}_ssim_h{h}"]
        row[f"psnr_plain_h{h}"] = q[f"{plain}_psnr_h{h}"]
    return row


def run_summary(checkpoint: str) -> dict:
    """The summary.json of the run a world-model checkpoint came from: in the run directory (or a
    shipped checkpoint), or two levels above a ``checkpoints/step_*`` directory; {} without one."""
    import json

    path = Path(resolve_policy_path(checkpoint))
    for candidate in (path / "summary.json", path.parent.parent / "summary.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def trained_keys(dynamics: str) -> dict[str, str]:
    """camera / action_key / state_key the dynamics run trained on (its summary.json), else the defaults."""
    saved = run_summary(dynamics)
    return {
        "camera": saved.get("camera", "observation.images.static"),
        "action_key": saved.get("action_key", "action"),
        "state_key": saved.get("state_key", "observation.state"),
    }


def format_trained_table(summary: dict, horizons: list[int]) -> str:
    head = (
        f"world model {summary['parameters'] / 1e6:.2f}M params + tokenizer {summary['tokenizer_parameters'] / 1e6:.2f}M, "
        f"{summary['tokens_per_frame']} tokens/frame, window {summary['window']}, {summary['threads']} thread(s), "
        f"reference {summary['reference_gflops']:.0f} GFLOP/s; tokenizer PSNR {summary['tokenizer_psnr']:.2f} dB; "
        f"{summary['quality_clips']} held-out clips; PSNR decoded relative to the last real frame (plain decoding "
        f"in brackets)"
    )
    if summary.get("states", "none") != "none":
        head += f"; robot states of generated frames: {summary['states']}"
    cols = (
        f"{'name':<30} {'sampler':<8} {'steps':>5} {'cache':>5} {'spec':>4} {'hold':>4} {'FPS':>6} {'accept':>6} "
        f"{'speedup':>7} " + " ".join(f"{'PSNR@' + str(h):>15} {'SSIM@' + str(h):>7}" for h in horizons)
    )
    lines = [head, cols]
    for r in summary["rows"]:
        fps = f"{r['fps']:6.1f}" if r.get("fps") is not None else f"{'-':>6}"
        acc = f"{r['acceptance_rate']:6.2f}" if "acceptance_rate" in r else f"{'-':>6}"
        up = f"{r['speedup']:6.2f}x" if "speedup" in r else f"{'-':>7}"
        lines.append(
            f"{r['name'][:30]:<30} {r['sampler']:<8} {r['steps']:>5} {str(r['kv_cache'])[0]:>5} {r['speculative']:>4} "
            f"{r.get('action_hold', 1):>4} {fps} {acc} {up} "
            + " ".join(
                f"{r[f'psnr_h{h}']:6.2f} ({r[f'psnr_plain_h{h}']:5.2f}) {r[f'ssim_h{h}']:7.3f}"
                for h in horizons
            )
        )
    gains = [r for r in summary["rows"] if f"gain_vs_repeat_h{horizons[0]}" in r]
    if gains:
        lines.append(
            f"PSNR gain over repeating the last frame, dB (+- standard error across "
            f"{summary.get('quality_episodes', '?')} episodes):"
        )
        seen = set()
        for r in gains:
            key = (r.get("model"), r["sampler"], r["steps"])  # speculation and streams leave frames alone
            if key in seen:
                continue
            seen.add(key)
            lines.append(
                f"  {r['name'][:30]:<30} {r['sampler']:<8} {r['steps']:>5} "
                + "  ".join(
                    f"h{h} {r[f'gain_vs_repeat_h{h}']:+.2f} +- {r[f'gain_vs_repeat_se_h{h}']:.2f}"
                    for h in horizons
                )
            )
    return "\n".join(lines)
