"""`dreamrt bench chunking`: chunk scheduling strategies under injected inference delays.

    dreamrt bench chunking policy.path=CKPT [policy.sampler=ddim policy.steps=10]
        [strategies=[sync,naive_async,temporal_ensemble,rtc]] [delays_s=[0.1,0.3]]
        [tasks=[open_drawer,...] | tasks=null] [episodes_per_task=5] [max_ticks=360]
        [execute_steps=null] [num_workers=2] [--json PATH]

Each (strategy, delay) row runs the same evaluation set: single-task CALVIN-style episodes
(``episodes_per_task`` per task, the start states, seeds and instructions of ``dreamrt eval
mode=tasks`` with this ``seed``), each under the control loop in virtual time
(``LoopConfig(mode="virtual", virtual_latency_s=delay)``): every inference takes exactly
``delay`` seconds of simulated time whatever it costs to compute, so a run is deterministic
and as fast as the machine computes, while the loop, the scheduler and the sim are the ones
that run in real time. An episode ends when its task succeeds or after ``max_ticks`` control
steps (360, 12 s at 30 Hz, as the evaluation). ``sync`` waits for every chunk: the steps the
wait covers pass without a command (the sim stands still: they are skipped ticks, counted as
deadline misses), so it gets fewer actions within the same time budget.

Per row: ``success`` (fraction of episodes), and the discontinuity of what the robot was
told to do. For each episode the executed commands (held ticks left out: a hold is the
safety layer's action, not the strategy's) give step-to-step jumps
``max_i |a_t[i] - a_{t-1}[i]|`` over the 6 arm dimensions (position and rotation; the
gripper's open/close flips are left out). A jump is at a **chunk boundary** when its two
commands come from different chunks: each command is traced to the chunk it was copied from
(the scheduler executes a chunk's action as it is, except ``temporal_ensemble``, whose
commands blend several chunks; there a jump counts as a boundary when a new chunk arrived
at that tick). ``max_action_jump`` is the largest jump over all episodes,
``mean_boundary_jump`` / ``max_boundary_jump`` summarise the boundary jumps and
``mean_within_jump`` the others (the policy's own motion), for comparison.

``num_workers`` processes run episodes in parallel (0: in this process); the result does
not depend on it (every seed comes from the episode). A policy without RTC's guided sampling
(``act_guided``) gets RTC's hard freeze of the first d actions only.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult
from dreamrt.policies.factory import PolicyConfig
from dreamrt.runtime.chunking import STRATEGIES
from dreamrt.runtime.robot import MujocoRobot
from dreamrt.sim.env import EnvConfig

ARM_DIMS = 6  # rel_cartesian: xyz, euler; the 7th is the gripper
# Tasks a state policy trained on the CALVIN-style demonstrations does at all (the scene's
# articulations and switches); tasks=null runs all 34.
DEFAULT_TASKS = (
    "open_drawer",
    "close_drawer",
    "move_slider_left",
    "move_slider_right",
    "turn_on_led",
    "turn_off_led",
    "turn_on_lightbulb",
    "turn_off_lightbulb",
)


@dataclass
class BenchChunkingConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # policy.path=CKPT: a chunking policy
    env: EnvConfig = field(default_factory=EnvConfig)
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    delays_s: list[float] = field(default_factory=lambda: [0.1, 0.3])  # injected inference latency
    tasks: list[str] | None = field(default_factory=lambda: list(DEFAULT_TASKS))  # null: all 34
    episodes_per_task: int = 5
    max_ticks: int = 360  # control steps per episode (CALVIN's evaluation gives 360)
    rate_hz: float = 30.0
    execute_steps: int | None = None  # s; null: the strategy's default
    cameras: bool | None = None  # null: on only when the policy reads images
    num_workers: int = 2  # episode processes (0: in this process)
    threads: int = 1  # torch intra-op threads per process (policy.threads wins if set)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        from dreamrt.runtime.bench_loop import check_tasks

        if not self.policy.path:
            raise UserError(
                "`dreamrt bench chunking` compares chunk schedules, so it needs a policy that returns chunks: "
                "policy.path=CKPT (e.g. a DP-T checkpoint). The built-in policies return one action per call."
            )
        if not self.strategies:
            raise UserError(f"strategies=[] runs nothing; list some of {', '.join(STRATEGIES)}.")
        for strategy in self.strategies:
            choose("strategy (in strategies)", strategy, STRATEGIES)
        if not self.delays_s:
            raise UserError("delays_s=[] runs nothing; list inference delays in seconds, e.g. [0.1,0.3].")
        for delay in self.delays_s:
            if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not (0 <= delay < 60):
                raise UserError(
                    f"delays_s contains {delay!r}; expected inference delays in seconds, >= 0 and below 60, "
                    "e.g. delays_s=[0.1,0.3]."
                )
        if len(set(self.strategies)) != len(self.strategies) or len(set(self.delays_s)) != len(self.delays_s):
            raise UserError(
                f"strategies={self.strategies} delays_s={self.delays_s} repeat an entry; list each once."
            )
        for name in ("episodes_per_task", "max_ticks", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name}={value!r}; expected a positive int.")
        if self.execute_steps is not None and self.execute_steps < 1:
            raise UserError(f"execute_steps={self.execute_steps}; expected a positive int or null.")
        for name in ("num_workers", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)}; expected an int >= 0.")
        from dreamrt.runtime.loop import LoopConfig

        LoopConfig(rate_hz=self.rate_hz, max_ticks=self.max_ticks)  # checks the rate
        if self.tasks is not None:
            check_tasks(self.tasks)


# ---------------------------------------------------------------------------- the jump metric


def action_jumps(actions: np.ndarray, dims: int = ARM_DIMS) -> np.ndarray:
    """(T - 1,) jumps between consecutive actions (T, A): the largest abs change over the first ``dims``."""
    a = np.asarray(actions, np.float64)[:, :dims]
    if len(a) < 2:
        return np.zeros(0)
    return np.abs(np.diff(a, axis=0)).max(axis=1)


def chunk_boundaries(sources: list[int | None], arrived: np.ndarray) -> np.ndarray:
    """(T - 1,) bool: whether the jump into command i + 1 crosses a chunk boundary.

    ``sources[i]``: the chunk command i was copied from (None: a blend of several chunks);
    ``arrived[i]``: a chunk arrived at or since the previous command (before command i was sent).
    Two traced commands cross a boundary when their chunks differ; where either is a blend,
    when a chunk arrived in between.
    """
    out = np.zeros(max(len(sources) - 1, 0), bool)
    for i in range(1, len(sources)):
        a, b = sources[i - 1], sources[i]
        out[i - 1] = (a != b) if (a is not None and b is not None) else bool(arrived[i])
    return out


@dataclass
class JumpStats:
    """Jumps of one or more episodes, split at chunk boundaries."""

    boundary: list[float] = field(default_factory=list)
    within: list[float] = field(default_factory=list)

    def add(self, actions: np.ndarray, sources: list[int | None], arrived: np.ndarray) -> None:
        jumps = action_jumps(actions)
        at = chunk_boundaries(sources, arrived)
        self.boundary.extend(jumps[at].tolist())
        self.within.extend(jumps[~at].tolist())

    def merge(self, other: JumpStats) -> None:
        self.boundary.extend(other.boundary)
        self.within.extend(other.within)

    def summary(self) -> dict[str, float | int | None]:
        def stat(values: list[float], fn) -> float | None:
            return round(float(fn(values)), 6) if values else None

        return {
            "max_action_jump": stat(self.boundary + self.within, np.max),
            "mean_boundary_jump": stat(self.boundary, np.mean),
            "max_boundary_jump": stat(self.boundary, np.max),
            "mean_within_jump": stat(self.within, np.mean),
            "boundaries": len(self.boundary),
        }


# ---------------------------------------------------------------------------- one episode


class _CommandLog(MujocoRobot):
    """A MujocoRobot that remembers what the newest ``command`` / ``hold`` sent."""

    last_action: np.ndarray | None = None
    last_commanded = False

    def command(self, action: np.ndarray) -> None:
        super().command(action)
        self.last_action, self.last_commanded = np.array(action, np.float32), True

    def hold(self) -> np.ndarray:
        action = super().hold()
        self.last_action, self.last_commanded = action, False
        return action


class ChunkLog:
    """The policy, keeping every chunk it returns (for tracing commands to chunks)."""

    def __init__(self, policy):
        self.policy = policy
        self.spec = policy.spec
        self.chunks: list[np.ndarray] = []  # (n, A) each, in call order
        if callable(getattr(policy, "observe", None)):
            self.observe = policy.observe
        if callable(getattr(policy, "act_guided", None)):
            self.act_guided = self._act_guided

    def reset(self, seed: int | None = None) -> None:
        self.policy.reset(seed)

    def act(self, observation):
        chunk = self.policy.act(observation)
        self.chunks.append(np.asarray(chunk.actions, np.float32))
        return chunk

    def _act_guided(self, observation, prefix_actions, weights):
        chunk = self.policy.act_guided(observation, prefix_actions, weights)
        self.chunks.append(np.asarray(chunk.actions, np.float32))
        return chunk

    def source(self, action: np.ndarray, newest_first: int = 8) -> int | None:
        """Index of the newest of the last chunks that holds ``action`` exactly; None if none does."""
        for i in range(len(self.chunks) - 1, max(-1, len(self.chunks) - 1 - newest_first), -1):
            if (self.chunks[i] == action).all(axis=1).any():
                return i
        return None


def run_episode(policy, env, spec, strategy: str, delay_s: float, cfg: BenchChunkingConfig) -> dict[str, Any]:
    """One single-task episode under the virtual-time loop; its outcome and jump statistics."""
    from dreamrt.runtime.chunking import SchedulerConfig
    from dreamrt.runtime.clock import VirtualClock
    from dreamrt.runtime.loop import LoopConfig, run_loop
    from dreamrt.sim.tasks import check_success

    loop_cfg = LoopConfig(
        rate_hz=cfg.rate_hz,
        max_ticks=cfg.max_ticks,
        mode="virtual",
        virtual_latency_s=float(delay_s),
        scheduler=SchedulerConfig(strategy=strategy, execute_steps=cfg.execute_steps),
    )
    robot = _CommandLog(env, VirtualClock())
    robot.reset(
        seed=spec.env_seed, options={"symbolic_state": spec.start_state, "instruction": spec.instructions[0]}
    )
    start_scene = robot.last_info["scene_state"]
    logged = ChunkLog(policy)
    logged.reset(spec.policy_seeds[0])
    task = spec.tasks[0]
    commands: list[np.ndarray] = []
    sources: list[int | None] = []
    arrived: list[bool] = []
    pending_arrival = False
    outcome = {"success": False}

    def on_tick(record) -> bool:
        nonlocal pending_arrival
        pending_arrival |= record.chunk_arrived
        if robot.last_commanded:
            commands.append(robot.last_action)
            sources.append(logged.source(robot.last_action) if strategy != "temporal_ensemble" else None)
            arrived.append(pending_arrival)
            pending_arrival = False
        if check_success(task, start_scene, robot.last_info["scene_state"]):
            outcome["success"] = True
            return True
        return False

    report = run_loop(robot, logged, loop_cfg, on_tick=on_tick)
    jumps = JumpStats()
    if commands:
        jumps.add(np.stack(commands), sources, np.asarray(arrived))
    return {
        "index": spec.index,
        "task": task,
        "success": outcome["success"],
        "ticks": report.steps,
        "commanded": report.commanded,
        "held": report.held,
        "deadline_misses": report.deadline_misses,
        "starved_ticks": report.starved_ticks,
        "chunks": len(logged.chunks),
        "rtc_delays": report.rtc_delays,
        "jumps": jumps,
    }


# ---------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}  # per process: the config, the policy and the env


def _init(cfg: BenchChunkingConfig, env_cfg: EnvConfig) -> None:
    from dreamrt.policies.factory import make_policy
    from dreamrt.sim.env import CalvinStyleEnv

    if cfg.policy.threads is None:
        import torch

        torch.set_num_threads(cfg.threads)
    policy = make_policy(cfg.policy, action_dim=7, rate_hz=cfg.rate_hz, scene=cfg.env.scene)
    _close()
    _WORKER.update(cfg=cfg, policy=policy, env=CalvinStyleEnv(env_cfg))


def _close() -> None:
    env = _WORKER.pop("env", None)
    if env is not None:
        env.close()
    _WORKER.clear()


def _episode(job: tuple[str, float, Any]) -> tuple[str, float, dict[str, Any]]:
    strategy, delay, spec = job
    w = _WORKER
    return strategy, delay, run_episode(w["policy"], w["env"], spec, strategy, delay, w["cfg"])


def aggregate(strategy: str, delay_s: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the episodes of one (strategy, delay)."""
    jumps = JumpStats()
    for r in results:
        jumps.merge(r["jumps"])
    delays = [d for r in results for d in r["rtc_delays"]]
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r["task"], []).append(r["success"])
    return {
        "strategy": strategy,
        "delay_ms": round(1e3 * delay_s, 3),
        "episodes": len(results),
        "success": float(np.mean([r["success"] for r in results])),
        **jumps.summary(),
        "ticks": int(sum(r["ticks"] for r in results)),
        "commanded": int(sum(r["commanded"] for r in results)),
        "held": int(sum(r["held"] for r in results)),
        "deadline_misses": int(sum(r["deadline_misses"] for r in results)),
        "starved_ticks": int(sum(r["starved_ticks"] for r in results)),
        "chunks": int(sum(r["chunks"] for r in results)),
        "rtc_delay_p50": float(np.median(delays)) if delays else None,
        "per_task": {t: float(np.mean(v)) for t, v in sorted(per_task.items())},
    }


# ---------------------------------------------------------------------------- the job


def run(cfg: BenchChunkingConfig, out_dir: Path | None = None) -> JobResult:
    from tqdm import tqdm

    from dreamrt.policies.factory import make_policy
    from dreamrt.runtime.bench_policy import single_task_specs
    from dreamrt.sim.evaluate import resolve_env_config
    from dreamrt.sim.rollout import check_policy_fits
    from dreamrt.sim.tasks import task_names

    start = time.perf_counter()
    probe = make_policy(cfg.policy, action_dim=7, rate_hz=cfg.rate_hz, scene=cfg.env.scene)
    env_cfg = resolve_env_config(cfg.env, cfg.cameras, probe)
    check_policy_fits(probe, env_cfg)
    spec = probe.spec
    guided = callable(getattr(probe, "act_guided", None))
    del probe
    tasks = list(cfg.tasks) if cfg.tasks is not None else task_names()
    specs = single_task_specs(tasks, cfg.episodes_per_task, cfg.seed)
    jobs = [(s, float(d), e) for s in cfg.strategies for d in cfg.delays_s for e in specs]
    results: dict[tuple[str, float], list[dict[str, Any]]] = {
        (s, float(d)): [] for s in cfg.strategies for d in cfg.delays_s
    }
    bar = tqdm(total=len(jobs), unit="episode", desc="bench chunking", disable=not cfg.progress)

    def collect(item: tuple[str, float, dict[str, Any]]) -> None:
        strategy, delay, result = item
        results[(strategy, delay)].append(result)
        bar.update(1)

    try:
        if cfg.num_workers == 0:
            threads_before = _torch_threads()
            try:
                _init(cfg, env_cfg)
                for job in jobs:
                    collect(_episode(job))
            finally:
                _close()
                _torch_threads(threads_before)
        else:
            import multiprocessing

            with ProcessPoolExecutor(
                max_workers=cfg.num_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init,
                initargs=(cfg, env_cfg),
            ) as pool:
                for item in pool.map(_episode, jobs, chunksize=1):
                    collect(item)
    finally:
        bar.close()
    rows = []
    for (strategy, delay), episodes in results.items():
        episodes.sort(key=lambda r: r["index"])  # episode order, whichever process ran them
        rows.append(aggregate(strategy, delay, episodes))
    summary: dict[str, Any] = {
        "rows": rows,
        "policy": cfg.policy.path,
        "policy_options": cfg.policy.runtime_options(),
        "horizon": spec.horizon,
        "n_obs_steps": spec.n_obs_steps,
        "execute_steps": cfg.execute_steps,
        "guided": guided,  # rtc inpaints towards the previous chunk (else: the hard freeze only)
        "evaluation": {
            "tasks": tasks,
            "episodes_per_task": cfg.episodes_per_task,
            "max_ticks": cfg.max_ticks,
            "seed": cfg.seed,
        },
        "rate_hz": cfg.rate_hz,
        "wall_s": round(time.perf_counter() - start, 2),
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(summary))
    return JobResult(summary=summary)


def _torch_threads(value: int | None = None) -> int | None:
    """Set torch's intra-op threads (when given and torch is loaded); return the previous value."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return None
    before = torch.get_num_threads()
    if value is not None:
        torch.set_num_threads(value)
    return before


def format_table(summary: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = (
        f"{'strategy':<19}{'delay ms':>9}{'episodes':>9}{'success':>9}{'max jump':>10}{'bnd mean':>10}"
        f"{'bnd max':>10}{'in mean':>10}{'held':>7}{'missed':>8}{'chunks':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        lines.append(
            f"{r['strategy']:<19}{r['delay_ms']:>9g}{r['episodes']:>9}{r['success']:>9.3f}"
            f"{num(r['max_action_jump'], '.4f'):>10}{num(r['mean_boundary_jump'], '.4f'):>10}"
            f"{num(r['max_boundary_jump'], '.4f'):>10}{num(r['mean_within_jump'], '.4f'):>10}"
            f"{r['held']:>7}{r['deadline_misses']:>8}{r['chunks']:>8}"
        )
    ev = summary["evaluation"]
    lines.append(
        f"{summary['policy']} (H={summary['horizon']}), virtual time at {summary['rate_hz']:g} Hz; "
        f"{len(ev['tasks'])} tasks x {ev['episodes_per_task']} episodes, <= {ev['max_ticks']} ticks each. "
        "jump = max abs step-to-step change of the 6 arm dims of the commands; bnd = at chunk boundaries, "
        "in = within chunks; missed = ticks skipped by sync waits"
    )
    return "\n".join(lines)
