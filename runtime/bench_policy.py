"""`dreamrt bench policy`: per-chunk latency and success of a DP-T policy over samplers, caches and backends.

    dreamrt bench policy policy.path=CKPT [student=STUDENT] [teacher=TEACHER]
        [samplers=[ddpm-100,ddim-10,consistency-1,consistency-3]] [caches=[none,bac]]
        [backends=[torch,onnxruntime]] [threads=1] [repeats=30] [dataset=STORE]
        [success=true] [episodes_per_task=1] [tasks=[open_drawer,...]] [chains=0] [--json PATH]

Checkpoints. ``policy.path`` is a teacher (a diffusion policy) or a consistency student
(``dreamrt distill``), told apart by the sampler its checkpoint saves. ``teacher=`` and
``student=`` name either explicitly; a student's run directory records its teacher
(``teacher.json``), which is used when no teacher is given. DDPM / DDIM rows run on the
teacher, consistency rows on the student; rows without their checkpoint are listed as skipped.

Rows: every ``samplers`` x ``caches`` x ``backends`` combination (a sampler is ``name-steps``:
ddpm-100, ddim-10, consistency-1 ...), each built by :func:`dreamrt.policies.factory.load_policy`
as a job would (``policy.sampler/steps/cache/backend/threads``). Caching (``bac``, ``uniform``)
applies to multi-step DDPM / DDIM only. A ``bac`` row uses the checkpoint's
``bac_schedule.json`` when it fits the row's sampler, else a schedule calibrated here on the
benchmark's observations (:func:`dreamrt.runtime.bac_calibrate.calibrate`, budget
``min(cache_updates, ceil(K / 2))`` of K steps), saved into the run directory.

Latency: ``act()`` at batch 1 on real observations (``observations`` frames spread over the
episode store ``dataset``, or the first observation after resets of the evaluation set's
start states), ``warmup`` calls first, then ``repeats`` timed calls per row, interleaved over
the rows in rounds so that drift in the machine's speed (other processes) hits every row
alike. Per row: p50 / p99 / mean ms per chunk, the encoder's share (the ``policy.encoder``
module, timed by hooks; the rest is the denoiser calls, the sampler arithmetic and the
pre/post-processing), and the mean abs difference of one chunk from the same-noise chunk of
the plain torch policy with the same sampler (~1e-6 for onnxruntime; caching's error for
caches). torch runs with ``threads`` intra-op threads, onnxruntime with ``threads`` and torch
at one thread (see :mod:`dreamrt.policies.factory`).

Success (``success=false`` skips it): ``episodes_per_task`` single-task rollouts for each of
``tasks`` (default all 34), the episodes of ``dreamrt eval mode=tasks`` with the same ``seed``
(start states among the reachable states where the task can be done, evaluation
instructions), and ``chains`` CALVIN chains (avg_len), those of ``dreamrt eval``. The backend does not change what a policy does (same noise, outputs within ~1e-6),
so by default each sampler x cache is rolled out once, on onnxruntime when listed (the fast
one), and the other backends' rows carry that result with ``success_backend`` saying where it
came from; ``success_per_backend=true`` rolls every row out.

Summary (``--json``): ``{"rows": [...], "skipped": [...], ...}``; each row has ``sampler``,
``steps``, ``cache``, ``backend``, ``latency_ms_p50``, ``latency_ms_p99``, ``success``
(+ ``avg_len`` with chains) and the fields above.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dreamrt.errors import UserError, choose, did_you_mean
from dreamrt.jobs import JobResult
from dreamrt.sim.env import EnvConfig

if TYPE_CHECKING:
    from dreamrt.policies.factory import PolicyConfig

SAMPLER_NAMES = ("ddpm", "ddim", "consistency")
CACHES = ("none", "bac", "uniform")
BACKENDS = ("torch", "onnxruntime")
ROUNDS = 3  # timed calls of a row are spread over this many passes over all rows
TEACHER_FILE = "teacher.json"  # what `dreamrt distill` writes into a student's run directory


@dataclass
class BenchPolicySection:
    path: str = ""  # a teacher or a consistency student checkpoint (or a run directory); auto-detected


@dataclass
class BenchPolicyConfig:
    policy: BenchPolicySection = field(default_factory=BenchPolicySection)
    teacher: str = ""  # the diffusion policy of the DDPM / DDIM rows (or via policy.path)
    student: str = ""  # the consistency student of the consistency rows (or via policy.path)
    samplers: list[str] = field(
        default_factory=lambda: ["ddpm-100", "ddim-10", "consistency-1", "consistency-3"]
    )
    caches: list[str] = field(default_factory=lambda: ["none", "bac"])  # none | bac | uniform
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    cache_updates: int = 10  # BAC budget of an on-the-fly calibration (and uniform's), for 100 steps
    threads: int | None = 1  # CPU threads of each backend (null: library defaults)
    dataset: str = ""  # latency observations from this episode store; empty: env resets
    observations: int = 8  # distinct observations cycled through (and calibrated on)
    warmup: int = 3  # untimed act() calls per row
    repeats: int = 30  # timed act() calls per row
    success: bool = True  # roll out the evaluation set (false: latency only)
    episodes_per_task: int = 1  # single-task rollouts per task
    tasks: list[str] | None = None  # null: all 34 tasks
    chains: int = 0  # CALVIN chains per row (avg_len); 0: none
    success_per_backend: bool = False  # roll out every backend's row (false: once per sampler x cache)
    num_workers: int = 2  # rollout processes
    max_steps_per_subtask: int = 360
    env: EnvConfig = field(default_factory=EnvConfig)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not (self.policy.path or self.teacher or self.student):
            raise UserError(
                "`dreamrt bench policy` needs a checkpoint: policy.path=CKPT (a teacher or a consistency student), "
                "or teacher=PATH and/or student=PATH."
            )
        if not self.samplers:
            raise UserError("samplers=[] benchmarks nothing; list e.g. [ddpm-100,ddim-10].")
        for spec in self.samplers:
            parse_sampler(spec)
        for cache in self.caches:
            choose("cache (in caches)", cache, CACHES)
        for backend in self.backends:
            choose("backend (in backends)", backend, BACKENDS)
        if not self.caches or not self.backends:
            raise UserError(
                "caches and backends need at least one entry each, e.g. caches=[none] backends=[torch]."
            )
        for name in (
            "cache_updates",
            "observations",
            "repeats",
            "episodes_per_task",
            "max_steps_per_subtask",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}; expected a positive int.")
        for name in ("warmup", "chains", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)}; expected an int >= 0.")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads={self.threads}; expected a positive int or null (library defaults).")
        if self.tasks is not None:
            from dreamrt.sim.tasks import task_names

            names = task_names()
            if not self.tasks:
                raise UserError("tasks=[] selects nothing; leave tasks unset (null) for all 34 tasks.")
            for t in self.tasks:
                if t not in names:
                    raise UserError(
                        f"Unknown task {t!r} in tasks.{did_you_mean(t, names)} Valid: {', '.join(names)}."
                    )


def parse_sampler(spec: str) -> tuple[str, int | None]:
    """``ddpm-100`` -> ("ddpm", 100); a bare name takes the factory's default step count."""
    name, _, steps = str(spec).partition("-")
    if name not in SAMPLER_NAMES or (steps and not steps.isdigit()) or steps == "0":
        raise UserError(
            f"Sampler {spec!r} in samplers is not NAME-STEPS with NAME one of {', '.join(SAMPLER_NAMES)} and "
            f"STEPS a positive int.{did_you_mean(name, SAMPLER_NAMES)} Example: samplers=[ddpm-100,ddim-10,consistency-1]."
        )
    return name, int(steps) if steps else None


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Row:
    sampler: str
    steps: int | None
    cache: str
    backend: str
    role: str  # "teacher" | "student"
    checkpoint: str

    @property
    def group(self) -> tuple[str, int | None, str]:
        return (self.sampler, self.steps, self.cache)

    def uniform_updates(self, budget: int) -> int:
        """The on-the-fly budget rule (as for BAC): at most half of the sampler's steps."""
        return budget if self.steps is None else min(budget, math.ceil(self.steps / 2))

    def policy_config(self, cfg: BenchPolicyConfig) -> PolicyConfig:
        from dreamrt.policies.factory import PolicyConfig

        return PolicyConfig(
            path=self.checkpoint,
            sampler=self.sampler,
            steps=self.steps,
            cache=self.cache,
            cache_updates=self.uniform_updates(cfg.cache_updates) if self.cache == "uniform" else None,
            backend=self.backend,
            threads=cfg.threads,
        )


def resolve_checkpoints(cfg: BenchPolicyConfig) -> tuple[Path | None, Path | None, list[str]]:
    """(teacher, student, notes) from policy.path / teacher / student and a student's teacher.json."""
    from dreamrt.policies.factory import is_consistency_student
    from dreamrt.training.checkpoint import resolve_checkpoint

    notes: list[str] = []
    teacher = resolve_checkpoint(cfg.teacher) if cfg.teacher else None
    student = resolve_checkpoint(cfg.student) if cfg.student else None
    if cfg.policy.path:
        main = resolve_checkpoint(cfg.policy.path)
        role = "student" if is_consistency_student(main) else "teacher"
        given = student if role == "student" else teacher
        if given is not None and given != main:
            raise UserError(
                f"policy.path={cfg.policy.path} is a {role}, and {role}={given} names another one; give each once."
            )
        teacher, student = (teacher, main) if role == "student" else (main, student)
    if teacher is not None and is_consistency_student(teacher):
        raise UserError(f"teacher={teacher} is a consistency student; pass it as student=PATH.")
    if student is not None and not is_consistency_student(student):
        raise UserError(
            f"student={student} samples with a diffusion sampler, not the consistency sampler: it is not a "
            "`dreamrt distill` student. Pass it as teacher=PATH (or policy.path)."
        )
    if student is not None and teacher is None:
        record = student.parent.parent / TEACHER_FILE  # <run>/checkpoints/step_N -> <run>/teacher.json
        if record.is_file():
            try:
                path = Path(json.loads(record.read_text())["path"])
            except (ValueError, KeyError, TypeError):
                path = None
            if path is not None and path.exists():
                teacher = resolve_checkpoint(path)
                notes.append(f"teacher {teacher} from {record}")
    return teacher, student, notes


def plan_rows(
    cfg: BenchPolicyConfig, teacher: Path | None, student: Path | None
) -> tuple[list[Row], list[dict[str, Any]]]:
    """The rows to run, in table order, and the combinations skipped with the reason."""
    rows, skipped = [], []
    for spec in cfg.samplers:
        name, steps = parse_sampler(spec)
        role, checkpoint = ("student", student) if name == "consistency" else ("teacher", teacher)
        for cache in cfg.caches:
            for backend in cfg.backends:
                entry = {"sampler": name, "steps": steps, "cache": cache, "backend": backend}
                if checkpoint is None:
                    why = (
                        "no consistency student (student=PATH)"
                        if role == "student"
                        else "no teacher (teacher=PATH)"
                    )
                    skipped.append({**entry, "reason": why})
                elif cache != "none" and (name == "consistency" or (steps is not None and steps < 2)):
                    skipped.append({**entry, "reason": "caching applies to multi-step DDPM / DDIM samplers"})
                else:
                    rows.append(Row(name, steps, cache, backend, role, str(checkpoint)))
    return rows, skipped


# ---------------------------------------------------------------------------- evaluation set and observations


def single_task_specs(tasks: list[str], episodes_per_task: int, seed: int) -> list:
    """The single-task episodes of ``dreamrt eval mode=tasks`` (:func:`dreamrt.sim.evaluate.task_specs`) for
    ``tasks``: the same start states and seeds as the full 34-task set, renumbered from 0."""
    from dreamrt.sim.evaluate import task_specs

    wanted = set(tasks)
    chosen = [s for s in task_specs(episodes_per_task, seed, 0) if s.tasks[0] in wanted]
    return [replace(s, index=i) for i, s in enumerate(chosen)]


def _policy_keys(policy: Any) -> list[str]:
    c = policy.config
    return [*c.lowdim_keys, *c.image_keys]


def store_observations(path: str, policy: Any, count: int) -> list[dict[str, Any]]:
    """``count`` frames spread evenly over an episode store, as per-step observations with ``task``."""
    from dreamrt.episodes import open_store

    store = open_store(path)
    if store.num_frames == 0:
        raise UserError(f"The episode store {path} has no frames; record some or drop dataset=.")
    keys = _policy_keys(policy)
    missing = [k for k in keys if k not in store.keys]
    if missing:
        raise UserError(
            f"The episode store {path} lacks {missing}, which the policy reads; it has {store.user_keys}."
        )
    rows = np.unique(np.linspace(0, store.num_frames - 1, count).round().astype(int))
    tasks = store.tasks
    out = []
    for i in rows:
        obs = {k: store.read(k, int(i), int(i) + 1)[0] for k in keys}
        obs["task"] = tasks[int(store.read("task_index", int(i), int(i) + 1)[0])] if tasks else ""
        out.append(obs)
    return out


def env_observations(env_cfg: EnvConfig, specs: list, count: int) -> list[dict[str, Any]]:
    """The first observation after resetting into each of the first ``count`` specs' start states."""
    from dreamrt.sim.env import CalvinStyleEnv

    env = CalvinStyleEnv(env_cfg)
    try:
        out = []
        for spec in specs[:count]:
            obs, _ = env.reset(
                seed=spec.env_seed,
                options={"symbolic_state": spec.start_state, "instruction": spec.instructions[0]},
            )
            out.append(obs)
        return out
    finally:
        env.close()


def observation_windows(
    observations: list[dict[str, Any]], keys: list[str], n_obs_steps: int
) -> dict[str, Any]:
    """A batch of (N, To, ...) windows, each one observation repeated To times (as ``act`` pads after reset)."""
    batch: dict[str, Any] = {
        k: np.stack([np.stack([o[k]] * n_obs_steps) for o in observations]) for k in keys
    }
    batch["task"] = [str(o.get("task", "")) for o in observations]
    return batch


# ---------------------------------------------------------------------------- BAC schedules


def bac_schedule(
    checkpoint: str, name: str, steps: int | None, observations: list, cfg: BenchPolicyConfig
) -> tuple[Any, str]:
    """(schedule, source) for a bac row: the checkpoint's bac_schedule.json when it fits, else calibrated now."""
    import torch

    from dreamrt.policies.factory import PolicyConfig, load_policy
    from dreamrt.runtime.bac import SCHEDULE_FILE, check_schedule, load_schedule
    from dreamrt.runtime.bac_calibrate import calibrate
    from dreamrt.runtime.bac_schedule import SchedulerConfig

    policy = load_policy(checkpoint, PolicyConfig(path=checkpoint, sampler=name, steps=steps))
    path = Path(checkpoint) / SCHEDULE_FILE
    if path.is_file():
        schedule = load_schedule(path)
        try:
            check_schedule(schedule, policy.model, policy.sampler)
            return schedule, f"checkpoint ({path})"
        except UserError:
            pass  # made for another sampler: calibrate one for this row
    k = len(policy.sampler.timesteps)
    budget = SchedulerConfig(num_updates=min(cfg.cache_updates, math.ceil(k / 2)))
    windows = observation_windows(observations, _policy_keys(policy), policy.config.n_obs_steps)
    with torch.inference_mode():
        features = policy.encode_observations(windows)  # (N, To, O)
    g = torch.Generator().manual_seed(cfg.seed)
    schedule, _ = calibrate(
        policy.model, policy.sampler, features, budget, generator=g, source="bench policy"
    )
    return schedule, f"calibrated here on {features.shape[0]} observations, {budget.num_updates} updates"


# ---------------------------------------------------------------------------- latency


class _EncoderTimer:
    """Seconds spent in ``policy.encoder`` per call, from forward hooks (works for torch and onnxruntime)."""

    def __init__(self, module: Any):
        self.samples: list[float] = []
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.samples.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _set_threads(backend: str, threads: int | None, default: int) -> None:
    import torch

    torch.set_num_threads(1 if backend == "onnxruntime" else (threads or default))


def time_rows(
    policies: list[Any], rows: list[Row], observations: list, cfg: BenchPolicyConfig, default_threads: int
) -> list[dict[str, float]]:
    """Per row p50 / p99 / mean chunk latency and encoder time (ms), the rows interleaved in rounds."""
    chunk: list[list[float]] = [[] for _ in rows]
    timers = [_EncoderTimer(p.encoder) for p in policies]
    try:
        for policy, row in zip(policies, rows):
            _set_threads(row.backend, cfg.threads, default_threads)
            policy.reset(cfg.seed)
            for i in range(cfg.warmup):
                policy.act(observations[i % len(observations)])
        for timer in timers:
            timer.samples.clear()
        per_round = [cfg.repeats // ROUNDS + (r < cfg.repeats % ROUNDS) for r in range(ROUNDS)]
        calls = 0
        for n in per_round:
            for j, (policy, row) in enumerate(zip(policies, rows)):
                _set_threads(row.backend, cfg.threads, default_threads)
                for i in range(n):
                    obs = observations[(calls + i) % len(observations)]
                    start = time.perf_counter()
                    policy.act(obs)
                    chunk[j].append(time.perf_counter() - start)
            calls += n
    finally:
        for timer in timers:
            timer.remove()
    out = []
    for samples, timer in zip(chunk, timers):
        ms = 1e3 * np.asarray(samples)
        enc = 1e3 * np.asarray(timer.samples) if timer.samples else np.zeros(1)
        out.append(
            {
                "latency_ms_p50": float(np.percentile(ms, 50)),
                "latency_ms_p99": float(np.percentile(ms, 99)),
                "latency_ms_mean": float(ms.mean()),
                "encoder_ms_p50": float(np.percentile(enc, 50)),
                "denoiser_ms_p50": float(np.percentile(ms, 50) - np.percentile(enc, 50)),
                "chunks_per_s": float(1e3 / np.percentile(ms, 50)),
                "timed_calls": len(samples),
            }
        )
    return out


def action_difference(policy: Any, reference: Any, observation: dict[str, Any], seed: int) -> float:
    """Mean abs difference of one chunk from ``reference``'s with the same observation and noise."""
    policy.reset(seed)
    reference.reset(seed)
    return float(np.abs(policy.act(observation).actions - reference.act(observation).actions).mean())


# ---------------------------------------------------------------------------- success


def rollout_success(
    cfg: BenchPolicyConfig, row: Row, singles: list, chains: list, schedule: Any, default_threads: int
) -> dict[str, Any]:
    """Roll ``row``'s policy out on the evaluation set: success over the single-task episodes, avg_len over chains."""
    from tqdm import tqdm

    from dreamrt.policies.factory import load_policy
    from dreamrt.sim import protocol
    from dreamrt.sim.evaluate import resolve_env_config
    from dreamrt.sim.rollout import run_episodes

    policy_cfg = row.policy_config(cfg)
    policies = [
        load_policy(row.checkpoint, policy_cfg, bac_schedule=schedule) for _ in range(max(1, cfg.num_workers))
    ]
    _set_threads(row.backend, cfg.threads, default_threads)
    env_cfg = resolve_env_config(cfg.env, None, policies[0])
    specs = [*singles, *chains]
    bar = tqdm(
        total=len(specs),
        unit="episode",
        desc=f"rollouts {_label(row)}",
        disable=not cfg.progress,
        leave=False,
    )
    outcomes = []

    def on_outcome(outcome: Any) -> None:
        outcomes.append(outcome)
        bar.update(1)

    try:
        run_episodes(
            specs,
            policies,
            env_cfg,
            num_workers=cfg.num_workers,
            max_steps_per_subtask=cfg.max_steps_per_subtask,
            on_outcome=on_outcome,
        )
    finally:
        bar.close()
    n_single = len(singles)
    single = [o for o in outcomes if o.spec.index < n_single]
    out: dict[str, Any] = {"episodes": len(single)}
    if single:
        out["success"] = float(np.mean([o.num_success == len(o.spec.tasks) for o in single]))
        per_task: dict[str, list[bool]] = {}
        for o in single:
            per_task.setdefault(o.spec.tasks[0], []).append(o.num_success == 1)
        out["per_task"] = {t: float(np.mean(v)) for t, v in sorted(per_task.items())}
    else:
        out["success"] = None
    chain_outcomes = sorted((o for o in outcomes if o.spec.index >= n_single), key=lambda o: o.spec.index)
    if chain_outcomes:
        summary = protocol.summarize(
            [protocol.ChainResult(o.spec.tasks, o.num_success) for o in chain_outcomes]
        )
        out.update(avg_len=summary["avg_len"], sr=summary["sr"], chains=len(chain_outcomes))
    return out


# ---------------------------------------------------------------------------- the job


def _label(row: Row | dict[str, Any]) -> str:
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    steps = get("steps")
    return f"{get('sampler')}-{steps if steps is not None else 'default'} {get('cache')} {get('backend')}"


def collect_observations(
    cfg: BenchPolicyConfig, row: Row, tasks: list[str]
) -> tuple[list[dict[str, Any]], str]:
    """(observations, where they came from): frames of ``cfg.dataset``, or env resets into tasks' start states."""
    from dreamrt.policies.factory import load_policy

    probe = load_policy(row.checkpoint)  # for the keys it reads and whether it needs cameras
    if cfg.dataset:
        observations = store_observations(cfg.dataset, probe, cfg.observations)
        return observations, f"{len(observations)} frames of {cfg.dataset}"
    from dreamrt.sim.evaluate import resolve_env_config

    env_cfg = resolve_env_config(cfg.env, None, probe)
    spread = single_task_specs(tasks, 1, cfg.seed + 1)  # one start state per task, not the rollout set
    picks = [spread[int(i)] for i in np.linspace(0, len(spread) - 1, min(cfg.observations, len(spread)))]
    observations = env_observations(env_cfg, picks, cfg.observations)
    return observations, f"{len(observations)} env resets (start states of {len(observations)} tasks)"


def make_schedules(
    cfg: BenchPolicyConfig, rows: list[Row], observations: list, out_dir: Path | None
) -> dict[tuple[str, int | None], tuple[Any, str]]:
    """(sampler, steps) -> (schedule, source) for every bac row's sampler; each saved into ``out_dir``."""
    from dreamrt.runtime.bac import save_schedule

    schedules: dict[tuple[str, int | None], tuple[Any, str]] = {}
    for row in rows:
        key = (row.sampler, row.steps)
        if row.cache != "bac" or key in schedules:
            continue
        schedules[key] = bac_schedule(row.checkpoint, row.sampler, row.steps, observations, cfg)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            name = f"bac_schedule_{row.sampler}-{len(schedules[key][0].timesteps)}.json"
            save_schedule(schedules[key][0], Path(out_dir) / name)
    return schedules


def latency_results(
    cfg: BenchPolicyConfig, rows: list[Row], observations: list, schedules: dict, default_threads: int
) -> list[dict[str, Any]]:
    """One result row per plan row: latency, encoder share, action difference from plain torch, cache facts."""
    from tqdm import tqdm

    from dreamrt.policies.factory import PolicyConfig, load_policy

    policies = [
        load_policy(row.checkpoint, row.policy_config(cfg), bac_schedule=_schedule_of(row, schedules))
        for row in tqdm(rows, desc="build policies", disable=not cfg.progress, leave=False)
    ]
    timings = time_rows(policies, rows, observations, cfg, default_threads)
    references: dict[tuple[str, int | None], Any] = {}  # the plain torch policy per sampler
    results = []
    for row, policy, timing in zip(rows, policies, timings):
        key = (row.sampler, row.steps)
        if key not in references:
            plain = PolicyConfig(path=row.checkpoint, sampler=row.sampler, steps=row.steps)
            references[key] = load_policy(row.checkpoint, plain)
        _set_threads(row.backend, cfg.threads, default_threads)
        result: dict[str, Any] = {
            "sampler": row.sampler,
            "steps": len(policy.sampler.timesteps),
            "cache": row.cache,
            "backend": row.backend,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()},
            "action_diff_vs_torch": action_difference(policy, references[key], observations[0], cfg.seed),
            "role": row.role,
            "checkpoint": row.checkpoint,
            "threads": cfg.threads,
        }
        if row.backend == "onnxruntime":
            result["provider"] = policy.encoder.session.get_providers()[0]
        if row.cache != "none":
            result["compute_fraction"] = round(policy.denoiser_factory.schedule.compute_fraction, 4)
            result["schedule"] = schedules[key][1] if row.cache == "bac" else "uniform"
        results.append(result)
    return results


def add_success(
    cfg: BenchPolicyConfig,
    rows: list[Row],
    results: list[dict[str, Any]],
    tasks: list[str],
    schedules: dict,
    default_threads: int,
) -> None:
    """Roll out the evaluation set (see the module docstring) and add each row's outcome to its result."""
    from tqdm import tqdm

    from dreamrt.sim import protocol
    from dreamrt.sim.evaluate import chain_specs

    singles = single_task_specs(tasks, cfg.episodes_per_task, cfg.seed)
    chains = chain_specs(protocol.generate_chains(cfg.chains, cfg.seed), cfg.seed, 0) if cfg.chains else []
    chains = [replace(spec, index=len(singles) + i) for i, spec in enumerate(chains)]  # after the singles
    outcomes: dict[tuple[Any, ...], dict[str, Any]] = {}  # (sampler, steps, cache, backend) -> outcome
    for i in tqdm(list(_success_order(rows, cfg)), desc="success", disable=not cfg.progress):
        row = rows[i]
        outcome = rollout_success(cfg, row, singles, chains, _schedule_of(row, schedules), default_threads)
        outcomes[(*row.group, row.backend)] = {**outcome, "success_backend": row.backend}
    by_group = {key[:3]: outcome for key, outcome in outcomes.items()}
    for row, result in zip(rows, results):
        result.update(outcomes.get((*row.group, row.backend)) or by_group[row.group])


def _schedule_of(row: Row, schedules: dict) -> Any:
    return schedules[(row.sampler, row.steps)][0] if row.cache == "bac" else None


def run(cfg: BenchPolicyConfig, out_dir: Path | None = None) -> JobResult:
    import torch

    from dreamrt.sim.tasks import task_names

    start = time.perf_counter()
    default_threads = torch.get_num_threads()
    # 1. checkpoints and rows
    teacher, student, notes = resolve_checkpoints(cfg)
    rows, skipped = plan_rows(cfg, teacher, student)
    if not rows:
        raise UserError(
            "No benchmark row can run: "
            + "; ".join(f"{_label(s)}: {s['reason']}" for s in skipped)
            + ". Give the missing checkpoint or other samplers."
        )
    tasks = list(cfg.tasks) if cfg.tasks is not None else task_names()
    # 2. observations, 3. BAC schedules, 4. latency
    observations, source = collect_observations(cfg, rows[0], tasks)
    schedules = make_schedules(cfg, rows, observations, out_dir)
    results = latency_results(cfg, rows, observations, schedules, default_threads)
    summary: dict[str, Any] = {
        "rows": results,
        "skipped": skipped,
        "teacher": str(teacher) if teacher is not None else None,
        "student": str(student) if student is not None else None,
        "notes": notes,
        "observations": source,
        "threads": cfg.threads,
        "evaluation": None,
    }
    # 5. success
    if cfg.success:
        print(
            format_table({**summary, "skipped": [], "notes": []})
        )  # the latencies now: rollouts take minutes
        print("rolling out the evaluation set ...", flush=True)
        add_success(cfg, rows, results, tasks, schedules, default_threads)
        summary["evaluation"] = {
            "tasks": len(tasks),
            "episodes_per_task": cfg.episodes_per_task,
            "chains": cfg.chains,
            "max_steps_per_subtask": cfg.max_steps_per_subtask,
        }
    else:
        for result in results:
            result["success"] = None
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    torch.set_num_threads(default_threads)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(summary))
    return JobResult(summary=summary)


def _success_order(rows: list[Row], cfg: BenchPolicyConfig) -> Iterator[int]:
    """Indices of the rows to roll out: all, or one per sampler x cache on the preferred backend."""
    if cfg.success_per_backend:
        yield from range(len(rows))
        return
    preferred = "onnxruntime" if "onnxruntime" in cfg.backends else cfg.backends[0]
    seen = set()
    for i, row in sorted(enumerate(rows), key=lambda ir: ir[1].backend != preferred):
        if row.group not in seen:
            seen.add(row.group)
            yield i


def format_table(summary: dict[str, Any]) -> str:
    head = f"{'sampler':<16}{'cache':<9}{'backend':<13}{'p50 ms':>9}{'p99 ms':>9}{'enc ms':>8}{'diff':>9}{'success':>9}"
    chains = any("avg_len" in r for r in summary["rows"])
    lines = [head + (f"{'avg_len':>9}" if chains else ""), "-" * (len(head) + (9 if chains else 0))]
    for r in summary["rows"]:
        success = "-" if r.get("success") is None else f"{r['success']:.3f}"
        line = (
            f"{r['sampler'] + '-' + str(r['steps']):<16}{r['cache']:<9}{r['backend']:<13}"
            f"{r['latency_ms_p50']:>9.2f}{r['latency_ms_p99']:>9.2f}{r['encoder_ms_p50']:>8.2f}"
            f"{r['action_diff_vs_torch']:>9.1e}{success:>9}"
        )
        if chains:
            line += f"{r['avg_len']:>9.3f}" if "avg_len" in r else f"{'-':>9}"
        lines.append(line)
    skipped: dict[tuple[str, str], list[str]] = {}
    for s in summary["skipped"]:
        name = f"{s['sampler']}-{s['steps'] if s['steps'] is not None else 'default'}"
        skipped.setdefault((name, s["reason"]), []).append(f"{s['cache']}/{s['backend']}")
    for (name, reason), which in skipped.items():
        lines.append(f"skipped {name} ({', '.join(which)}): {reason}")
    for note in summary["notes"]:
        lines.append(f"note: {note}")
    lines.append(
        f"batch 1, {summary['observations']}, threads={summary['threads']}; diff = mean |action - same-noise "
        "torch action| of one chunk; success from the row's success_backend"
    )
    return "\n".join(lines)
