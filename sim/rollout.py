"""Running task chains: the chain-running environment and the driver the evaluator and recorder share.

:class:`ChainEnv` wraps :class:`~dreamrt.sim.env.CalvinStyleEnv` so that one gymnasium
episode is one chain of subtasks, as CALVIN's evaluation runs them:

- ``reset(options={"episode": EpisodeSpec})`` resets the scene once, into the spec's
  symbolic start state with the spec's own seed, and shows the first instruction;
- each ``step`` checks the current subtask against the scene snapshot taken when that subtask
  began (:func:`dreamrt.sim.tasks.check_success`). On success the next instruction is shown
  at once (``set_instruction``, no reset: the scene carries over) and the snapshot is
  retaken; a subtask that has not succeeded after ``max_steps_per_subtask`` steps ends the
  chain, as does the last success. ``terminated`` is True on the step the chain ends; further
  steps are no-ops that repeat the last observation;
- ``info`` reports the progress: ``index``, ``subtask``, ``subtask_steps``, ``success``,
  ``num_success``, ``new_subtask``, ``done``, ``env_resets``, ``other_tasks`` and, for filmed
  episodes, ``frame`` (the static camera's RGB image).
- With ``watch_other_tasks`` every step also checks the other 33 tasks against the subtask's
  snapshot; ``other_tasks`` names those that fired during the current subtask, comma-separated
  in the order they first fired (always empty without it). A failed subtask then says whether
  the policy did another task instead (confused the instruction) or none (fumbled the right
  one). It costs about 0.3 ms per step, a fifth of a step's physics, so the recorder leaves it off.

:func:`run_episodes` drives several ChainEnvs in a gymnasium vector environment
(``AsyncVectorEnv``, one worker process per sub-environment, autoreset disabled) with one
policy instance per sub-environment in the calling process. A finished sub-environment is
reset with the next episode through ``reset(options={"reset_mask": ..., "episodes": ...})``,
so the workers stay busy without the vector env's autoreset (which would reset without a
chain). Policies execute whole action chunks; ``policy.reset(seed)`` is called at the start
of every subtask (CALVIN resets the model per subtask). Every seed derives from the episode's
index, never from which worker ran it, so results do not depend on ``num_workers``.

:func:`run_episodes_in_processes` runs the same episodes in independent worker processes, each
with its own environment and its own policy built there, pulling specs from a queue. Nothing
waits on a lockstep, so it scales with the cores for policies that are cheap per step (the
scripted expert); ``run_episodes`` keeps every policy in the calling process, where a learned
one can use the threads or the GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import queue
import signal
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from dreamrt.errors import UserError
from dreamrt.policies.protocol import Policy
from dreamrt.sim.env import CalvinStyleEnv, EnvConfig
from dreamrt.sim.state import SceneState, SymbolicState
from dreamrt.sim.tasks import check_success, task_names

TASK_KEY = "task"  # the observation key holding the instruction
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ACTION_DIM = 7  # every action mode of the env takes 7 numbers


def derive_seed(*parts: int) -> int:
    """A 31-bit seed determined by ``parts`` (e.g. base seed, episode index, subtask)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to run: a start state and the subtasks asked for in order."""

    index: int  # position in the job's sequence; orders results and derives seeds
    start_state: SymbolicState
    tasks: tuple[str, ...]
    instructions: tuple[str, ...]  # one per task: what the policy is told
    env_seed: int  # seeds the scene's reset (block poses, start joints)
    policy_seeds: tuple[int, ...]  # policy.reset(seed) at the start of each subtask
    film: bool = False  # return the static camera's frames

    def __post_init__(self) -> None:
        assert len(self.tasks) >= 1, self
        assert len(self.instructions) == len(self.tasks) == len(self.policy_seeds), self


class ChainEnv(gym.Env):
    """A CalvinStyleEnv whose episodes are chains of subtasks; see the module docstring."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        env_config: EnvConfig,
        max_steps_per_subtask: int = 360,
        slot: int = 0,
        video: bool = False,
        watch_other_tasks: bool = False,
    ):
        if max_steps_per_subtask < 1:
            raise UserError(
                f"max_steps_per_subtask={max_steps_per_subtask}; expected a positive int (CALVIN: 360)."
            )
        self.slot = slot  # which entry of reset's options["episodes"] belongs to this env
        self.watch_other_tasks = watch_other_tasks
        self.max_steps_per_subtask = max_steps_per_subtask
        # The static camera renders for videos even when observations carry no images.
        self.env = CalvinStyleEnv(env_config, render_mode="rgb_array" if video else None)
        self.observation_space = self.env.observation_space
        self.action_space = self.env.action_space
        self.num_env_resets = 0  # resets of the scene itself: one per chain
        self.total_steps = 0  # physics-carrying steps over the env's life
        self._spec: EpisodeSpec | None = None
        self._done = True
        self._last_obs: dict | None = None
        self._subtask = 0
        self._subtask_steps = 0
        self._num_success = 0
        self._start_state: SceneState | None = None
        self._other_tasks: list[str] = []  # other tasks that fired during this subtask, in order

    @property
    def spec_running(self) -> EpisodeSpec | None:
        return self._spec

    # What a robot driver needs from the scene beneath (dreamrt.runtime.robot.MujocoRobot.hold):
    @property
    def config(self) -> EnvConfig:
        return self.env.config

    @property
    def target_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """The Cartesian target the arm's IK is tracking: (pos (3,), euler (3,))."""
        return self.env.target_pose

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        # The vector env's seed is ignored: the episode carries its own, so that a chain does
        # not depend on the worker that runs it.
        options = options or {}
        spec = options.get("episode")
        if spec is None and "episodes" in options:
            spec = options["episodes"].get(self.slot)
        if not isinstance(spec, EpisodeSpec):
            raise UserError(
                "ChainEnv.reset needs options={'episode': EpisodeSpec} (or {'episodes': {slot: EpisodeSpec}}), "
                f"got {sorted(options)}."
            )
        self._spec = spec
        obs, info = self.env.reset(
            seed=spec.env_seed,
            options={"symbolic_state": spec.start_state, "instruction": spec.instructions[0]},
        )
        self.num_env_resets += 1
        self._done = False
        self._subtask = 0
        self._subtask_steps = 0
        self._num_success = 0
        self._start_state = info["scene_state"]
        self._other_tasks = []
        self._last_obs = obs
        out = self._info(success=False, new_subtask=False, steps=0)
        out["new_subtask"] = True  # the first subtask starts now
        return obs, out

    def step(self, action):
        if self._done:  # idle until the next reset (the vector env steps every sub-env)
            return self._last_obs, 0.0, True, False, self._info(success=False, new_subtask=False, steps=0)
        spec = self._spec
        obs, _, _, truncated, info = self.env.step(action)
        self.total_steps += 1
        self._subtask_steps += 1
        state = info["scene_state"]
        task = spec.tasks[self._subtask]
        success = check_success(task, self._start_state, state)
        if self.watch_other_tasks and not success:
            self._watch(task, state)
        steps = self._subtask_steps
        subtask = self._subtask
        new_subtask = False
        if success:
            self._num_success += 1
            if self._num_success == len(spec.tasks):
                self._done = True
            else:
                # No reset between subtasks: only the instruction and the reference snapshot change.
                self._subtask += 1
                self._subtask_steps = 0
                self._start_state = state
                self._other_tasks = []
                self.env.set_instruction(spec.instructions[self._subtask])
                obs[TASK_KEY] = spec.instructions[self._subtask]
                new_subtask = True
        elif steps >= self.max_steps_per_subtask or truncated:
            self._done = True
        self._last_obs = obs
        out = self._info(success=success, new_subtask=new_subtask, steps=steps)
        out["subtask"] = subtask  # the subtask this step belonged to
        return obs, 0.0, self._done, False, out

    def _watch(self, task: str, state: SceneState) -> None:
        for other in task_names():
            if (
                other != task
                and other not in self._other_tasks
                and check_success(other, self._start_state, state)
            ):
                self._other_tasks.append(other)

    def _info(self, success: bool, new_subtask: bool, steps: int) -> dict[str, Any]:
        spec = self._spec
        info: dict[str, Any] = {
            "index": spec.index if spec else -1,
            "subtask": self._subtask,
            "subtask_steps": steps,
            "success": bool(success),
            "num_success": self._num_success,
            "new_subtask": bool(new_subtask),
            "done": bool(self._done),
            "env_resets": self.num_env_resets,
            "other_tasks": ",".join(self._other_tasks),
        }
        if spec is not None and spec.film:
            info["frame"] = self.env.render()  # (H, W, 3) uint8, static camera
        return info

    def close(self) -> None:
        self.env.close()


def _make_chain_env(
    env_config: EnvConfig, max_steps_per_subtask: int, slot: int, video: bool, watch_other_tasks: bool
) -> ChainEnv:
    # In a worker process, Ctrl-C is the main process's to handle (it shuts the workers down).
    # AsyncVectorEnv also calls this once in the main process for the spaces: leave that one alone.
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return ChainEnv(
        env_config, max_steps_per_subtask, slot=slot, video=video, watch_other_tasks=watch_other_tasks
    )


@dataclass
class EpisodeOutcome:
    """What running one EpisodeSpec gave."""

    spec: EpisodeSpec
    num_success: int  # subtasks that succeeded in a row from the first
    steps: int  # env steps taken
    subtask_ends: list[int]  # for each successful subtask, the step count at which it succeeded
    final_env_state: np.ndarray  # (24,) observation.environment_state after the last step
    final_robot_state: np.ndarray  # (15,) observation.state after the last step
    env_resets: int  # scene resets the worker's env had done when the episode ended (cumulative)
    # With watch_other_tasks, when a subtask failed: the other tasks that fired during it, in order.
    other_tasks_of_failure: tuple[str, ...] = ()
    # With keep_frames: per step, the observation before it plus "action" and "actor" (the chunk's
    # info["actor"], None unless the policy names one).
    frames: list[dict] | None = None
    video: list[tuple[np.ndarray, str, int]] | None = None  # filmed: (frame, instruction, subtask) per step


@dataclass
class _Slot:
    policy: Policy
    outcome: EpisodeOutcome | None = None
    queue: deque = field(default_factory=deque)
    obs: dict | None = None


def make_vector_env(
    env_config: EnvConfig,
    num_workers: int,
    max_steps_per_subtask: int,
    video: bool,
    watch_other_tasks: bool = False,
) -> gym.vector.VectorEnv:
    """``num_workers`` ChainEnvs in as many processes (0: one ChainEnv in this process)."""
    from functools import partial

    from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

    if num_workers < 0:
        raise UserError(f"num_workers={num_workers}; expected 0 (run in this process) or a positive int.")
    if num_workers == 0:
        return SyncVectorEnv(
            [partial(_make_chain_env, env_config, max_steps_per_subtask, -1, video, watch_other_tasks)],
            autoreset_mode=AutoresetMode.DISABLED,
        )
    fns = [
        partial(_make_chain_env, env_config, max_steps_per_subtask, i, video, watch_other_tasks)
        for i in range(num_workers)
    ]
    # spawn: the workers start clean (no copy of a parent's GL context or torch threads).
    # No shared memory: gymnasium 1.4 reads a Text space (the instruction) out of shared
    # memory once, at construction, so every later observation would show a stale string.
    with _single_threaded_children():
        return AsyncVectorEnv(
            fns, autoreset_mode=AutoresetMode.DISABLED, context="spawn", shared_memory=False, copy=False
        )


@contextlib.contextmanager
def _single_threaded_children():
    """Spawned workers inherit these: one BLAS/OpenMP thread each. The env's tiny IK solves
    gain nothing from threads, and idle OpenBLAS threads spin, taking cores from the other
    workers and the main process."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_policy_fits(policy: Policy, env_config: EnvConfig) -> None:
    """A UserError when the policy's actions are not what the env's action mode takes."""
    spec = policy.spec
    if spec.action_dim != ACTION_DIM:
        raise UserError(
            f"The policy produces {spec.action_dim}-d actions; the CALVIN-style env takes {ACTION_DIM}-d actions."
        )
    if spec.action_mode != env_config.action_mode:
        raise UserError(
            f"The policy's actions are for action mode {spec.action_mode!r} but the env is set to "
            f"{env_config.action_mode!r}. Set env.action_mode={spec.action_mode}."
        )


def policy_image_keys(policy: Policy) -> list[str]:
    """The observation image keys a policy reads (DP-T lists them on its config); [] if none."""
    keys = getattr(policy, "image_keys", None)
    if keys is None:
        keys = getattr(getattr(policy, "config", None), "image_keys", None)
    return list(keys or [])


def _unbatch(obs: dict, i: int) -> dict:
    """Sub-env i's observation, copied out of the batch (policies and recorders keep them)."""
    return {k: (np.array(v[i]) if k != TASK_KEY else str(v[i])) for k, v in obs.items()}


def run_episodes(
    specs: Iterable[EpisodeSpec],
    policies: Sequence[Policy],
    env_config: EnvConfig,
    *,
    num_workers: int = 2,
    max_steps_per_subtask: int = 360,
    keep_frames: bool = False,
    video: bool = False,
    watch_other_tasks: bool = False,
    on_outcome: Callable[[EpisodeOutcome], bool | None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[EpisodeOutcome]:
    """Run ``specs`` and return their outcomes in completion order.

    ``policies`` holds one policy per sub-environment: ``max(1, num_workers)`` of them
    (``num_workers=0`` runs the one environment in this process).

    ``on_outcome(outcome)`` is called as each episode ends; returning True stops the run
    (episodes in flight are abandoned). ``on_step(n)`` reports n more env steps. With
    ``keep_frames`` each outcome carries every observation and the action taken after it;
    ``video`` must be True for specs with ``film`` set. KeyboardInterrupt propagates after
    the workers are shut down; outcomes already delivered to ``on_outcome`` are the finished ones.
    ``watch_other_tasks`` fills each failed episode's ``other_tasks_of_failure`` (see ChainEnv).

    Workers are spawned processes, so a script calling this with ``num_workers > 0`` needs the
    usual ``if __name__ == "__main__":`` guard (the CLI and pytest have it).
    """
    if len(policies) != max(1, num_workers):
        raise AssertionError(f"{len(policies)} policies for num_workers={num_workers}")
    for p in policies:
        check_policy_fits(p, env_config)
    spec_iter: Iterator[EpisodeSpec] = iter(specs)
    # Fewer episodes than workers: start only as many workers as there are episodes. A worker that
    # is never reset has no observation to give the vector env, which stacks one from every worker.
    first = list(itertools.islice(spec_iter, max(1, num_workers)))
    if not first:
        return []
    spec_iter = itertools.chain(first, spec_iter)
    if num_workers > len(first):
        num_workers, policies = len(first), policies[: len(first)]
    envs = make_vector_env(env_config, num_workers, max_steps_per_subtask, video, watch_other_tasks)
    n = envs.num_envs
    slots = [_Slot(policy=p) for p in policies]
    action_dim = ACTION_DIM
    outcomes: list[EpisodeOutcome] = []
    stopped = False
    clean = False
    try:

        def assign(mask: np.ndarray) -> bool:
            """Give each masked slot the next spec; reset those that got one. False when none did."""
            nonlocal stopped
            assigned: dict[int, EpisodeSpec] = {}
            for i in np.flatnonzero(mask):
                spec = None if stopped else next(spec_iter, None)
                if spec is None:
                    continue
                if spec.film and not video:
                    raise AssertionError("a filmed spec needs run_episodes(video=True)")
                assigned[int(i)] = spec
            if not assigned:
                return False
            reset_mask = np.zeros(n, dtype=bool)
            reset_mask[list(assigned)] = True
            # Keyed by slot: the single-process env is slot -1.
            keyed = {(i if num_workers > 0 else -1): spec for i, spec in assigned.items()}
            obs, info = envs.reset(options={"reset_mask": reset_mask, "episodes": keyed})
            for i, spec in assigned.items():
                slot = slots[i]
                slot.obs = _unbatch(obs, i)
                slot.outcome = EpisodeOutcome(
                    spec=spec,
                    num_success=0,
                    steps=0,
                    subtask_ends=[],
                    final_env_state=slot.obs["observation.environment_state"].copy(),
                    final_robot_state=slot.obs["observation.state"].copy(),
                    env_resets=int(info["env_resets"][i]),
                    frames=[] if keep_frames else None,
                    video=[] if spec.film else None,
                )
                if spec.film:
                    slot.outcome.video.append((info["frame"][i].copy(), spec.instructions[0], 0))
                slot.queue.clear()
                slot.policy.reset(spec.policy_seeds[0])
            return True

        assign(np.ones(n, dtype=bool))
        while any(s.outcome is not None for s in slots):
            actions = np.zeros((n, action_dim), dtype=np.float32)
            for i, s in enumerate(slots):
                if s.outcome is None:
                    continue
                if not s.queue:
                    chunk = s.policy.act(s.obs)
                    actor = chunk.info.get("actor")  # who produced it, where a policy says (ExpertTakeover)
                    # The whole chunk runs before the policy is asked again.
                    s.queue.extend((a, actor) for a in chunk.actions)
                else:
                    s.policy.observe(s.obs)  # keeps an observation history at the control rate
                actions[i], actor = s.queue.popleft()
                if keep_frames:
                    s.outcome.frames.append({**s.obs, "action": actions[i].copy(), "actor": actor})
            obs, _, terminated, _, info = envs.step(actions)
            active = sum(s.outcome is not None for s in slots)
            if on_step is not None:
                on_step(active)
            finished = np.zeros(n, dtype=bool)
            for i, s in enumerate(slots):
                out = s.outcome
                if out is None:
                    continue
                s.obs = _unbatch(obs, i)
                out.steps += 1
                if out.video is not None:
                    out.video.append((info["frame"][i].copy(), s.obs[TASK_KEY], int(info["num_success"][i])))
                if info["success"][i]:
                    out.subtask_ends.append(out.steps)
                out.num_success = int(info["num_success"][i])
                if info["new_subtask"][i]:
                    s.queue.clear()  # a new instruction: plans for the old one are void
                    s.policy.reset(out.spec.policy_seeds[out.num_success])
                if terminated[i]:
                    out.final_env_state = s.obs["observation.environment_state"].copy()
                    out.final_robot_state = s.obs["observation.state"].copy()
                    out.env_resets = int(info["env_resets"][i])
                    if out.num_success < len(out.spec.tasks) and info["other_tasks"][i]:
                        out.other_tasks_of_failure = tuple(info["other_tasks"][i].split(","))
                    s.outcome = None
                    finished[i] = True
                    if not stopped:
                        outcomes.append(out)
                        stopped = bool(on_outcome is not None and on_outcome(out))
                else:
                    assert s.obs[TASK_KEY] == out.spec.instructions[out.num_success], (
                        s.obs[TASK_KEY],
                        out.spec,
                    )
            if finished.any():
                assign(finished)
            if stopped:
                break
        clean = True
    finally:
        if clean or num_workers == 0:
            envs.close()
        else:  # after an error or Ctrl-C the workers may be mid-step: kill them rather than wait
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "calling close while waiting for a pending call"
                envs.close(terminate=True)
    return outcomes


def run_episodes_in_processes(
    specs: Iterable[EpisodeSpec],
    make_policy: Callable[[], Policy],
    env_config: EnvConfig,
    *,
    num_workers: int,
    max_steps_per_subtask: int = 360,
    keep_frames: bool = False,
    on_outcome: Callable[[EpisodeOutcome], bool | None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[EpisodeOutcome]:
    """``run_episodes`` with each of ``num_workers`` spawned processes running whole episodes on
    its own env and its own policy (``make_policy()``, called there: it must pickle, e.g. a
    ``functools.partial`` of a module-level function). Same outcomes for the same specs, in
    completion order; ``on_step(n)`` reports an episode's n steps when it ends. Returning True
    from ``on_outcome`` stops the run and abandons the episodes in flight. Workers ignore
    Ctrl-C; the calling process stops them and re-raises KeyboardInterrupt."""
    if num_workers < 1:
        raise UserError(f"num_workers={num_workers}; run_episodes_in_processes needs at least 1.")
    context = multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    with _single_threaded_children():
        workers = [
            context.Process(
                target=_episode_worker,
                args=(make_policy, env_config, max_steps_per_subtask, keep_frames, inbox, outbox),
                daemon=True,
            )
            for _ in range(num_workers)
        ]
        for w in workers:
            w.start()
    spec_iter = iter(specs)
    in_flight = 0
    outcomes: list[EpisodeOutcome] = []

    def feed() -> None:
        # Two specs queued per worker: one running, one ready, so no worker waits on this process.
        nonlocal in_flight
        while in_flight < 2 * num_workers and (spec := next(spec_iter, None)) is not None:
            if spec.film:
                raise AssertionError("filmed specs need run_episodes(video=True)")
            inbox.put(spec)
            in_flight += 1

    finished = False
    try:
        feed()
        while in_flight:
            try:
                kind, payload = outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [w.exitcode for w in workers if not w.is_alive()]
                if dead:
                    raise RuntimeError(f"An episode worker died (exit code {dead[0]}).") from None
                continue
            if kind == "error":
                raise RuntimeError(f"An episode worker failed:\n{payload}")
            in_flight -= 1
            outcomes.append(payload)
            if on_step is not None:
                on_step(payload.steps)
            if on_outcome is not None and on_outcome(payload):
                break
            feed()
        else:
            finished = True
    finally:
        if finished:
            for _ in workers:
                inbox.put(None)
            for w in workers:
                w.join(timeout=10)
        for w in workers:  # stopped early, failed or interrupted: episodes in flight are abandoned
            if w.is_alive():
                w.terminate()
            w.join()
        inbox.close()
        outbox.close()
    return outcomes


def _episode_worker(make_policy, env_config, max_steps_per_subtask, keep_frames, inbox, outbox) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the calling process's to handle
    try:
        run_episodes(
            iter(inbox.get, None),  # blocks for the next spec; None ends the worker
            [make_policy()],
            env_config,
            num_workers=0,
            max_steps_per_subtask=max_steps_per_subtask,
            keep_frames=keep_frames,
            on_outcome=lambda outcome: outbox.put(("outcome", outcome)),
        )
    except BaseException:
        outbox.put(("error", traceback.format_exc()))
