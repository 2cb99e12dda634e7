"""`dreamrt bench sim`: how fast the CALVIN-style environment steps, and how long an evaluation takes.

    dreamrt bench sim [steps=600] [chains=20] [num_workers=2] [policy=expert] [--json PATH]

Rows (single process, random actions in ``rel_cartesian`` mode, seeded):

- ``step, both cameras``: ``env.step`` with the static and wrist cameras rendering RGB;
- ``step, both cameras + depth``;
- ``step, no cameras``: physics, IK and the scene snapshot only;
- ``render static camera``: one ``env.render()`` of the static view (what a filmed chain adds);
- with ``chains > 0``: the wall time of a ``chains``-chain evaluation of ``policy`` with
  ``num_workers`` processes (``dreamrt eval``'s code path, no videos), its env steps/s and
  average length; ``chains=0`` skips it.

Each env row steps ``steps`` times after a warm-up of 20 steps, resetting every 360 steps
as an evaluation would. The summary is ``{"rows": [{"name", "steps_per_s", ...}, ...]}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult
from dreamrt.policies.factory import PolicyConfig
from dreamrt.sim.env import EnvConfig

WARMUP_STEPS = 20
RESET_EVERY = 360


@dataclass
class BenchSimConfig:
    env: EnvConfig = field(default_factory=EnvConfig)  # scene and image sizes of the env rows
    steps: int = 600  # env steps per row
    chains: int = 20  # evaluation chains for the last row (0: skip it)
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # policy of the evaluation row
    num_workers: int = 2  # rollout processes of the evaluation row
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps={self.steps}; expected a positive int.")
        if self.chains < 0:
            raise UserError(f"chains={self.chains}; expected 0 (skip the evaluation row) or a positive int.")
        if self.num_workers < 0:
            raise UserError(
                f"num_workers={self.num_workers}; expected 0 (in this process) or a positive int."
            )


def _time_env(env_cfg: EnvConfig, steps: int, seed: int, render: bool = False) -> dict[str, Any]:
    from dreamrt.sim.env import CalvinStyleEnv

    env = CalvinStyleEnv(env_cfg, render_mode="rgb_array" if render else None)
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1.0, 1.0, (steps + WARMUP_STEPS, 7))
    try:
        env.reset(seed=seed)
        for a in actions[:WARMUP_STEPS]:
            env.step(a)
        stepping = 0.0
        rendering = 0.0
        for k, a in enumerate(actions[WARMUP_STEPS:]):
            if k and k % RESET_EVERY == 0:
                env.reset(seed=seed + k)  # not timed: resets are once per chain
            t0 = time.perf_counter()
            env.step(a)
            t1 = time.perf_counter()
            if render:
                env.render()
            stepping += t1 - t0
            rendering += time.perf_counter() - t1
    finally:
        env.close()
    if render:
        return {"steps_per_s": steps / rendering, "ms_per_step": 1000 * rendering / steps}
    return {"steps_per_s": steps / stepping, "ms_per_step": 1000 * stepping / steps}


def run(cfg: BenchSimConfig, out_dir: Path | None = None) -> JobResult:
    env = cfg.env
    static = f"{env.static_height}x{env.static_width}"
    gripper = f"{env.gripper_height}x{env.gripper_width}"
    base = replace(env, depth=False, segmentation=False)
    rows: list[dict[str, Any]] = []
    print(f"{'':<50} {'steps/s':>9} {'ms/step':>7} {'processes':>9}")
    cases = [
        (f"step, both cameras ({static} + {gripper} RGB)", replace(base, cameras=True), False),
        ("step, both cameras + depth", replace(base, cameras=True, depth=True), False),
        ("step, no cameras", replace(base, cameras=False), False),
        (f"render static camera ({static}), per call", replace(base, cameras=False), True),
    ]
    for name, env_cfg, render in cases:
        rows.append({"name": name, "processes": 1, **_time_env(env_cfg, cfg.steps, cfg.seed, render)})
        _print_row(rows[-1])
    if cfg.chains:
        from dreamrt.sim.evaluate import EvalConfig, evaluate

        eval_cfg = EvalConfig(
            env=env,
            policy=cfg.policy,
            num_chains=cfg.chains,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            videos=0,
            progress=True,
        )
        summary, interrupted = evaluate(eval_cfg, None)
        name = cfg.policy.path or cfg.policy.name
        rows.append(
            {
                "name": f"eval {summary['num_chains']} chains, policy {name}",
                "processes": cfg.num_workers,
                "steps_per_s": summary["steps_per_s"],
                "ms_per_step": 1000 / summary["steps_per_s"] if summary["steps_per_s"] else None,
                "wall_time_s": summary["wall_time_s"],
                "env_steps": summary["env_steps"],
                "avg_len": summary.get("avg_len"),
                "interrupted": interrupted,
            }
        )
        _print_row(rows[-1])
    return JobResult(summary={"rows": rows})


def _print_row(row: dict[str, Any]) -> None:
    ms = f"{row['ms_per_step']:7.3f}" if row.get("ms_per_step") else "      -"
    extra = ""
    if "wall_time_s" in row:
        avg = row["avg_len"]
        extra = f"  wall {row['wall_time_s']:.1f} s, {row['env_steps']} steps, avg len {avg if avg is None else round(avg, 3)}"
    print(f"{row['name']:<50} {row['steps_per_s']:>9.0f} {ms} {row['processes']:>9}{extra}")
