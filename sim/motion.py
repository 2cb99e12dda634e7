"""Motion primitives for the scripted expert: observation parsing, scene landmarks computed
from the scene description, and a tracker that turns Cartesian waypoints into relative actions.

The expert sees only observations, never the environment, so it keeps its own copy of the
target pose that ``rel_cartesian`` actions accumulate onto and updates it exactly as the
environment does (add the action, keep it within ``MAX_TARGET_LEAD`` of the measured tool,
clip to the workspace). Steering that copy, not the measured tool, avoids the oscillation
that feeding back a lagging arm would cause (see ``docs/sim.md``).

Primitives are generators: each ``yield`` hands out one 7-d action, and the caller refreshes
``Motion.obs`` before resuming. A primitive returns when its goal is reached (or its step
budget runs out), so skills are plain sequential code: ``yield from m.move(...)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import mujoco
import numpy as np

from dreamrt.sim import env as sim_env
from dreamrt.sim import ik, scene
from dreamrt.sim.state import BLOCK_COLORS

OPEN, CLOSE = 1.0, -1.0
Actions = Iterator[np.ndarray]  # what a primitive or skill generator yields, one (7,) action per step

# robot_obs (15): tcp xyz, tcp euler, gripper width, 7 joints, last gripper action.
TCP_POS, TCP_EULER, GRIPPER_WIDTH, GRIPPER_ACTION = slice(0, 3), slice(3, 6), 6, 14
# scene_obs (24): slider, drawer, button, switch, lightbulb, LED, then xyz + euler per block.
SCENE_JOINTS = ("slider", "drawer", "button", "switch")
LIGHTBULB, LED = 4, 5
BLOCK_OFFSET = 6
# Hand yaws the wrist reaches with room to spare (yaw 0 = fingers along world y, joint 7 near
# the middle of its range); beyond about +-2.3 rad the arm cannot hold the tool position.
YAW_LIMIT = math.pi / 2 + 0.35


def wrap(angle: float) -> float:
    """Angle in [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle in the world's xy plane."""

    x0: float
    x1: float
    y0: float
    y1: float

    def gap(self, other: Box) -> float:
        """Distance between the two rectangles along the axis that separates them best; negative
        when they overlap (minus the depth of the shallower overlap)."""
        return max(other.x0 - self.x1, self.x0 - other.x1, other.y0 - self.y1, self.y0 - other.y1)

    def inset(self, inner: Box) -> float:
        """How far this rectangle stays inside ``inner`` (negative: it sticks out)."""
        return min(self.x0 - inner.x0, inner.x1 - self.x1, self.y0 - inner.y0, inner.y1 - self.y1)


@dataclass(frozen=True)
class Block:
    color: str
    pos: np.ndarray  # (3,) centre, world
    yaw: float
    size: np.ndarray  # (3,) full extents in the block frame

    def half_extent_x(self) -> float:
        """Half of the block's footprint along world x (it is turned by ``yaw``)."""
        c, s = abs(math.cos(self.yaw)), abs(math.sin(self.yaw))
        return 0.5 * (c * self.size[0] + s * self.size[1])

    def half_extent_y(self) -> float:
        c, s = abs(math.cos(self.yaw)), abs(math.sin(self.yaw))
        return 0.5 * (s * self.size[0] + c * self.size[1])

    def box(self, shift=(0.0, 0.0)) -> Box:
        """The footprint's bounding box, moved by ``shift`` (dx, dy)."""
        x, y = self.pos[0] + shift[0], self.pos[1] + shift[1]
        hx, hy = self.half_extent_x(), self.half_extent_y()
        return Box(x - hx, x + hx, y - hy, y + hy)

    @property
    def top(self) -> float:
        return float(self.pos[2] + self.size[2] / 2)


class Landmarks:
    """Positions of the scene's moving landmarks for given joint values, from the variant's MJCF.

    The expert builds the same model the environment simulates (without cameras) and runs
    forward kinematics on it, so its landmarks cannot drift from the scene definition.
    """

    def __init__(self, variant: str):
        self.config = scene.scene_config(variant)
        self._model = mujoco.MjModel.from_xml_string(scene.build_mjcf(self.config))
        self._data = mujoco.MjData(self._model)
        self._qadr = {n: self._model.joint(n).qposadr[0] for n in SCENE_JOINTS}

    def at(self, name: str, scene_obs: np.ndarray) -> np.ndarray:
        """World xyz (3,) of site ``name`` with the furniture joints read from ``scene_obs``."""
        for i, joint in enumerate(SCENE_JOINTS):
            self._data.qpos[self._qadr[joint]] = scene_obs[i]
        mujoco.mj_kinematics(self._model, self._data)
        return self._data.site_xpos[self._model.site(name).id].copy()

    def block(self, color: str, scene_obs: np.ndarray) -> Block:
        i = BLOCK_OFFSET + 6 * BLOCK_COLORS.index(color)
        return Block(
            color,
            np.asarray(scene_obs[i : i + 3], float),
            float(scene_obs[i + 5]),
            self.config.block_size(color),
        )


class Motion:
    """Tracks waypoints with relative actions; holds the latest observation and the target copy.

    ``speed`` scales the per-step travel, ``rng`` and the noise amplitudes (0 = deterministic)
    perturb waypoints and actions for varied demonstrations.
    """

    MAX_STEP = 0.02  # metres per step at action 1 (REL_POS_SCALE)
    MAX_TURN = 0.05  # radians per step at action 1 (REL_ROT_SCALE)

    def __init__(self, landmarks: Landmarks, rng: np.random.Generator):
        self.lm = landmarks
        self.rng = rng
        self.obs: dict = {}
        self.speed = 1.0
        self.waypoint_noise = 0.0  # metres (std) on free-space waypoints
        self.action_noise = 0.0  # std added to the motion part of each action
        self.target_pos: np.ndarray | None = None
        self.target_rot: np.ndarray | None = None
        self.grip = OPEN

    # ------------------------------------------------------------------ observation views
    @property
    def robot(self) -> np.ndarray:
        return np.asarray(self.obs["observation.state"], float)

    @property
    def scene_obs(self) -> np.ndarray:
        return np.asarray(self.obs["observation.environment_state"], float)

    @property
    def tcp(self) -> np.ndarray:
        return self.robot[TCP_POS].copy()

    @property
    def width(self) -> float:
        return float(self.robot[GRIPPER_WIDTH])

    def block(self, color: str) -> Block:
        return self.lm.block(color, self.scene_obs)

    def landmark(self, name: str) -> np.ndarray:
        return self.lm.at(name, self.scene_obs)

    def yaw(self) -> float:
        return float(ik.mat_to_euler(self.target_rot)[2])

    # ------------------------------------------------------------------ target copy
    def sync_target(self) -> None:
        """Take the measured tool pose as the target (right after a reset, once the arm is still)."""
        self.target_pos = self.tcp
        self.target_rot = ik.euler_to_mat(self.robot[TCP_EULER])
        self.grip = OPEN if self.robot[GRIPPER_ACTION] > 0 else CLOSE

    def _advance_target(self, a: np.ndarray) -> None:
        """Mirror of the environment's rel_cartesian target update (``CalvinStyleEnv._joint_targets``)."""
        pos = self.target_pos + a[:3] * sim_env.REL_POS_SCALE
        rot = ik.euler_to_mat(ik.mat_to_euler(self.target_rot) + a[3:6] * sim_env.REL_ROT_SCALE)
        tcp = self.tcp
        lead = pos - tcp
        dist = float(np.linalg.norm(lead))
        if dist > sim_env.MAX_TARGET_LEAD:
            pos = tcp + lead * (sim_env.MAX_TARGET_LEAD / dist)
        tcp_rot = ik.euler_to_mat(self.robot[TCP_EULER])
        turn = ik.rotation_error(rot, tcp_rot)
        angle = float(np.linalg.norm(turn))
        if angle > sim_env.MAX_TARGET_TURN:
            rot = sim_env._axis_angle_mat(turn * (sim_env.MAX_TARGET_TURN / angle)) @ tcp_rot
        lo = np.array([r[0] for r in sim_env.WORKSPACE])
        hi = np.array([r[1] for r in sim_env.WORKSPACE])
        self.target_pos = np.clip(pos, lo, hi)
        self.target_rot = rot

    def action(self, goal: np.ndarray, yaw: float | None, speed: float = 1.0) -> np.ndarray:
        """One relative action moving the target towards ``goal`` (hand pointing down, at ``yaw``)."""
        a = np.zeros(7)
        step = np.asarray(goal, float) - self.target_pos
        max_step = self.MAX_STEP * self.speed * speed
        norm = float(np.linalg.norm(step))
        if norm > max_step:  # straight lines: scale the whole step, not each axis
            step *= max_step / norm
        a[:3] = step / sim_env.REL_POS_SCALE
        roll, pitch, tyaw = ik.mat_to_euler(self.target_rot)
        # No wrapping of the yaw error: goals lie within YAW_LIMIT, so the hand turns through
        # yaw 0, the middle of the wrist's range, never across +-pi where joint 7 ends.
        turn = np.array([wrap(math.pi - roll), -pitch, 0.0 if yaw is None else yaw - tyaw])
        max_turn = self.MAX_TURN * min(1.0, self.speed * speed)
        turn = np.clip(turn, -max_turn, max_turn)
        a[3:6] = turn / sim_env.REL_ROT_SCALE
        if self.action_noise > 0:
            a[:6] += self.rng.normal(0.0, self.action_noise, 6)
        a[:6] = np.clip(a[:6], -1.0, 1.0)
        a[6] = self.grip
        self._advance_target(a)
        return a

    def absolute_action(self, grip: float) -> np.ndarray:
        """The ``abs_cartesian`` action reaching the target copy (which :meth:`action` has just
        advanced): target x, y, z, roll, pitch, yaw, and ``grip``.

        Roll is given in [0, 2 pi): the hand points down, so roll sits near pi, where (-pi, pi]
        would flip between the ends of its range from one step to the next (the env's
        ``euler_to_mat`` takes any angle)."""
        if self.target_pos is None:  # settling after a reset: hold where the tool is
            pos, euler = self.tcp, self.robot[TCP_EULER].astype(float)
        else:
            pos, euler = self.target_pos, np.array(ik.mat_to_euler(self.target_rot), float)
        euler[0] %= 2 * math.pi
        return np.array([*pos, *euler, grip])

    def nearest_yaw(self, yaw: float, period: float = math.pi) -> float:
        """Of the yaws ``yaw + k * period`` (the gripper is symmetric, a cube even more so) within
        ``YAW_LIMIT`` of the wrist's middle, the one nearest the current target yaw."""
        now = self.yaw()
        options = [yaw + k * period for k in range(-4, 5)]
        options = [y for y in options if abs(y) <= YAW_LIMIT] or [wrap(yaw)]
        return min(options, key=lambda y: abs(y - now))

    def jitter(self, scale: float = 1.0) -> np.ndarray:
        if self.waypoint_noise <= 0:
            return np.zeros(3)
        return self.rng.normal(0.0, self.waypoint_noise * scale, 3)

    # ------------------------------------------------------------------ primitives
    def move(
        self,
        goal,
        yaw: float | None = None,
        grip: float | None = None,
        tol: float = 0.008,
        max_steps: int = 90,
        speed: float = 1.0,
        noise: float = 0.0,
    ) -> Actions:
        """Steer the target to ``goal`` (and the hand to ``yaw``) until the tool gets there."""
        goal = np.asarray(goal, float) + self.jitter(noise)
        if grip is not None:
            self.grip = grip
        for _ in range(max_steps):
            if self._reached(goal, yaw, tol):
                return
            yield self.action(goal, yaw, speed)

    def _reached(self, goal: np.ndarray, yaw: float | None, tol: float) -> bool:
        if np.linalg.norm(self.target_pos - goal) > 1e-3 or np.linalg.norm(self.tcp - goal) > tol:
            return False
        return yaw is None or abs(wrap(float(self.robot[TCP_EULER][2]) - yaw)) < 0.06

    def wait(self, steps: int, grip: float | None = None) -> Actions:
        """Hold the target still (e.g. while the fingers close)."""
        if grip is not None:
            self.grip = grip
        goal = self.target_pos.copy()
        yaw = self.yaw()
        for _ in range(steps):
            yield self.action(goal, yaw)

    def hold(self) -> Actions:
        """Stay put forever (the plan is done; the caller decides when the episode ends)."""
        while True:
            yield from self.wait(30)
