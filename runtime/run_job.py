"""`dreamrt run`: a policy drives the CALVIN-style sim through the real-time control loop.

    dreamrt run [policy=expert|random | policy.path=CKPT] [task=open_drawer] [loop.mode=real|virtual]
                [loop.scheduler.strategy=sync|naive_async|temporal_ensemble|rtc] [loop.max_ticks=360]
                [loop.realtime_priority=10] [record=true] [--json PATH]

The scene is reset (seeded by ``seed``) into a random CALVIN start state in which ``task`` can
be done, the policy is told the task's evaluation instruction, and the loop runs until the task
succeeds (``stop_on_success``) or ``loop.max_ticks`` control steps have passed. In real mode
the simulation advances one control period per tick on the wall clock; in virtual mode as fast
as it computes, with each inference charged ``loop.virtual_latency_s`` of simulated time.

A live status line (tqdm) shows the step, queue depth, newest inference latency, missed
deadlines and held ticks. Writes into the run directory: ``episode.zarr`` (every tick: the
observation, the action sent and the ``loop.*`` latency columns; see docs/runtime.md) when
``record`` is on, and ``loop_report.json`` (the summary below). The summary is
:meth:`LoopReport.summary` plus ``task``, ``instruction``, ``success``, ``success_step``,
``policy`` and ``episode_store``. Ctrl-C stops the loop (holding the robot), keeps what was
recorded and exits with code 130.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult
from dreamrt.policies.factory import PolicyConfig
from dreamrt.runtime.chunking import SchedulerConfig
from dreamrt.runtime.loop import LoopConfig, loop_for_policy, realtime_or_normal, run_loop
from dreamrt.runtime.metrics import TickRecord
from dreamrt.sim.env import EnvConfig

EXIT_INTERRUPTED = 130
STATUS_EVERY_S = 0.25  # wall seconds between status-line refreshes (it is drawn on the loop thread)


@dataclass
class RunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # policy=expert|random or policy.path=DIR
    env: EnvConfig = field(default_factory=EnvConfig)  # the scene, cameras, action mode
    # Rate, mode, strategy, safety. rtc for chunking policies; a one-action policy (the scripted
    # expert) runs sync whatever is set, with a note. realtime_priority: the loop and inference
    # threads under SCHED_FIFO where permitted (else one note and normal scheduling).
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            max_ticks=360, realtime_priority=10, scheduler=SchedulerConfig(strategy="rtc")
        )
    )
    task: str = "open_drawer"  # one of dreamrt.sim.tasks.task_names()
    seed: int = 0  # start state, scene reset and policy sampling
    record: bool = True  # write episode.zarr into the run directory
    stop_on_success: bool = True  # end the loop the tick the task succeeds
    status: bool = True  # live status line

    def __post_init__(self) -> None:
        from dreamrt.sim.tasks import get_task

        get_task(self.task)  # a UserError with "did you mean" for a misspelt task
        if self.seed < 0:
            raise UserError(f"seed={self.seed}; expected a non-negative int.")


def start_state(task: str, seed: int):
    """A CALVIN start state in which ``task`` can be done, drawn with ``seed``."""
    from dreamrt.sim import protocol

    states = [s for s in protocol.start_states() if protocol.precondition_holds(task, s)]
    if not states:
        raise UserError(f"No CALVIN start state allows task '{task}'; pick another task.")
    return states[int(np.random.default_rng(seed).integers(len(states)))]


def run(cfg: RunConfig, out_dir: Path | None = None) -> JobResult:
    from dreamrt.episodes import create_store
    from dreamrt.policies.factory import make_policy
    from dreamrt.runtime.clock import make_clock
    from dreamrt.runtime.metrics import EpisodeRecorder, recording_features
    from dreamrt.runtime.robot import MujocoRobot
    from dreamrt.sim.env import CalvinStyleEnv
    from dreamrt.sim.language import eval_instruction
    from dreamrt.sim.tasks import check_success

    if cfg.record and out_dir is None:
        raise UserError(
            "record=true needs an output directory; pass out_dir (the CLI gives one) or record=false."
        )
    instruction = eval_instruction(cfg.task)
    env = CalvinStyleEnv(cfg.env)
    try:
        robot = MujocoRobot(env, make_clock(cfg.loop.mode, cfg.loop.spin_s))
        first = robot.reset(
            seed=cfg.seed,
            options={"symbolic_state": start_state(cfg.task, cfg.seed), "instruction": instruction},
        )
        start_scene = robot.last_info["scene_state"]
        policy = make_policy(
            cfg.policy,
            action_dim=robot.action_dim,
            rate_hz=cfg.loop.rate_hz,
            scene=cfg.env.scene,
            action_mode=cfg.env.action_mode,
        )
        _check_policy(policy, robot.action_dim, cfg.env.action_mode)
        policy.reset(cfg.seed)
        loop_cfg = realtime_or_normal(loop_for_policy(cfg.loop, policy.spec.horizon))

        outcome: dict[str, Any] = {"success": False, "success_step": None}
        status = _Status(cfg.loop.max_ticks, enabled=cfg.status)

        def on_tick(record: TickRecord) -> bool:
            status.update(record)
            if check_success(cfg.task, start_scene, robot.last_info["scene_state"]):
                if not outcome["success"]:
                    outcome.update(success=True, success_step=record.step)
                return cfg.stop_on_success
            return False

        store_path = None
        if cfg.record:
            store_path = Path(out_dir) / "episode.zarr"
            features = recording_features(first, robot.action_dim)
            with (
                create_store(
                    store_path, features, fps=cfg.loop.rate_hz, robot_type="calvin_style_panda"
                ) as writer,
                EpisodeRecorder(writer, default_task=instruction) as recorder,
            ):
                report = run_loop(robot, policy, loop_cfg, recorder, on_tick=on_tick)
        else:
            report = run_loop(robot, policy, loop_cfg, on_tick=on_tick)
        status.close(report)
    finally:
        env.close()

    summary = report.summary()
    summary.update(
        task=cfg.task,
        instruction=instruction,
        policy=cfg.policy.path or cfg.policy.name,
        episode_store=str(store_path) if store_path else None,
        **outcome,
    )
    if out_dir is not None:
        (Path(out_dir) / "loop_report.json").write_text(json.dumps(summary, indent=2))
    return JobResult(summary=summary, exit_code=EXIT_INTERRUPTED if report.interrupted else 0)


def _check_policy(policy, action_dim: int, action_mode: str) -> None:
    spec = policy.spec
    if spec.action_mode != action_mode:
        raise UserError(
            f"The policy's actions are '{spec.action_mode}' but the sim runs env.action_mode='{action_mode}'. "
            f"Set env.action_mode={spec.action_mode}."
        )
    if spec.action_dim != action_dim:
        raise UserError(
            f"The policy outputs {spec.action_dim}-dimensional actions; the sim takes {action_dim}. Use a policy "
            "trained on this robot."
        )


class _Status:
    """The live status line: a tqdm bar over control steps with the loop's vital signs."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True, leave=True)
        self.steps = 0
        self.misses = 0
        self.holds = 0
        self.next_refresh = 0.0

    def update(self, record: TickRecord) -> None:
        self.misses += record.deadline_miss
        self.holds += record.safety != 0
        self.bar.update(record.step + 1 - self.steps)
        self.steps = record.step + 1
        now = time.perf_counter()
        if now >= self.next_refresh:
            self.next_refresh = now + STATUS_EVERY_S
            self.bar.set_postfix_str(
                f"queue {record.queue_depth} | infer {record.inference_ms:.0f} ms | obs age {record.obs_age_ms:.1f} ms"
                f" | missed {self.misses} | held {self.holds}",
                refresh=False,
            )

    def close(self, report) -> None:
        self.bar.set_postfix_str(
            f"missed {report.deadline_misses} | held {report.held} | jitter p99 {report.jitter_ms.p99:.2f} ms"
            f" | infer p50 {report.inference_ms.p50:.0f} ms",
            refresh=True,
        )
        self.bar.close()
