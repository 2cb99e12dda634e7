"""The Robot interface the control loop drives, and two robots: the MuJoCo sim and a recorder of commands.

A robot is three calls (plus an optional ``action_bounds`` attribute, ``(low, high)`` arrays
the loop's safety check uses when the config gives none):

- ``observe() -> Observation``: the newest observation, a dict with LeRobot-style keys
  (``observation.state``, ``observation.images.<camera>``, ...), ``task`` (the instruction)
  and ``timestamp``: the capture time in seconds on the loop's clock (the loop computes the
  observation's age from it and holds the robot when it is too old). The loop hands it to the
  inference thread and the recorder, so its arrays must not be overwritten later (return
  fresh arrays, not views of a reused buffer);
- ``command(action)``: send one action for the current control step;
- ``hold() -> action``: stop safely and keep the current position; returns the action that
  does so in the robot's action space (what the episode recording stores for held ticks).

:class:`MujocoRobot` wraps :class:`~dreamrt.sim.env.CalvinStyleEnv`: each ``command`` or
``hold`` advances the physics by one control period, so the loop's clock paces the
simulation (real time with :class:`~dreamrt.runtime.clock.RealClock`, as fast as it computes
with :class:`~dreamrt.runtime.clock.VirtualClock`). :class:`RecordingRobot` integrates its
commands into a state and records every call; tests use its fault knobs (observation lag,
non-finite observations, per-call time costs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from dreamrt.errors import UserError
from dreamrt.policies.protocol import Observation
from dreamrt.runtime.clock import Clock, VirtualClock

if TYPE_CHECKING:
    from dreamrt.sim.env import CalvinStyleEnv


@runtime_checkable
class Robot(Protocol):
    def observe(self) -> Observation:
        """The newest observation, with ``timestamp`` = capture time on the loop's clock."""

    def command(self, action: np.ndarray) -> None:
        """Execute ``action`` (action_dim,) for the current control step."""

    def hold(self) -> np.ndarray:
        """Stop and keep the current position; return the equivalent action (action_dim,)."""


def spend(clock: Clock, seconds: float) -> None:
    """Let ``seconds`` pass: advance a virtual clock, sleep on a real one (simulated I/O cost)."""
    if seconds <= 0:
        return
    if isinstance(clock, VirtualClock):
        clock.advance(seconds)
    else:
        time.sleep(seconds)


# ---------------------------------------------------------------------------- a recording robot


@dataclass
class Call:
    time: float  # loop-clock time of the call
    kind: str  # "command" or "hold"
    action: np.ndarray  # what was sent (the hold action for holds)


class RecordingRobot:
    """A point robot: ``observation.state`` is the running sum of the commanded actions.

    Every ``command`` and ``hold`` is appended to :attr:`calls`. Fault knobs (plain
    attributes, change them between ticks): ``observation_lag_s`` stamps observations that
    much in the past (stale), ``nonfinite_state`` puts a NaN into the state, and
    ``observe_cost_s`` / ``command_cost_s`` spend time in each call (see :func:`spend`).
    """

    def __init__(
        self,
        action_dim: int,
        clock: Clock,
        task: str = "reach",
        action_bounds: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.action_dim = action_dim
        self.clock = clock
        self.task = task
        self.action_bounds = action_bounds
        self.state = np.zeros(action_dim, np.float32)
        self.calls: list[Call] = []
        self.observation_lag_s = 0.0
        self.nonfinite_state = False
        self.observe_cost_s = 0.0
        self.command_cost_s = 0.0

    def observe(self) -> Observation:
        spend(self.clock, self.observe_cost_s)
        state = self.state.copy()
        if self.nonfinite_state:
            state[0] = np.nan
        return {
            "observation.state": state,
            "task": self.task,
            "timestamp": self.clock.now() - self.observation_lag_s,
        }

    def command(self, action: np.ndarray) -> None:
        action = np.asarray(action, np.float32)
        assert action.shape == (self.action_dim,), action.shape
        spend(self.clock, self.command_cost_s)
        self.state += action
        self.calls.append(Call(self.clock.now(), "command", action.copy()))

    def hold(self) -> np.ndarray:
        spend(self.clock, self.command_cost_s)
        action = np.zeros(self.action_dim, np.float32)
        self.calls.append(Call(self.clock.now(), "hold", action))
        return action

    @property
    def commands(self) -> list[np.ndarray]:
        """The actions of the ``command`` calls, in order."""
        return [c.action for c in self.calls if c.kind == "command"]


# ---------------------------------------------------------------------------- the MuJoCo sim


class MujocoRobot:
    """A :class:`CalvinStyleEnv` as a Robot: one ``env.step`` per ``command`` / ``hold``.

    Call :meth:`reset` before the loop. Observations are the env's, stamped with the clock's
    time when ``observe`` is called (the physics stands still between steps, so the state is
    exactly the one at that time). ``hold`` keeps the target still: zero relative motion in
    ``rel_cartesian``, the current target pose in ``abs_cartesian``, the measured joints in
    ``joint`` mode, and the gripper as last commanded.
    """

    def __init__(self, env: CalvinStyleEnv, clock: Clock):
        self.env = env
        self.clock = clock
        space = env.action_space
        self.action_dim = int(space.shape[0])
        self.action_bounds = (space.low.astype(np.float64), space.high.astype(np.float64))
        self.steps = 0  # env steps since reset (commands and holds)
        self.last_info: dict[str, Any] = {}
        self._obs: dict[str, Any] | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> Observation:
        obs, info = self.env.reset(seed=seed, options=options)
        self._obs = obs
        self.last_info = info
        self.steps = 0
        return self.observe()

    def observe(self) -> Observation:
        if self._obs is None:
            raise UserError(
                "MujocoRobot.observe() before reset(): call robot.reset(seed=..., options=...) first."
            )
        return {**self._obs, "timestamp": self.clock.now()}

    def command(self, action: np.ndarray) -> None:
        self._step(np.asarray(action, np.float32))

    def hold(self) -> np.ndarray:
        if self._obs is None:
            raise UserError(
                "MujocoRobot.hold() before reset(): call robot.reset(seed=..., options=...) first."
            )
        state = self._obs["observation.state"]  # (15,): tcp xyz, euler, width, 7 joints, gripper action
        gripper = float(state[14])
        match self.env.config.action_mode:
            case "rel_cartesian":
                action = np.zeros(7, np.float32)
                action[6] = gripper
            case "abs_cartesian":
                pos, euler = self.env.target_pose
                action = np.concatenate([pos, euler, [gripper]]).astype(np.float32)
            case _:
                action = np.concatenate([state[7:14], [gripper]]).astype(np.float32)
        action = np.clip(action, self.action_bounds[0], self.action_bounds[1]).astype(np.float32)
        self._step(action)
        return action

    def _step(self, action: np.ndarray) -> None:
        obs, _, _, _, info = self.env.step(action)
        self._obs = obs
        self.last_info = info
        self.steps += 1
