"""`dreamrt compare world-model`: the same actions through MuJoCo and through the world model.

    dreamrt compare world-model tokenizer=RUN/tokenizer dynamics=RUN/dynamics episodes=4 seed=1000

The CALVIN-style env cannot be reset to a recorded episode's exact start (a reset realises a
symbolic state and draws block placements from its seed; the store keeps no seed), so the
tool makes its own ground truth: it records ``episodes`` fresh expert episodes in MuJoCo
(:func:`dreamrt.sim.record.record`, the same code as ``dreamrt record``, into
``OUT/mujoco.zarr``), then, from ``clips_per_episode`` start frames in each, prefills the
model with ``context`` real frames and generates open loop under the actions MuJoCo executed.
Reported per horizon: PSNR and SSIM of the model's frames against MuJoCo's, of repeating the
last real frame, and of the tokenizer's reconstruction (the ceiling). ``store=PATH`` compares
on an existing store's episodes instead (e.g. the held-out part of the training data).
``comparison.png`` shows, for the first clip, MuJoCo's frames (top) over the model's (bottom)
at every horizon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult
from dreamrt.sim.env import EnvConfig
from dreamrt.world_models.sampling import FrameSamplerConfig

MISSING = "???"


@dataclass
class CompareWorldModelConfig:
    tokenizer: str = MISSING  # tokenizer run directory or checkpoint
    dynamics: str = MISSING  # dynamics run directory or checkpoint
    # A state-conditioned model's state predictor: generated frames get predicted states, not MuJoCo's.
    state_model: str = ""
    store: str = ""  # compare on this store's episodes; empty: record fresh ones in MuJoCo
    episodes: int = 4  # fresh expert episodes to record
    mode: str = "chain"  # dreamrt record's mode for them
    seed: int = 1000  # of the fresh episodes (keep it away from the training store's seed)
    env: EnvConfig = field(default_factory=EnvConfig)  # must match the training store's camera sizes
    num_workers: int = 0  # recording processes
    horizons: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    clips_per_episode: int = 4
    context: int = 0  # real frames before generation; 0: the model's window - 1
    # temperature 0: measured better over long rollouts (docs/world_models.md, "The shipped model").
    sampler: FrameSamplerConfig = field(default_factory=lambda: FrameSamplerConfig(steps=4, temperature=0.0))
    image: bool = True  # write comparison.png
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("tokenizer", "dynamics"):
            if getattr(self, name) in ("", MISSING):
                raise UserError(
                    f"compare world-model needs {name}=PATH (a trained {name} run or checkpoint)."
                )
        if self.episodes < 1 or self.clips_per_episode < 1 or self.context < 0:
            raise UserError(
                f"episodes and clips_per_episode must be >= 1 and context >= 0, got {self.episodes}, "
                f"{self.clips_per_episode}, {self.context}."
            )
        if not self.horizons or any(h < 1 for h in self.horizons):
            raise UserError(f"horizons must be a non-empty list of positive ints, got {self.horizons}.")
        if not self.env.cameras:
            raise UserError("compare world-model needs camera frames: env.cameras must be true.")


def run(cfg: CompareWorldModelConfig, out_dir: Path) -> JobResult:
    import numpy as np
    import torch

    from dreamrt.world_models.bench import trained_keys
    from dreamrt.world_models.dynamics import load_dynamics
    from dreamrt.world_models.quality import clip_starts, horizon_quality, load_eval_data
    from dreamrt.world_models.tokenizer import load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.tokenizer)
    model, normalizer = load_dynamics(cfg.dynamics)
    store = cfg.store
    recorded = None
    if not store:
        from dreamrt.sim.record import RecordConfig, record

        store = str(out_dir / "mujoco.zarr")
        recorded, _ = record(
            RecordConfig(
                out=store,
                episodes=cfg.episodes,
                env=cfg.env,
                mode=cfg.mode,
                seed=cfg.seed,
                num_workers=cfg.num_workers,
                overwrite=True,
            )
        )
    keys = trained_keys(cfg.dynamics)
    predictor = None
    if cfg.state_model:
        from dreamrt.world_models.proprio import load_state_predictor_for

        predictor = load_state_predictor_for(cfg.state_model, model, normalizer, keys["state_key"])
    data = load_eval_data(store, tok, normalizer, **keys)
    context = cfg.context or model.config.window - 1
    episodes = np.arange(len(data.episode_ends))
    starts = clip_starts(data.episode_ends, episodes, context + max(cfg.horizons), cfg.clips_per_episode, 0)
    horizons = sorted(set(cfg.horizons))
    q = horizon_quality(
        model, tok, data, starts, cfg.sampler, context=context, horizons=horizons, state_predictor=predictor
    )
    rows = [
        {
            "horizon": h,
            **{f"{who}_{m}": q[f"{who}_{m}_h{h}"] for who in ("model", "model_plain", "repeat_last", "tokenizer") for m in ("psnr", "ssim")},
            "gain_psnr": q[f"gain_psnr_h{h}"],
            "gain_psnr_se": q[f"gain_psnr_se_h{h}"],  # across episodes
        }
        for h in horizons
    ]  # fmt: skip
    summary = {
        "store": store,
        "recorded": None
        if recorded is None
        else {k: recorded[k] for k in ("episodes_written", "frames_written")},
        "clips": q["clips"],
        "context": context,
        "sampler": {"solver": cfg.sampler.solver, "steps": cfg.sampler.steps},
        "states": "none"
        if not model.config.state_dim
        else ("predicted" if predictor is not None else "recorded"),
        "rows": rows,
    }
    if cfg.image:
        summary["image"] = str(
            _write_strip(
                out_dir / "comparison.png",
                model,
                tok,
                data,
                int(starts[0]),
                context,
                horizons,
                cfg.sampler,
                predictor,
            )  # fmt: skip
        )
    print(
        f"{'horizon':>7} {'model PSNR':>10} {'SSIM':>6} {'plain decode':>12} {'repeat-last PSNR':>16} {'SSIM':>6} "
        f"{'tokenizer PSNR':>14}"
    )
    for r in rows:
        print(
            f"{r['horizon']:>7} {r['model_psnr']:>10.2f} {r['model_ssim']:>6.3f} {r['model_plain_psnr']:>12.2f} "
            f"{r['repeat_last_psnr']:>16.2f} "
            f"{r['repeat_last_ssim']:>6.3f} {r['tokenizer_psnr']:>14.2f}"
        )
    return JobResult(summary=summary)


def _write_strip(path, model, tok, data, start, context, horizons, sampler, predictor) -> Path:
    """MuJoCo's frames (top row) over the model's (bottom row) at each horizon of one clip."""
    import numpy as np
    import torch
    from PIL import Image

    from dreamrt.world_models.sampling import Rollout
    from dreamrt.world_models.tokenizer import tensor_to_images

    rows = torch.arange(start, start + context + max(horizons))
    rollout = Rollout(model, sampler, state_predictor=predictor)
    with torch.inference_mode():
        rollout.prefill(
            data.latents[rows[:context]][None],
            data.actions[rows[:context]][None],
            data.states[rows[:context]][None],
        )
        real, fake = [], []
        detail = tok.detail(data.float_images(rows[context - 1][None]))
        for h in range(1, max(horizons) + 1):
            prev = rows[context + h - 2]
            recorded_state = data.states[prev][None] if data.states.shape[1] and predictor is None else None
            z = rollout.step(data.actions[prev][None], recorded_state)
            if h in horizons:
                real.append(tensor_to_images(data.float_images(rows[context + h - 1][None]))[0])
                fake.append(tensor_to_images(tok.decode(z, detail).clamp(0, 1))[0])
    grid = np.concatenate([np.concatenate(real, axis=1), np.concatenate(fake, axis=1)], axis=0)
    Image.fromarray(grid).save(path)
    return path
