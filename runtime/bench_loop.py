"""`dreamrt bench loop`: the real-time loop's timing over many ticks, idle and with a CPU hog.

    dreamrt bench loop [policy.path=CKPT policy.sampler=ddim policy.steps=10 | policy=expert]
        [ticks=10000] [loads=[idle,hog]] [strategy=auto|sync|naive_async|temporal_ensemble|rtc]
        [max_episode_ticks=360] [cameras=null|true|false] [realtime_priority=null|10] [threads=1]
        [--json PATH]

For each load condition the loop runs ``ticks`` control steps at ``rate_hz`` in real time
(``LoopConfig(mode="real")``) with the policy driving a :class:`~dreamrt.runtime.robot.MujocoRobot`
over the CALVIN-style scene, without ever stopping the clock:

- ``idle``: nothing else is started (the machine's other processes still run: say so when
  reporting; the summary records the load average before each run);
- ``hog``: one extra process spins a CPU-bound busy loop, pinned to one core (the last core
  this process may use), for the whole run; it is killed and reaped afterwards.

Episodes follow one another inside the run: :class:`EpisodicRobot` resets the scene into the
next episode (tasks in turn, each from a random protocol start state where it can be done,
seeded) inside the tick whose step ends the current one, when the task succeeds or after
``max_episode_ticks`` steps. The reset's cost is measured (``reset_ms_*``) and the deadline
misses on reset ticks and the tick after are counted apart (``misses_at_resets``); a reset of
this scene takes about 1.5 ms, well inside a 33 ms period. The policy is reset (its history
and noise seed) on the worker thread when it first sees an observation of the new episode;
actions already queued from the old episode's last chunk still run until a new chunk
arrives, as they would on a robot whose task changed.

The strategy ``auto`` is ``rtc`` for chunking policies (horizon > 1) and ``sync`` for
one-action policies such as the scripted expert, which cannot run ahead of its latency.
A checkpoint policy runs with ``threads`` torch threads (1 by default: more fight the loop
on a small machine) and is called ``warmup`` times before each run (the first calls are far
slower than the steady state).

Rows (``--json``: ``{"rows": [...], ...}``), one per load: ``strategy``, ``load``, ``ticks``
(control steps covered), ``deadline_misses``, ``jitter_ms_p99`` and the rest of
:class:`~dreamrt.runtime.metrics.LoopReport` (jitter p50/max, tick work, inference latency
p50/p99/max, holds, starved ticks, episodes, resets). Each run's full report (without the
per-tick records) is written to ``loop_<load>.json`` in the run directory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError, choose, did_you_mean
from dreamrt.jobs import JobResult
from dreamrt.policies.factory import PolicyConfig
from dreamrt.runtime.chunking import STRATEGIES
from dreamrt.runtime.robot import MujocoRobot
from dreamrt.sim.env import EnvConfig

LOADS = ("idle", "hog")
EPISODE_KEY = "bench.episode"  # observation key: the episode the observation belongs to
STATUS_EVERY_S = 0.25  # wall seconds between progress-bar refreshes (drawn on the loop thread)
HOG_START_TIMEOUT_S = 60.0


@dataclass
class BenchLoopConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # policy.path=CKPT, or policy=expert
    env: EnvConfig = field(default_factory=EnvConfig)
    ticks: int = 10_000  # control steps per load condition
    rate_hz: float = 30.0
    loads: list[str] = field(default_factory=lambda: ["idle", "hog"])  # idle | hog
    strategy: str = "auto"  # auto (rtc for chunking policies, sync for one-action ones) or a strategy
    execute_steps: int | None = None  # s; null: the strategy's default
    max_episode_ticks: int = 360  # an episode that has not succeeded by then is reset
    tasks: list[str] | None = None  # tasks the episodes cycle through; null: all 34
    cameras: bool | None = None  # null: on only when the policy reads images
    realtime_priority: int | None = None  # SCHED_FIFO for the loop (LoopConfig.realtime_priority)
    threads: int = 1  # torch intra-op threads for a checkpoint policy (policy.threads wins if set)
    warmup: int = 3  # untimed policy calls before each run
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        choose("strategy", self.strategy, ("auto", *STRATEGIES))
        if not self.loads:
            raise UserError("loads=[] measures nothing; use loads=[idle,hog] or one of them.")
        for load in self.loads:
            choose("load (in loads)", load, LOADS)
        if len(set(self.loads)) != len(self.loads):
            raise UserError(f"loads={self.loads} lists a load twice; list each once.")
        for name in ("ticks", "max_episode_ticks", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name}={value!r}; expected a positive int.")
        if self.execute_steps is not None and self.execute_steps < 1:
            raise UserError(f"execute_steps={self.execute_steps}; expected a positive int or null.")
        for name in ("warmup", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)}; expected an int >= 0.")
        # rate_hz and realtime_priority are checked by LoopConfig, built here to fail early.
        from dreamrt.runtime.loop import LoopConfig

        LoopConfig(rate_hz=self.rate_hz, max_ticks=self.ticks, realtime_priority=self.realtime_priority)
        if self.tasks is not None:
            check_tasks(self.tasks)


def check_tasks(tasks: list[str]) -> None:
    """A UserError for an empty list or an unknown task name."""
    from dreamrt.sim.tasks import task_names

    names = task_names()
    if not tasks:
        raise UserError("tasks=[] selects nothing; leave tasks unset (null) for all 34 tasks.")
    for t in tasks:
        if t not in names:
            raise UserError(
                f"Unknown task {t!r} in tasks.{did_you_mean(t, names)} Valid: {', '.join(names)}."
            )


def resolve_strategy(strategy: str, horizon: int) -> str:
    """``auto``: rtc for chunking policies, sync for one action per call."""
    if strategy != "auto":
        return strategy
    return "rtc" if horizon > 1 else "sync"


# ---------------------------------------------------------------------------- the CPU hog


def _spin(ready) -> None:
    ready.set()
    while True:
        pass


def start_hog() -> multiprocessing.Process:
    """A process spinning on one core (the last one this process may run on) until stopped."""
    ctx = multiprocessing.get_context("spawn")  # a clean child: no copy of torch's threads or GL state
    ready = ctx.Event()
    proc = ctx.Process(target=_spin, args=(ready,), name="dreamrt-cpu-hog", daemon=True)
    proc.start()
    try:
        if not ready.wait(HOG_START_TIMEOUT_S):
            raise RuntimeError(f"the CPU hog process did not start within {HOG_START_TIMEOUT_S:.0f} s")
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(proc.pid, {max(os.sched_getaffinity(0))})
    except BaseException:
        stop_hog(proc)
        raise
    return proc


def stop_hog(proc: multiprocessing.Process) -> None:
    """Terminate and reap the hog (SIGKILL if SIGTERM does not end it)."""
    proc.terminate()
    proc.join(5.0)
    if proc.is_alive():
        proc.kill()
        proc.join()


# ---------------------------------------------------------------------------- episodes inside one run


@dataclass(frozen=True)
class Episode:
    index: int
    task: str
    instruction: str
    start_state: Any  # a protocol SymbolicState in which the task can be done
    env_seed: int
    policy_seed: int


def episode_stream(tasks: list[str], seed: int) -> Iterator[Episode]:
    """Endless episodes: the tasks in turn, each from a random protocol start state that allows it (seeded)."""
    from dreamrt.sim import protocol
    from dreamrt.sim.language import eval_instruction
    from dreamrt.sim.rollout import derive_seed

    states = {t: protocol.states_for(t) for t in tasks}  # computed now, not inside a tick
    instructions = {t: eval_instruction(t) for t in tasks}
    i = 0
    while True:
        task = tasks[i % len(tasks)]
        pick = int(np.random.default_rng([seed, i]).integers(len(states[task])))
        yield Episode(
            i, task, instructions[task], states[task][pick], derive_seed(seed, i, 0), derive_seed(seed, i, 1)
        )
        i += 1


class EpisodicRobot(MujocoRobot):
    """A MujocoRobot that starts the next episode inside the tick that ends the current one.

    After each env step (``command`` or ``hold``) the episode's task is checked; on success or
    after ``max_episode_ticks`` steps the scene is reset into the next episode of
    ``episodes`` and the reset's wall time is recorded. Observations carry the episode index
    under ``bench.episode`` (for :class:`EpisodePolicy`).
    """

    def __init__(self, env, clock, episodes: Iterator[Episode], max_episode_ticks: int):
        from dreamrt.sim.tasks import check_success

        super().__init__(env, clock)
        self._check_success = check_success
        self.episodes = episodes
        self.max_episode_ticks = max_episode_ticks
        self.episode: Episode | None = None
        self.start_scene = None  # the scene when the episode began (the success check's reference)
        self.episode_ticks = 0
        self.executed = 0  # env steps over all episodes (= the loop's executed ticks)
        self.ended = 0  # episodes finished (success or timeout)
        self.successes = 0
        self.reset_s: list[float] = []  # wall time of each in-loop reset
        self.reset_ticks: list[int] = []  # executed-tick index (0-based) of each in-loop reset

    def start(self):
        """Reset into the first episode (before the loop); returns the observation."""
        self._next_episode()
        return self.observe()

    def _next_episode(self) -> None:
        episode = self.episode = next(self.episodes)
        self.reset(
            seed=episode.env_seed,
            options={"symbolic_state": episode.start_state, "instruction": episode.instruction},
        )
        self.start_scene = self.last_info["scene_state"]
        self.episode_ticks = 0

    def observe(self):
        obs = super().observe()
        obs[EPISODE_KEY] = self.episode.index
        return obs

    def _step(self, action: np.ndarray) -> None:
        super()._step(action)
        self.executed += 1
        self.episode_ticks += 1
        success = self._check_success(self.episode.task, self.start_scene, self.last_info["scene_state"])
        if success or self.episode_ticks >= self.max_episode_ticks:
            self.ended += 1
            self.successes += bool(success)
            start = time.perf_counter()
            self._next_episode()
            self.reset_s.append(time.perf_counter() - start)
            self.reset_ticks.append(self.executed - 1)


class EpisodePolicy:
    """The policy, reset to the episode's seed when it first sees an observation of a new episode.

    Every call comes from the loop's inference worker, in step order, so the reset happens on
    the worker's thread between two of its calls, never during one.
    """

    def __init__(self, policy, seed_of=None):
        self.policy = policy
        self.spec = policy.spec
        self.seed_of = seed_of  # episode index -> policy seed
        self.episode: int | None = None
        if callable(getattr(policy, "act_guided", None)):
            self.act_guided = self._act_guided
        if callable(getattr(policy, "observe", None)):
            self.observe = self._observe

    def _sync(self, observation) -> None:
        episode = observation.get(EPISODE_KEY)
        if episode != self.episode:
            self.episode = episode
            self.policy.reset(None if self.seed_of is None else self.seed_of(episode))

    def reset(self, seed: int | None = None) -> None:
        self.episode = None
        self.policy.reset(seed)

    def _observe(self, observation) -> None:
        self._sync(observation)
        self.policy.observe(observation)

    def act(self, observation):
        self._sync(observation)
        return self.policy.act(observation)

    def _act_guided(self, observation, prefix_actions, weights):
        self._sync(observation)
        return self.policy.act_guided(observation, prefix_actions, weights)


# ---------------------------------------------------------------------------- one run


class _Progress:
    """A tqdm bar over control steps, refreshed a few times a second from the loop thread."""

    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="tick", desc=desc, disable=not enabled, dynamic_ncols=True)
        self.done = 0
        self.misses = 0
        self.next_refresh = 0.0

    def __call__(self, record) -> bool:
        self.misses += record.deadline_miss
        now = time.perf_counter()
        if now >= self.next_refresh:
            self.next_refresh = now + STATUS_EVERY_S
            self.bar.set_postfix_str(f"missed {self.misses}", refresh=False)
            self.bar.update(record.step + 1 - self.done)
            self.done = record.step + 1
        return False

    def close(self, steps: int) -> None:
        self.bar.update(steps - self.done)
        self.bar.close()


def run_once(cfg: BenchLoopConfig, policy, env_cfg: EnvConfig, strategy: str, load: str) -> dict[str, Any]:
    """One real-time run of ``cfg.ticks`` steps under ``load``; the row and the full report summary."""
    from dreamrt.runtime.chunking import SchedulerConfig
    from dreamrt.runtime.clock import make_clock
    from dreamrt.runtime.loop import LoopConfig, run_loop
    from dreamrt.sim.env import CalvinStyleEnv
    from dreamrt.sim.rollout import derive_seed
    from dreamrt.sim.tasks import task_names

    loop_cfg = LoopConfig(
        rate_hz=cfg.rate_hz,
        max_ticks=cfg.ticks,
        mode="real",
        realtime_priority=cfg.realtime_priority,
        scheduler=SchedulerConfig(strategy=strategy, execute_steps=cfg.execute_steps),
    )
    tasks = list(cfg.tasks) if cfg.tasks is not None else task_names()
    env = CalvinStyleEnv(env_cfg)
    hog = None
    try:
        robot = EpisodicRobot(
            env, make_clock("real", loop_cfg.spin_s), episode_stream(tasks, cfg.seed), cfg.max_episode_ticks
        )
        first = robot.start()
        wrapped = EpisodePolicy(policy, seed_of=lambda i: derive_seed(cfg.seed, i, 1))
        for _ in range(cfg.warmup):  # the first calls (allocations, lazy init) are far slower
            policy.reset(0)
            policy.act(first)
        wrapped.reset(None)
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        if load == "hog":
            hog = start_hog()
        progress = _Progress(cfg.ticks, f"{strategy} {load}", cfg.progress)
        try:
            report = run_loop(robot, wrapped, loop_cfg, on_tick=progress)
        finally:
            progress.close(cfg.ticks)
    finally:
        if hog is not None:
            stop_hog(hog)
        env.close()
    records = report.records
    at_resets = sum(
        records[i].deadline_miss + (records[i + 1].deadline_miss if i + 1 < len(records) else 0)
        for i in robot.reset_ticks
        if i < len(records)
    )
    reset_ms = 1e3 * np.asarray(robot.reset_s) if robot.reset_s else np.full(1, np.nan)
    r = report
    row = {
        "strategy": r.strategy,
        "load": load,
        "ticks": r.steps,
        "deadline_misses": r.deadline_misses,
        "jitter_ms_p99": r.jitter_ms.p99,
        "jitter_ms_p50": r.jitter_ms.p50,
        "jitter_ms_max": r.jitter_ms.max,
        "executed_ticks": r.ticks,
        "misses_at_resets": at_resets,
        "tick_ms_p50": r.tick_ms.p50,
        "tick_ms_p99": r.tick_ms.p99,
        "inference_ms_p50": r.inference_ms.p50,
        "inference_ms_p99": r.inference_ms.p99,
        "inference_ms_max": r.inference_ms.max,
        "inferences": r.inferences,
        "inference_errors": r.inference_errors,
        "held": r.held,
        "starved_ticks": r.starved_ticks,
        "safety_events": r.safety_events,
        "queue_depth_p50": r.queue_depth.p50,
        "rtc_delay_p50": float(np.median(r.rtc_delays)) if r.rtc_delays else None,
        "execute_steps": r.execute_steps,
        "horizon": r.horizon,
        "episodes": robot.ended,
        "successes": robot.successes,
        "resets": len(robot.reset_s),
        "reset_ms_p50": float(np.percentile(reset_ms, 50)),
        "reset_ms_max": float(reset_ms.max()),
        "realtime": r.realtime,
        "wall_s": r.wall_s,
        "load_average_before": list(load_before) if load_before else None,
        "hog_pid": hog.pid if hog is not None else None,
        "interrupted": r.interrupted,
    }
    row = {k: _json_float(v) for k, v in row.items()}
    return {"row": row, "report": report.summary()}


def _json_float(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if np.isfinite(value) else None
    return value


# ---------------------------------------------------------------------------- the job


def run(cfg: BenchLoopConfig, out_dir: Path | None = None) -> JobResult:
    from dreamrt.policies.factory import make_policy
    from dreamrt.sim.evaluate import resolve_env_config
    from dreamrt.sim.rollout import check_policy_fits

    start = time.perf_counter()
    policy = make_policy(cfg.policy, action_dim=7, rate_hz=cfg.rate_hz, scene=cfg.env.scene)
    env_cfg = resolve_env_config(cfg.env, cfg.cameras, policy)
    check_policy_fits(policy, env_cfg)
    strategy = resolve_strategy(cfg.strategy, policy.spec.horizon)
    threads_before = None
    if cfg.policy.path is not None and cfg.policy.threads is None:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
    rows, reports = [], {}
    try:
        for load in cfg.loads:
            result = run_once(cfg, policy, env_cfg, strategy, load)
            rows.append(result["row"])
            reports[load] = result["report"]
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                (Path(out_dir) / f"loop_{load}.json").write_text(
                    json.dumps(result["report"], indent=1) + "\n"
                )
    finally:
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)
    summary: dict[str, Any] = {
        "rows": rows,
        "policy": cfg.policy.path or cfg.policy.name,
        "policy_options": cfg.policy.runtime_options(),
        "strategy": strategy,
        "rate_hz": cfg.rate_hz,
        "ticks": cfg.ticks,
        "cameras": env_cfg.cameras,
        "threads": cfg.policy.threads or (cfg.threads if cfg.policy.path else None),
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.perf_counter() - start, 2),
    }
    if out_dir is not None:
        (Path(out_dir) / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(summary))
    return JobResult(summary=summary)


def format_table(summary: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = (
        f"{'strategy':<19}{'load':<6}{'ticks':>7}{'misses':>8}{'@reset':>8}{'jit p50':>9}{'jit p99':>9}"
        f"{'jit max':>9}{'inf p50':>9}{'inf p99':>9}{'held':>6}{'starved':>9}{'rt':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        lines.append(
            f"{r['strategy']:<19}{r['load']:<6}{r['ticks']:>7}{r['deadline_misses']:>8}{r['misses_at_resets']:>8}"
            f"{num(r['jitter_ms_p50'], '.3f'):>9}{num(r['jitter_ms_p99'], '.3f'):>9}{num(r['jitter_ms_max'], '.2f'):>9}"
            f"{num(r['inference_ms_p50'], '.1f'):>9}{num(r['inference_ms_p99'], '.1f'):>9}{r['held']:>6}"
            f"{r['starved_ticks']:>9}{'yes' if r['realtime'] else 'no':>5}"
        )
    lines.append(
        f"{summary['policy']} at {summary['rate_hz']:g} Hz, real time; ms; jit = wake-up lateness; inf = inference "
        "latency (warm-up excluded); @reset = misses on episode-reset ticks and the tick after; rt = SCHED_FIFO"
    )
    return "\n".join(lines)
