"""`dreamrt record`: record demonstrations in the CALVIN-style scene into an episode store.

    dreamrt record out=demos.zarr episodes=200 [mode=single|chain] [tasks=[open_drawer,...]]
                   [policy=expert] [noise.action_std=0.05 | noise=null] [seed=0] [num_workers=2]
                   [policy.path=CKPT takeover_after=[150,300]]

Each *attempt* i is drawn from ``(seed, i)`` alone:

- ``mode=single``: one task, uniform over the 34 tasks (or over ``tasks``), from a symbolic
  state drawn uniformly among the states reachable from CALVIN's 192 start states in which the
  task's precondition holds (so lifting from the drawer or placing a held block get recorded
  too; the env realises any such state on reset).
- ``mode=chain``: play-like data: one of the 192 start states, then ``tasks_per_episode`` tasks
  back to back without a reset, each drawn uniformly among the tasks valid in the symbolic
  state the previous ones leave (not the one just done).

Each task is given to the policy as a training paraphrase (``language.sample_instruction``).
Only successful subtasks are kept: a single-task attempt that fails is dropped; a chain is cut
after its last successful subtask (dropped when the first fails). Attempts run in
``num_workers`` independent processes (:func:`dreamrt.sim.rollout.run_episodes_in_processes`)
but are written in attempt order, one ``add_episodes`` call each, and the first ``episodes``
successful ones are kept, so the store depends only on ``seed`` (not on ``num_workers``).

With ``takeover_after=[first, last]`` and a learned ``policy.path`` the job records corrections
instead (:mod:`dreamrt.sim.takeover`): the learned policy drives, the expert takes over each
subtask the learner has not finished by a step drawn from that range, and each takeover is
written as an episode of its own: the expert's frames from the takeover to the subtask's end.

Per frame the store holds every observation key of the env (``observation.state``,
``observation.environment_state``, ``observation.images.static`` / ``.gripper``, depth and
segmentation when on), the ``action`` taken after that observation, the instruction as the
frame's task (the store's task list holds the paraphrases) and ``observation.task_id``: the
task's index in :func:`dreamrt.sim.tasks.task_names` (int64 scalar), so the task name survives
paraphrasing. An existing store is appended to when its features match.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError, choose, did_you_mean
from dreamrt.jobs import JobResult
from dreamrt.policies.factory import PolicyConfig
from dreamrt.sim.env import CONTROL_HZ, EnvConfig
from dreamrt.sim.expert import ExpertNoise

MISSING = "???"  # OmegaConf's marker for a required value
MODES = ("single", "chain")
TASK_ID_KEY = "observation.task_id"
EXIT_INTERRUPTED = 130

STATE_NAMES = (
    "tcp_x", "tcp_y", "tcp_z", "tcp_roll", "tcp_pitch", "tcp_yaw", "gripper_width",
    *(f"joint_{i}" for i in range(1, 8)), "gripper_action",
)  # fmt: skip
ACTION_NAMES = {
    "rel_cartesian": ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"),
    "abs_cartesian": ("x", "y", "z", "roll", "pitch", "yaw", "gripper"),
    "joint": (*(f"joint_{i}" for i in range(1, 8)), "gripper"),
}


def _environment_state_names() -> tuple[str, ...]:
    from dreamrt.sim.state import BLOCK_COLORS

    blocks = [f"{c}_{a}" for c in BLOCK_COLORS for a in ("x", "y", "z", "roll", "pitch", "yaw")]
    return ("slider", "drawer", "button", "switch", "lightbulb", "led", *blocks)


@dataclass
class RecordConfig:
    out: str = MISSING  # the episode store to create or append to
    episodes: int = 10  # successful episodes to write
    env: EnvConfig = field(default_factory=EnvConfig)  # scene, cameras, image sizes, depth
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # the demonstrator (policy=expert)
    # Variation of the expert's demonstrations (null: deterministic); ignored by other policies.
    noise: ExpertNoise | None = field(default_factory=ExpertNoise)
    mode: str = "single"  # single: one task per episode; chain: several tasks back to back
    tasks: list[str] | None = None  # record only these tasks (null: all 34)
    tasks_per_episode: int = 5  # mode=chain
    seed: int = 0
    num_workers: int = 2  # rollout processes, each with its own env and expert (0: in this process)
    max_steps_per_subtask: int = 360
    max_attempts: int | None = None  # give up after this many attempts (null: 4 x episodes + 8)
    # [first, last]: record corrections instead of demonstrations. The learned policy at
    # policy.path drives; in each subtask it has not finished by a step drawn from [first, last]
    # the expert (with `noise`) takes over, and only what the expert did from there to the
    # subtask's end is written, one episode per takeover (see dreamrt.sim.takeover).
    takeover_after: list[int] | None = None
    overwrite: bool = False  # replace an existing store at `out` instead of appending
    progress: bool = True

    def __post_init__(self) -> None:
        from dreamrt.sim.tasks import task_names

        if not self.out or self.out == MISSING:
            raise UserError("`dreamrt record` needs an output store: pass out=PATH (e.g. out=demos.zarr).")
        if self.episodes < 1:
            raise UserError(f"episodes={self.episodes}; expected a positive int.")
        choose("record mode", self.mode, MODES)
        if self.tasks is not None:
            names = task_names()
            if not self.tasks:
                raise UserError("tasks=[] selects nothing; leave tasks unset (null) to record all 34 tasks.")
            for t in self.tasks:
                if t not in names:
                    raise UserError(
                        f"Unknown task {t!r} in tasks.{did_you_mean(t, names)} Valid tasks: {', '.join(names)}."
                    )
        if self.tasks_per_episode < 1:
            raise UserError(f"tasks_per_episode={self.tasks_per_episode}; expected a positive int.")
        if self.seed < 0:
            raise UserError(f"seed={self.seed}; expected a non-negative int.")
        if self.num_workers < 0:
            raise UserError(
                f"num_workers={self.num_workers}; expected 0 (in this process) or a positive int."
            )
        if self.max_steps_per_subtask < 1:
            raise UserError(f"max_steps_per_subtask={self.max_steps_per_subtask}; expected a positive int.")
        if self.takeover_after is not None:
            from dreamrt.sim.takeover import check_after_steps

            self.takeover_after = list(check_after_steps(self.takeover_after, self.max_steps_per_subtask))
            if self.policy.path is None:
                raise UserError(
                    "takeover_after needs a learned policy to take over from: pass policy.path=CKPT "
                    f"(got the built-in policy {self.policy.name!r})."
                )
        if self.max_attempts is not None and self.max_attempts < self.episodes:
            raise UserError(
                f"max_attempts={self.max_attempts} is below episodes={self.episodes}; raise it or leave it null."
            )

    @property
    def attempts_limit(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 4 * self.episodes + 8


# ---------------------------------------------------------------------------- what to record


def _state_key(state) -> str:
    from dreamrt.sim import protocol

    return protocol.state_key(state)


@functools.lru_cache(maxsize=1)
def _states_by_key() -> dict:
    from dreamrt.sim import protocol

    return {_state_key(s): s for s in protocol.reachable_states()}


@functools.cache
def _longest(key: str, prev: str | None, allowed: frozenset, limit: int) -> int:
    """The most tasks (up to ``limit``) that can follow the state ``key``, never repeating the previous one."""
    from dreamrt.sim import protocol

    if limit == 0:
        return 0
    state = _states_by_key()[key]
    best = 0
    for t in protocol.valid_tasks(state):
        if t in allowed and t != prev:
            best = max(best, 1 + _longest(_state_key(protocol.apply_task(t, state)), t, allowed, limit - 1))
            if best == limit:
                break
    return best


def attempt_spec(cfg: RecordConfig, index: int):
    """The EpisodeSpec of attempt ``index``: a function of (cfg.seed, index) and the task filter."""
    from dreamrt.sim import protocol
    from dreamrt.sim.language import sample_instruction
    from dreamrt.sim.rollout import EpisodeSpec, derive_seed
    from dreamrt.sim.tasks import task_names

    rng = np.random.default_rng([cfg.seed, index])
    allowed = list(cfg.tasks) if cfg.tasks is not None else task_names()
    if cfg.mode == "single":
        task = allowed[int(rng.integers(len(allowed)))]
        states = protocol.states_for(task)
        start = states[int(rng.integers(len(states)))]
        tasks = [task]
    else:
        starts = protocol.start_states()
        allowed_set = frozenset(allowed)
        for _ in range(1000):
            start = starts[int(rng.integers(len(starts)))]
            state, tasks = start, []
            while len(tasks) < cfg.tasks_per_episode:
                # Only tasks after which the episode can still reach its length (or the longest
                # it can have): holding a block with no place to put it would end it early.
                remaining = cfg.tasks_per_episode - len(tasks)
                prev = tasks[-1] if tasks else None
                reach = {
                    t: 1 + _longest(_state_key(protocol.apply_task(t, state)), t, allowed_set, remaining - 1)
                    for t in protocol.valid_tasks(state)
                    if t in allowed_set and t != prev
                }
                if not reach:
                    break
                best = max(reach.values())
                options = [t for t in reach if reach[t] == best]
                tasks.append(options[int(rng.integers(len(options)))])
                state = protocol.apply_task(tasks[-1], state)
            if tasks:
                break
        else:
            raise UserError(
                f"No start state allows any of tasks={cfg.tasks}; in mode=chain the first task must be valid in one "
                "of CALVIN's start states. Add such a task or use mode=single."
            )
    return EpisodeSpec(
        index=index,
        start_state=start,
        tasks=tuple(tasks),
        instructions=tuple(sample_instruction(t, rng) for t in tasks),
        env_seed=derive_seed(cfg.seed, index, 0),
        policy_seeds=tuple(derive_seed(cfg.seed, index, 1 + k) for k in range(len(tasks))),
    )


# ---------------------------------------------------------------------------- the store


def store_features(env_cfg: EnvConfig) -> dict:
    """The store's features for observations of an env with ``env_cfg``, plus action and task id."""
    from dreamrt.episodes import Feature
    from dreamrt.sim.env import CalvinStyleEnv

    env = CalvinStyleEnv(env_cfg)  # only its observation space is read; no reset, no rendering
    try:
        space = env.observation_space
    finally:
        env.close()
    features = {}
    for key, sub in space.spaces.items():
        if key == "task":
            continue
        if key == "observation.state":
            names = STATE_NAMES
        elif key == "observation.environment_state":
            names = _environment_state_names()
        else:
            names = ("height", "width", "channel")
        assert len(names) == (sub.shape[0] if len(sub.shape) == 1 else len(sub.shape)), key
        features[key] = Feature(str(sub.dtype), tuple(sub.shape), names)
    features["action"] = Feature("float32", (7,), ACTION_NAMES[env_cfg.action_mode])
    features[TASK_ID_KEY] = Feature("int64", ())
    return features


def open_store_for(cfg: RecordConfig, features: dict):
    """A writer on ``cfg.out``: a new store, or the existing one when its features match."""
    from dreamrt.episodes import create_store, open_writer
    from dreamrt.episodes.format import AUTO_FEATURES

    path = Path(cfg.out)
    if cfg.overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return create_store(path, features, fps=CONTROL_HZ, robot_type="panda", overwrite=cfg.overwrite)
    writer = open_writer(path)
    have = {k: (f.dtype, tuple(f.shape)) for k, f in writer.features.items() if k not in AUTO_FEATURES}
    want = {k: (f.dtype, tuple(f.shape)) for k, f in features.items()}
    if have != want or abs(writer.info["fps"] - CONTROL_HZ) > 1e-9:
        writer.close()
        diff = sorted(set(have.items()) ^ set(want.items()))
        raise UserError(
            f"The store {path} has other features than this recording would write (differences: {diff}; "
            f"fps {writer.info['fps']} vs {CONTROL_HZ}). Record into a new path, pass overwrite=true to replace it, "
            "or match env.cameras / image sizes / depth / action_mode to the store."
        )
    return writer


# ---------------------------------------------------------------------------- the job


def record(cfg: RecordConfig) -> tuple[dict[str, Any], bool]:
    """Record; returns (summary, interrupted)."""
    from tqdm import tqdm

    from dreamrt.sim.evaluate import policy_factory, resolve_env_config
    from dreamrt.sim.rollout import run_episodes, run_episodes_in_processes
    from dreamrt.sim.tasks import task_names

    names = task_names()
    if cfg.takeover_after is None:
        build_policy = policy_factory(cfg.policy, cfg.env, expert_noise=cfg.noise)
        max_steps = cfg.max_steps_per_subtask
    else:
        from dreamrt.sim.takeover import make_takeover_policy

        build_policy = functools.partial(
            make_takeover_policy, cfg.policy, cfg.env, cfg.noise, tuple(cfg.takeover_after)
        )
        # The expert gets a whole subtask's budget of its own after the latest takeover.
        max_steps = cfg.max_steps_per_subtask + cfg.takeover_after[1]
    policy = build_policy()
    env_cfg = resolve_env_config(cfg.env, cfg.env.cameras, policy)
    features = store_features(env_cfg)
    obs_keys = [k for k in features if k not in ("action", TASK_ID_KEY)]
    writer = open_store_for(cfg, features)

    pending: dict[int, Any] = {}
    corrections: dict[int, tuple[list[int], list[tuple[int, int, int]]]] = {}  # takeover_after: by attempt
    state = {"next": 0, "kept": 0, "frames": 0, "steps": 0}
    per_task: dict[str, dict[str, int]] = {}
    bar = tqdm(total=cfg.episodes, unit="episode", desc="record", disable=not cfg.progress)

    def specs() -> Iterator:
        for i in range(cfg.attempts_limit):
            yield attempt_spec(cfg, i)

    task_ids = {name: i for i, name in enumerate(names)}

    def write(outcome) -> None:
        # One add_episodes call per episode: a few writes instead of one buffered write per frame,
        # so the one writing process keeps up with many workers, and Ctrl-C never splits an episode.
        spec, frames = outcome.spec, outcome.frames
        subtask = np.searchsorted(
            outcome.subtask_ends[: outcome.num_success], np.arange(len(frames)), "right"
        )
        assert all(f["task"] == spec.instructions[k] for f, k in zip(frames, subtask)), spec
        columns = {key: np.stack([f[key] for f in frames]) for key in [*obs_keys, "action"]}
        columns[TASK_ID_KEY] = np.array([task_ids[t] for t in spec.tasks], dtype=np.int64)[subtask]
        columns["task_index"] = subtask
        writer.add_episodes(columns, [len(frames)], list(spec.instructions[: outcome.num_success]))
        state["frames"] += len(frames)

    def write_corrections(outcome, segments: list[tuple[int, int, int]]) -> None:
        # Each takeover is an episode of its own that starts where the expert took over: the
        # learner's frames before it are not demonstrations.
        frames = outcome.frames
        rows = [f for _, begin, end in segments for f in frames[begin:end]]
        lengths = [end - begin for _, begin, end in segments]
        columns = {key: np.stack([f[key] for f in rows]) for key in [*obs_keys, "action"]}
        columns["task_index"] = np.repeat(np.arange(len(segments)), lengths)
        columns[TASK_ID_KEY] = np.repeat([task_ids[outcome.spec.tasks[k]] for k, _, _ in segments], lengths)
        writer.add_episodes(columns, lengths, [outcome.spec.instructions[k] for k, _, _ in segments])
        state["frames"] += len(rows)

    def takeovers(outcome) -> list[tuple[int, int, int, bool]]:
        """(subtask, first expert frame, end of the subtask's frames, succeeded) per takeover."""
        found, begin = [], 0
        ends = [*outcome.subtask_ends, len(outcome.frames)]
        for k in range(min(outcome.num_success + 1, len(outcome.spec.tasks))):
            end = ends[k]
            expert = [i for i in range(begin, end) if outcome.frames[i]["actor"] == "expert"]
            if expert:
                found.append((k, expert[0], end, k < outcome.num_success))
            begin = end
        return found

    def on_outcome(outcome) -> bool:
        if cfg.takeover_after is not None:
            found = takeovers(outcome)
            segments = [(k, b, e) for k, b, e, ok in found if ok]
            corrections[outcome.spec.index] = ([t[0] for t in found], segments)
            # Keep only what is written: outcomes may wait in `pending`.
            outcome.frames = outcome.frames[: segments[-1][2]] if segments else None
        elif outcome.num_success:
            # Cut to the successful part now: only that is ever written, and it may wait in `pending`.
            outcome.frames = outcome.frames[: outcome.subtask_ends[outcome.num_success - 1]]
        else:
            outcome.frames = None
        pending[outcome.spec.index] = outcome
        while state["next"] in pending and state["kept"] < cfg.episodes:
            o = pending.pop(state["next"])
            taken, segments = corrections.pop(state["next"], ([], []))
            state["next"] += 1
            for k, task in enumerate(o.spec.tasks[: o.num_success + 1]):
                entry = per_task.setdefault(task, {"attempts": 0, "successes": 0})
                entry["attempts"] += 1
                entry["successes"] += int(k < o.num_success)
                if cfg.takeover_after is not None:
                    entry["takeovers"] = entry.get("takeovers", 0) + int(k in taken)
                    entry["learner_successes"] = entry.get("learner_successes", 0) + int(
                        k < o.num_success and k not in taken
                    )
            if cfg.takeover_after is not None:
                segments = segments[: cfg.episodes - state["kept"]]
                if segments:
                    write_corrections(o, segments)
                    state["kept"] += len(segments)
                    bar.update(len(segments))
            elif o.num_success:
                write(o)
                state["kept"] += 1
                bar.update(1)
            bar.set_postfix(attempts=state["next"])
        return state["kept"] >= cfg.episodes

    def on_step(n: int) -> None:
        state["steps"] += n

    interrupted = False
    start_time = time.perf_counter()
    try:
        run_options = dict(
            max_steps_per_subtask=max_steps,
            keep_frames=True,
            on_outcome=on_outcome,
            on_step=on_step,
        )
        if cfg.num_workers == 0:
            run_episodes(specs(), [policy], env_cfg, num_workers=0, **run_options)
        else:
            # Independent workers, each with its own expert: a lockstep vector env would run every
            # expert in this process and stop scaling after a few cores.
            run_episodes_in_processes(
                specs(), build_policy, env_cfg, num_workers=cfg.num_workers, **run_options
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        total_episodes, total_frames = writer.num_episodes, writer.num_frames
        writer.close()
    wall = time.perf_counter() - start_time
    summary = {
        "out": str(cfg.out),
        "mode": cfg.mode,
        "episodes_written": state["kept"],
        "frames_written": state["frames"],
        "attempts": state["next"],
        "per_task": {t: per_task[t] for t in names if t in per_task},
        "store_episodes": total_episodes,
        "store_frames": total_frames,
        "wall_time_s": wall,
        "env_steps": state["steps"],
        "steps_per_s": state["steps"] / wall if wall > 0 else 0.0,
        "interrupted": interrupted,
    }
    return summary, interrupted


def run(cfg: RecordConfig, out_dir: Path | None = None) -> JobResult:
    summary, interrupted = record(cfg)
    short = summary["episodes_written"] < cfg.episodes
    print(
        f"wrote {summary['episodes_written']} episodes ({summary['frames_written']} frames) from "
        f"{summary['attempts']} attempts to {summary['out']} (now {summary['store_episodes']} episodes); "
        f"{summary['env_steps']} env steps in {summary['wall_time_s']:.1f} s"
    )
    if short and not interrupted:
        print(
            f"only {summary['episodes_written']} of {cfg.episodes} episodes succeeded within "
            f"{cfg.attempts_limit} attempts; raise max_attempts or check the policy"
        )
    code = EXIT_INTERRUPTED if interrupted else (1 if short else 0)
    return JobResult(summary=summary, exit_code=code)
