"""CALVIN-style chains under the real-time control loop.

The chain logic is :class:`dreamrt.sim.rollout.ChainEnv`'s (the scene resets once per chain,
each subtask is checked against the scene when it began, the next instruction is shown the
step a subtask succeeds, the chain ends at the first subtask that has not succeeded after
``max_steps_per_subtask`` steps). This module puts a ChainEnv under
:func:`dreamrt.runtime.loop.run_loop`:

- the robot is a :class:`~dreamrt.runtime.robot.MujocoRobot` over the ChainEnv (ChainEnv
  has the ``config`` and ``target_pose`` its ``hold`` reads): each ``command`` / ``hold`` is
  one ChainEnv step, so ``robot.last_info`` carries the chain's progress (``success``,
  ``num_success``, ``done``, and ``frame`` for filmed chains);
- :func:`run_chain` runs one :class:`~dreamrt.sim.rollout.EpisodeSpec`: one ``run_loop`` per
  subtask, at most ``loop.max_ticks`` control steps each, ended by ``on_tick`` the tick the
  subtask succeeds. Between subtasks the policy is reset with the subtask's seed and the
  loop starts afresh with an empty action queue (CALVIN resets the model per subtask, and
  plans made for the old instruction are void), as :func:`dreamrt.sim.rollout.run_episodes`
  does. The physics stands still in between (MujocoRobot only steps on ticks).

A subtask also fails when the loop reaches ``max_ticks`` control steps before the env has
taken that many steps (skipped ticks are steps the robot stood still): the subtask's time
is wall-clock time, as on a real robot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dreamrt.policies.protocol import Policy
from dreamrt.runtime.clock import Clock
from dreamrt.runtime.loop import LoopConfig, run_loop
from dreamrt.runtime.metrics import LoopReport, TickRecord
from dreamrt.runtime.robot import MujocoRobot
from dreamrt.sim.rollout import TASK_KEY, ChainEnv, EpisodeSpec


@dataclass
class VideoFrame:
    image: np.ndarray  # (H, W, 3) uint8, the static camera after the step
    instruction: str
    subtask: int  # subtasks done so far (the one in progress is subtask + 1)
    step: int  # control step within the chain (0: the reset)
    inference_ms: float  # newest inference latency when the frame was taken


@dataclass
class ChainRun:
    """What running one chain under the loop gave."""

    spec: EpisodeSpec
    num_success: int  # subtasks that succeeded in a row from the first
    env_steps: int  # env steps taken (commands and holds)
    subtask_steps: list[int]  # per subtask attempted: control steps its loop covered
    reports: list[LoopReport]  # one per subtask attempted
    interrupted: bool = False
    video: list[VideoFrame] | None = None  # filmed chains: one frame per env step, the reset's first
    records: list[TickRecord] = field(default_factory=list)  # every subtask's ticks, in order


def chain_robot(env: ChainEnv, clock: Clock) -> MujocoRobot:
    """The Robot the loop drives for ``env``'s chains (``clock`` must be the loop's)."""
    return MujocoRobot(env, clock)


def run_chain(
    spec: EpisodeSpec,
    robot: MujocoRobot,
    policy: Policy,
    loop: LoopConfig,
    *,
    on_tick: Callable[[TickRecord, dict], None] | None = None,
) -> ChainRun:
    """Run ``spec``'s subtasks under the loop; see the module docstring.

    ``robot`` is :func:`chain_robot` over a ChainEnv built with
    ``max_steps_per_subtask=loop.max_ticks`` (``loop.max_ticks`` is the per-subtask limit).
    ``on_tick(record, info)`` sees every tick with the ChainEnv's ``info`` of the step it
    took (keep it cheap: it runs on the loop's thread).
    """
    chain_env: ChainEnv = robot.env
    assert chain_env.max_steps_per_subtask == loop.max_ticks, (
        chain_env.max_steps_per_subtask,
        loop.max_ticks,
    )
    obs = robot.reset(options={"episode": spec})
    run = ChainRun(spec=spec, num_success=0, env_steps=0, subtask_steps=[], reports=[])
    if spec.film:
        run.video = [VideoFrame(robot.last_info["frame"], obs[TASK_KEY], 0, 0, 0.0)]
    for k in range(len(spec.tasks)):
        policy.reset(spec.policy_seeds[k])

        def tick(record: TickRecord, k: int = k) -> bool:
            info = robot.last_info
            if run.video is not None:
                text = robot.observe()[TASK_KEY]  # the instruction shown after this step
                run.video.append(
                    VideoFrame(info["frame"], text, info["num_success"], robot.steps, record.inference_ms)
                )
            if on_tick is not None:
                on_tick(record, info)
            return bool(info["num_success"] > k or info["done"])  # this subtask is over

        report = run_loop(robot, policy, loop, on_tick=tick)
        run.reports.append(report)
        run.records += report.records
        run.subtask_steps.append(report.steps)
        run.num_success = int(robot.last_info["num_success"])
        if report.interrupted:
            run.interrupted = True
            break
        if run.num_success <= k or run.num_success == len(spec.tasks):
            break  # this subtask failed (or the chain is complete)
    run.env_steps = robot.steps
    return run
