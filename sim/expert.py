"""The scripted expert: solves the 34 CALVIN-style tasks from observations alone.

``ScriptedExpert`` implements the :class:`~dreamrt.policies.protocol.Policy` protocol exactly as
a learned policy does: it sees the observation dict (robot_obs, scene_obs, images and the
instruction) and returns one Cartesian action per call: relative (CALVIN's), or with
``action_mode="abs_cartesian"`` the target pose that relative action sets. Scene geometry (handle,
button, lever and cabinet positions) comes from the scene variant's own MJCF via
:class:`~dreamrt.sim.motion.Landmarks`, evaluated at the furniture joints in scene_obs.

Each task maps to one skill (a generator of actions, see :mod:`dreamrt.sim.motion`) plus its
parameters in :data:`SKILLS`. Every skill starts from wherever the previous task of a chain
left the arm: it first leaves the furniture it may be touching (out of the cabinet, up out of
the drawer, off a handle), puts down a block it still holds when the task needs an empty hand,
and travels above the scene at ``TRAVEL_Z`` before descending onto its goal. A change of
instruction re-plans from the current observation; ``reset`` forgets the plan.

``ExpertNoise`` varies demonstrations (waypoint jitter, speed, action noise) from a seed; the
default ``None`` is deterministic, for evaluation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from dreamrt.errors import UserError, choose, did_you_mean
from dreamrt.policies.protocol import ActionChunk, PolicySpec
from dreamrt.sim import panda, scene
from dreamrt.sim.language import eval_instruction, train_instructions
from dreamrt.sim.motion import (
    CLOSE,
    GRIPPER_ACTION,
    OPEN,
    Actions,
    Block,
    Box,
    Landmarks,
    Motion,
)
from dreamrt.sim.state import BLOCK_COLORS
from dreamrt.sim.tasks import task_names

TRAVEL_Z = 0.27  # tool height for moves across the scene: clears the switch post and a held block
CABINET_APPROACH_Y = -0.46  # in front of the cabinet opening, clear of the door handle
FINAL_APPROACH = 0.03  # m covered slowly at the end of every approach
CLOSE_STEPS = 8  # control steps the fingers need to close on a block
OPEN_STEPS = 6
MIN_GRASP_WIDTH = 0.01  # a closed gripper narrower than this holds nothing
GRASP_ATTEMPTS = 3
ROTATE_ANGLE = 1.45  # rad; the check wants 60..180 deg
PUSH_SPEED = 0.5  # of full speed: a gentle push keeps the block on the desk
PUSH_DISTANCE = 0.14  # m the block centre should travel; the check wants 0.1
PUSH_Z = 0.014  # tool height while pushing: fingertips 5 mm above the desk, so the push acts low
# on the block and cannot tip it (block friction is 1)
FINGER_HALF_THICKNESS = 0.012  # along the hand's x (panda.FINGER_HALF_XY[0])
DOOR_SLACK = 0.03  # m the door may stand off its end stop before it is pushed there
SLIDER_PUSH_Y = -0.52  # tool y in front of the door: the flange cylinder stays 1 cm off the door
SLIDER_PALM_DROP = 0.085  # tool this far below the handle puts the palm's side level with the bar
SLIDER_HANDLE_HALF_X = 0.014
DRAWER_STROKE = 0.24
SWITCH_STROKE = 0.095
BUTTON_PRESS = 0.021  # below the cap's top
HAND_ACROSS_X = math.pi / 2  # hand yaw with the fingers closing along world x
# Open fingers reach this far from the tool along their closing axis (outer faces), and are
# this wide across it: what must fit between a drawer block and its neighbours or the walls.
FINGER_REACH = panda.FINGER_TRAVEL + 2 * panda.FINGER_HALF_XY[1]
FINGER_HALF_WIDTH = panda.FINGER_HALF_XY[0]
DRAWER_WALL = 0.01  # thickness of the drawer's walls (scene._drawer)
# Tool this far above a drawer block's centre: the palm then clears the walls' tops and the
# flange the front plate, and the pads still hold the block's upper 2.4 cm.
DRAWER_GRASP_RAISE = 0.01
GRASP_CLEARANCE = 0.006  # m the open fingers need from walls and other blocks
# The open fingers stand 1.5 cm off each side of a 5 cm block: the tool may shift that much
# (less a margin) away from a close neighbour; closing then centres the block between the pads.
GRASP_SHIFT = 0.012
DRAWER_DROP_HEIGHT = 0.025  # a block is let go this far above the drawer floor (or the blocks in it)


@dataclass
class ExpertNoise:
    """Seeded variation for demonstrations; all zero would equal ``noise=None``."""

    start_mm: float = 20.0  # uniform offset of the arm before the first plan after a reset
    waypoint_mm: float = 6.0  # std of the jitter on free-space waypoints (contact points get a quarter)
    speed_min: float = 0.6  # each plan's speed is drawn from [speed_min, speed_max] x full speed
    speed_max: float = 1.0
    action_std: float = 0.05  # std of Gaussian noise on the six motion entries of each action

    def __post_init__(self) -> None:
        for name in ("start_mm", "waypoint_mm", "action_std"):
            if getattr(self, name) < 0:
                raise UserError(f"ExpertNoise.{name}={getattr(self, name)} must be >= 0.")
        if self.start_mm > 50 or self.waypoint_mm > 15:
            raise UserError(
                f"ExpertNoise start_mm={self.start_mm}, waypoint_mm={self.waypoint_mm} are too large for "
                "reliable demonstrations; expected start_mm <= 50 and waypoint_mm <= 15."
            )
        if not 0.2 <= self.speed_min <= self.speed_max <= 1.0:
            raise UserError(
                f"ExpertNoise speed range [{self.speed_min}, {self.speed_max}] is invalid; expected "
                "0.2 <= speed_min <= speed_max <= 1."
            )
        if self.action_std > 0.3:
            raise UserError(f"ExpertNoise.action_std={self.action_std} is too large; expected <= 0.3.")


# ---------------------------------------------------------------------------- scene queries


def held_block(m: Motion) -> str | None:
    """The block between the closed fingers, if any."""
    if m.robot[GRIPPER_ACTION] > 0 or m.width < MIN_GRASP_WIDTH:
        return None
    tcp = m.tcp
    for color in BLOCK_COLORS:
        b = m.block(color)
        if np.linalg.norm(b.pos[:2] - tcp[:2]) < 0.04 and abs(b.pos[2] - tcp[2]) < 0.05:
            return color
    return None


def on_table(b: Block) -> bool:
    (x0, x1), (_, y1) = scene.DESK_X, scene.DESK_Y
    return x0 < b.pos[0] < x1 and scene.CABINET_FRONT_Y < b.pos[1] < y1 and 0.0 < b.pos[2] < 0.15


def table_blocks(m: Motion, exclude: str | None = None) -> list[Block]:
    return [m.block(c) for c in BLOCK_COLORS if c != exclude and on_table(m.block(c))]


def stacked_top(m: Motion) -> Block | None:
    """The table block resting on another block (its bottom well above the desk)."""
    for b in table_blocks(m):
        if b.pos[2] - b.size[2] / 2 > 0.03:
            return b
    return None


def free_spot(m: Motion, exclude: str) -> np.ndarray:
    """A table xy away from every other block, for putting a held block down."""
    others = [b.pos[:2] for b in table_blocks(m, exclude=exclude)]
    best, best_score = None, -1.0
    for x in np.linspace(-0.24, 0.24, 9):
        for y in np.linspace(-0.40, -0.30, 3):
            xy = np.array([x, y])
            score = min((float(np.linalg.norm(xy - o)) for o in others), default=1.0)
            score = min(score, 0.15) - 0.01 * float(np.linalg.norm(xy - m.tcp[:2]))
            if score > best_score:
                best, best_score = xy, score
    return best


def grasp_period(b: Block) -> float:
    """Yaw period of equivalent grasps: a half turn, a quarter turn for a cube."""
    return math.pi / 2 if b.size[0] == b.size[1] else math.pi


def grasp_yaw(m: Motion, b: Block) -> float:
    """Hand yaw closing the fingers across the block's 0.05 m side, nearest the current yaw."""
    return m.nearest_yaw(b.yaw, grasp_period(b))


def _nearest_mod(angle: float, ref: float, period: float) -> float:
    """``angle + k * period`` nearest ``ref``."""
    return ref + ((angle - ref + period / 2) % period - period / 2)


def drawer_inside(m: Motion) -> Box:
    """The drawer's floor between its walls, where it is now."""
    spot = m.landmark("drawer_spot")
    hx, hy = scene.DRAWER_HALF[0] - DRAWER_WALL, scene.DRAWER_HALF[1]
    return Box(spot[0] - hx, spot[0] + hx, spot[1] - hy + DRAWER_WALL, spot[1] + hy)


def drawer_tool_y(m: Motion) -> tuple[float, float]:
    """Tool y range over the drawer with the palm along x: clear of the desk edge and the front plate."""
    inside, margin = drawer_inside(m), panda.PALM_HALF[0] + 0.005
    return scene.DESK_Y[1] + margin, inside.y1 - margin


def drawer_blocks(m: Motion, exclude: str) -> list[Block]:
    inside = drawer_inside(m)
    blocks = [m.block(c) for c in BLOCK_COLORS if c != exclude]
    return [b for b in blocks if b.pos[2] < 0 and inside.x0 < b.pos[0] < inside.x1]


def finger_box(x: float, y: float) -> Box:
    """Footprint of the open fingers around the tool at (x, y), closing along x."""
    return Box(x - FINGER_REACH, x + FINGER_REACH, y - FINGER_HALF_WIDTH, y + FINGER_HALF_WIDTH)


def drawer_grasp(m: Motion, b: Block) -> tuple[np.ndarray, float]:
    """Tool xy straddling drawer block ``b`` with open fingers along x, and the clearance they
    keep from the walls and the other blocks there (negative: they would land on something).
    Where a neighbour stands close, the tool shifts away from it: across the block by up to
    GRASP_SHIFT, and along a long block towards the end that sticks out past the neighbour."""
    inside, (lo, hi) = drawer_inside(m), drawer_tool_y(m)
    others = [o.box() for o in drawer_blocks(m, b.color)]
    box = b.box()
    x_mid, y_mid = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    along = max(0.0, (box.y1 - box.y0) / 2 - FINGER_HALF_WIDTH - 0.008)  # fingers stay on the block
    best, best_score, best_clearance = np.array([x_mid, y_mid]), -math.inf, -math.inf
    for x in np.linspace(x_mid - GRASP_SHIFT, x_mid + GRASP_SHIFT, 7):
        for y in np.linspace(y_mid - along, y_mid + along, 9):
            if not lo <= y <= hi:
                continue
            fingers = finger_box(x, y)
            clearance = min([fingers.inset(inside)] + [fingers.gap(o) for o in others])
            # Enough room is enough: then the most central grasp holds best.
            score = min(clearance, GRASP_CLEARANCE) - 0.1 * math.hypot(x - x_mid, y - y_mid)
            if score > best_score:
                best, best_score, best_clearance = np.array([x, y]), score, clearance
    return best, best_clearance


def drawer_grasp_point(m: Motion, b: Block) -> np.ndarray:
    xy, _ = drawer_grasp(m, b)
    return np.array([xy[0], xy[1], b.pos[2] + DRAWER_GRASP_RAISE])


def drawer_drop_point(m: Motion, color: str, yaw: float) -> np.ndarray:
    """Where the held block, turned by the hand to ``yaw``, lands farthest from the drawer's walls
    and the blocks already in it; the tool height lets it go above them."""
    b = m.block(color)
    turned = replace(b, yaw=b.yaw + yaw - m.yaw())
    inside, (lo, hi) = drawer_inside(m), drawer_tool_y(m)
    others = drawer_blocks(m, color)
    best, best_clearance = ((inside.x0 + inside.x1) / 2, (lo + hi) / 2), -math.inf
    for x in np.arange(inside.x0, inside.x1, 0.01):
        for y in np.arange(lo, hi, 0.01):
            box = turned.box((x - b.pos[0], y - b.pos[1]))
            clearance = min([box.inset(inside)] + [box.gap(o.box()) for o in others])
            if clearance > best_clearance:
                best, best_clearance = (x, y), clearance
    bottom = max([scene.DRAWER_FLOOR_Z] + [o.top for o in others]) + DRAWER_DROP_HEIGHT
    return np.array([best[0], best[1], bottom + held_offset(m, color)])


# ---------------------------------------------------------------------------- building blocks


def settle(m: Motion, start_mm: float) -> Actions:
    """After a reset: let the arm come to rest on the environment's target, then adopt it."""
    still = np.zeros(7)
    still[6] = OPEN if m.robot[GRIPPER_ACTION] > 0 else CLOSE
    for _ in range(2):
        yield still.copy()
    m.sync_target()
    if start_mm > 0:
        offset = m.rng.uniform(-start_mm, start_mm, 3) / 1000.0
        offset[2] = abs(offset[2])
        yield from m.move(m.tcp + offset, max_steps=15)


def leave(m: Motion) -> Actions:
    """Get clear of whatever the last task left the hand at: out of the cabinet, then up."""
    p = m.tcp
    in_cabinet = p[1] < scene.CABINET_FRONT_Y + 0.03 and p[2] > scene.SHELF_Z
    if in_cabinet:
        z = min(p[2] + 0.05, scene.CABINET_ROOF_Z - 0.1)
        yield from m.move([p[0], p[1], z], tol=0.01, max_steps=20)
        yield from m.move([p[0], CABINET_APPROACH_Y, z], tol=0.01, max_steps=40)
        p = m.tcp
    if p[2] < TRAVEL_Z - 0.03:
        yield from m.move([p[0], p[1], TRAVEL_Z], tol=0.015, max_steps=40)


def travel(m: Motion, goal, yaw: float, grip: float, above: float | None = None) -> Actions:
    """Leave, cross at travel height (turning the hand on the way), then descend onto ``goal``."""
    goal = np.asarray(goal, float)
    m.grip = grip
    yield from leave(m)
    yield from m.move([goal[0], goal[1], max(TRAVEL_Z, goal[2] + 0.05)], yaw, tol=0.015, noise=1.0)
    if above is not None:
        yield from m.move(goal + [0, 0, above], yaw, tol=0.01, noise=0.5)
    # Fast down to just above the goal, then slowly so the arm arrives without lag.
    yield from m.move(goal + [0, 0, FINAL_APPROACH], yaw, tol=0.006, noise=0.25)
    yield from m.move(goal, yaw, tol=0.005, speed=0.4, max_steps=30)


def release_hand(m: Motion) -> Actions:
    """Open the fingers (letting go of a handle or lever) and leave."""
    if m.robot[GRIPPER_ACTION] < 0:
        yield from m.wait(OPEN_STEPS, OPEN)
    m.grip = OPEN
    yield from leave(m)


def empty_hand(m: Motion) -> Actions:
    """Tasks other than place/stack start with an empty hand: put a held block down first."""
    color = held_block(m)
    if color is not None:
        yield from set_down(m, color)
    yield from release_hand(m)


def pick(
    m: Motion,
    color: str,
    yaw_of: Callable[[Motion, Block], float] = grasp_yaw,
    at: Callable[[Motion, Block], np.ndarray] = lambda m, b: b.pos,
) -> Actions:
    """Grasp a block from above at tool position ``at`` (retrying a missed grasp); returns the grasp yaw."""
    yaw = 0.0
    for _ in range(GRASP_ATTEMPTS):
        b = m.block(color)
        yaw = yaw_of(m, b)
        yield from travel(m, at(m, b), yaw, OPEN, above=0.1)
        yield from m.wait(CLOSE_STEPS, CLOSE)
        if m.width > MIN_GRASP_WIDTH:
            return yaw
        yield from m.wait(OPEN_STEPS, OPEN)
        yield from m.move(m.tcp + [0, 0, 0.08], max_steps=20)
    return yaw


def held_offset(m: Motion, color: str) -> float:
    """Height of the tool above the bottom of the held block."""
    b = m.block(color)
    return float(m.tcp[2] - b.pos[2] + b.size[2] / 2)


def yaw_aligning(m: Motion, color: str, world_yaw: float) -> float:
    """Hand yaw that turns the held block's long axis to ``world_yaw`` (mod pi)."""
    b = m.block(color)
    return m.nearest_yaw(m.yaw() + world_yaw - b.yaw, grasp_period(b))


def set_down(m: Motion, color: str) -> Actions:
    """Put the held block on a free table spot and let go."""
    xy = free_spot(m, color)
    z = held_offset(m, color) + 0.008
    yield from travel(m, [xy[0], xy[1], z], m.yaw(), CLOSE)
    yield from m.wait(OPEN_STEPS, OPEN)
    yield from m.move(m.tcp + [0, 0, 0.08], max_steps=20)


def drop_into_drawer(m: Motion, color: str) -> Actions:
    """Carry the held block over the open drawer and let it drop where it has most room."""
    yaw = m.nearest_yaw(HAND_ACROSS_X)  # palm along x fits the drawer's opening
    goal = drawer_drop_point(m, color, yaw)
    yield from travel(m, goal, yaw, CLOSE)
    yield from m.wait(OPEN_STEPS, OPEN)
    yield from m.move([goal[0], goal[1], TRAVEL_Z], max_steps=40)


# ---------------------------------------------------------------------------- skills


def lift_from_table(m: Motion, color: str) -> Actions:
    yield from empty_hand(m)
    yaw = yield from pick(m, color)
    b = m.block(color)
    yield from m.move(b.pos + [0, 0, 0.15], yaw, CLOSE)


def uncover(m: Motion, side: str) -> Actions:
    """Slide the door fully away from compartment ``side``: a move_slider task stops as soon as
    its check fires, which can leave the door half across the compartment it uncovered."""
    target = 0.0 if side == "left" else scene.SLIDER_RANGE
    if abs(m.scene_obs[0] - target) > DOOR_SLACK:
        yield from slide_door(m, target)


def lift_from_slider(m: Motion, color: str) -> Actions:
    yield from empty_hand(m)
    b = m.block(color)
    yield from uncover(m, "left" if b.pos[0] > m.lm.config.cabinet_x else "right")
    for _ in range(GRASP_ATTEMPTS):
        b = m.block(color)
        yaw = _nearest_mod(b.yaw, 0.0, grasp_period(b))  # palm along y: narrowest across the opening
        over = b.top + 0.03
        yield from travel(m, [b.pos[0], CABINET_APPROACH_Y, over], yaw, OPEN)
        yield from m.move([b.pos[0], b.pos[1], over], yaw, tol=0.008)
        yield from m.move(b.pos, yaw, tol=0.006)
        yield from m.wait(CLOSE_STEPS, CLOSE)
        if m.width > MIN_GRASP_WIDTH:
            break
        yield from m.wait(OPEN_STEPS, OPEN)
        yield from m.move([b.pos[0], b.pos[1], over], yaw, max_steps=20)
    yield from m.move(b.pos + [0, 0, 0.05], yaw, CLOSE)
    yield from m.move([b.pos[0], CABINET_APPROACH_Y, b.pos[2] + 0.05], yaw, CLOSE)


def lift_from_drawer(m: Motion, color: str) -> Actions:
    yield from empty_hand(m)

    def palm_along_x(m: Motion, b: Block) -> float:
        # The desk top overhangs the drawer's far half: only a palm along x fits the opening.
        return _nearest_mod(b.yaw, m.nearest_yaw(HAND_ACROSS_X), grasp_period(b))

    yaw = yield from pick(m, color, palm_along_x, drawer_grasp_point)
    b = m.block(color)
    yield from m.move([b.pos[0], b.pos[1], 0.15], yaw, CLOSE)


def place_in_slider(m: Motion) -> Actions:
    color = held_block(m)
    if color is not None:
        side = "left" if m.scene_obs[0] < scene.SLIDER_RANGE / 2 else "right"  # the uncovered half
        yield from uncover(m, side)
        spot = m.landmark(f"slider_{side}_spot")
        yaw = yaw_aligning(m, color, 0.0)  # long side along x, as the compartment is wide
        z = spot[2] + held_offset(m, color) + 0.015
        yield from travel(m, [spot[0], CABINET_APPROACH_Y, z + 0.01], yaw, CLOSE)
        yield from m.move([spot[0], spot[1], z + 0.01], yaw, tol=0.008)
        yield from m.move([spot[0], spot[1], z], yaw, tol=0.006, max_steps=20)
        yield from m.wait(OPEN_STEPS, OPEN)
        yield from m.move([spot[0], spot[1], z + 0.05], yaw, max_steps=20)
        yield from m.move([spot[0], CABINET_APPROACH_Y, z + 0.05], yaw, max_steps=40)


def place_in_drawer(m: Motion) -> Actions:
    color = held_block(m)
    if color is not None:
        yield from drop_into_drawer(m, color)


def stack(m: Motion) -> Actions:
    color = held_block(m)
    bases = table_blocks(m, exclude=color)
    if color is None or not bases:
        return
    base = min(bases, key=lambda b: b.pos[2])
    yaw = yaw_aligning(m, color, base.yaw)
    z = base.top + held_offset(m, color) + 0.012
    yield from travel(m, [base.pos[0], base.pos[1], z], yaw, CLOSE, above=0.08)
    yield from m.wait(OPEN_STEPS, OPEN)
    yield from m.move(m.tcp + [0, 0, 0.08], max_steps=20)


def unstack(m: Motion) -> Actions:
    yield from empty_hand(m)
    top = stacked_top(m)
    if top is None:
        return
    yaw = yield from pick(m, top.color)
    yield from m.move(m.tcp + [0, 0, 0.08], yaw, CLOSE, max_steps=30)
    yield from set_down(m, top.color)


def rotate(m: Motion, color: str, sign: int) -> Actions:
    yield from empty_hand(m)

    def yaw_with_room(m: Motion, b: Block) -> float:
        # Of the equivalent grasp yaws take the one that keeps grasp and end yaw nearest the
        # wrist's middle (yaw 0), so the turn never runs into joint 7's limit.
        return _nearest_mod(b.yaw, -sign * ROTATE_ANGLE / 2, grasp_period(b))

    yaw = yield from pick(m, color, yaw_with_room)
    b = m.block(color)
    yield from m.move(b.pos + [0, 0, 0.012], yaw, CLOSE, max_steps=20)
    yield from m.move(b.pos + [0, 0, 0.012], yaw + sign * ROTATE_ANGLE, CLOSE, max_steps=60)
    yield from m.move(b.pos + [0, 0, 0.002], yaw + sign * ROTATE_ANGLE, CLOSE, max_steps=15)
    yield from m.wait(OPEN_STEPS, OPEN)
    yield from m.move(m.tcp + [0, 0, 0.08], max_steps=20)


def push(m: Motion, color: str, sign: int) -> Actions:
    yield from empty_hand(m)
    b = m.block(color)
    reach = b.half_extent_x() + FINGER_HALF_THICKNESS
    yaw = m.nearest_yaw(0.0)  # fingers side by side along y: a flat pusher facing x
    start = [b.pos[0] - sign * (reach + 0.015), b.pos[1], PUSH_Z]
    yield from travel(m, start, yaw, CLOSE)
    end = [b.pos[0] + sign * (PUSH_DISTANCE - reach), b.pos[1], PUSH_Z]
    yield from m.move(end, yaw, CLOSE, tol=0.01, speed=PUSH_SPEED)
    yield from m.move(m.tcp + [0, 0, 0.1], max_steps=20)


def slide_door(m: Motion, target: float) -> Actions:
    """Push the sliding door until its joint reaches ``target`` (0 or SLIDER_RANGE, its stops).

    The flange cylinder (0.045 m radius, 0.115 m above the tool) would hit the door if the hand
    straddled the handle from above, so the side of the palm pushes the handle instead: tool
    low in front of the door, palm (along x) level with the bar."""
    yield from release_hand(m)
    handle = m.landmark("slider_handle")
    sign = 1.0 if target > m.scene_obs[0] else -1.0
    behind = panda.PALM_HALF[1] + SLIDER_HANDLE_HALF_X + 0.015
    start = np.array([handle[0] - sign * behind, SLIDER_PUSH_Y, handle[2] - SLIDER_PALM_DROP])
    yaw = m.nearest_yaw(HAND_ACROSS_X)
    # Down in front of the cabinet, then in: high up near the door the flange would touch it.
    yield from travel(m, [start[0], CABINET_APPROACH_Y, start[2]], yaw, CLOSE)
    yield from m.move(start, yaw, CLOSE, tol=0.006, max_steps=20)
    end = start + [target - m.scene_obs[0] + sign * 0.03, 0, 0]
    yield from m.move(end, yaw, CLOSE, speed=0.7, max_steps=60)
    yield from m.move([end[0], CABINET_APPROACH_Y, end[2]], yaw, CLOSE, max_steps=10)  # off the handle


def move_slider(m: Motion, sign: int) -> Actions:
    yield from empty_hand(m)
    yield from slide_door(m, scene.SLIDER_RANGE if sign > 0 else 0.0)
    yield from release_hand(m)


def open_drawer(m: Motion) -> Actions:
    yield from empty_hand(m)
    # Closed fingers between the front plate and the handle bar, then pull towards the robot.
    hook = m.landmark("drawer_handle") - [0, 0.032, 0.01]
    yaw = m.nearest_yaw(HAND_ACROSS_X)
    yield from travel(m, hook, yaw, CLOSE)
    yield from m.move(hook + [0, DRAWER_STROKE, 0], yaw, CLOSE, speed=0.6, max_steps=60)
    yield from release_hand(m)


def close_drawer(m: Motion) -> Actions:
    yield from empty_hand(m)
    front = m.landmark("drawer_handle") + [0, 0.03, 0]
    yaw = m.nearest_yaw(HAND_ACROSS_X)
    yield from travel(m, front, yaw, CLOSE)
    yield from m.move(front - [0, DRAWER_STROKE + 0.01, 0], yaw, CLOSE, speed=0.6, max_steps=60)
    yield from release_hand(m)


def flip_switch(m: Motion, sign: int) -> Actions:
    yield from empty_hand(m)
    lever = m.landmark("switch_lever")
    yaw = m.nearest_yaw(HAND_ACROSS_X)
    yield from travel(m, lever, yaw, OPEN)
    yield from m.wait(CLOSE_STEPS, CLOSE)
    yield from m.move(lever + [0, 0, sign * SWITCH_STROKE], yaw, CLOSE, speed=0.6, max_steps=40)
    yield from release_hand(m)


def press_button(m: Motion) -> Actions:
    yield from empty_hand(m)
    top = m.landmark("button_top")
    yaw = m.nearest_yaw(0.0)
    yield from travel(m, top + [0, 0, 0.03], yaw, CLOSE)
    yield from m.move(top - [0, 0, BUTTON_PRESS], yaw, CLOSE, tol=0.004, max_steps=25)
    yield from m.move(top + [0, 0, 0.06], yaw, CLOSE, max_steps=25)


def push_into_drawer(m: Motion) -> Actions:
    # The check only asks that the block leaves the table for the drawer without the robot
    # touching it at the end, so carrying it over and letting it drop is the reliable push.
    yield from empty_hand(m)
    blocks = [b for b in table_blocks(m) if b.pos[2] - b.size[2] / 2 < 0.03]
    if not blocks:
        return
    color = blocks[0].color
    yield from pick(m, color)
    yield from m.move(m.tcp + [0, 0, 0.05], None, CLOSE, max_steps=20)
    yield from drop_into_drawer(m, color)


# ---------------------------------------------------------------------------- task table


def _skill_table() -> dict[str, Callable[[Motion], Actions]]:
    table: dict[str, Callable[[Motion], Actions]] = {}
    for c in BLOCK_COLORS:
        for side, sign in (("right", -1), ("left", 1)):
            table[f"rotate_{c}_block_{side}"] = partial(rotate, color=c, sign=sign)
            table[f"push_{c}_block_{side}"] = partial(push, color=c, sign=sign)
        table[f"lift_{c}_block_table"] = partial(lift_from_table, color=c)
        table[f"lift_{c}_block_slider"] = partial(lift_from_slider, color=c)
        table[f"lift_{c}_block_drawer"] = partial(lift_from_drawer, color=c)
    table.update(
        move_slider_left=partial(move_slider, sign=1),
        move_slider_right=partial(move_slider, sign=-1),
        open_drawer=open_drawer,
        close_drawer=close_drawer,
        place_in_slider=place_in_slider,
        place_in_drawer=place_in_drawer,
        stack_block=stack,
        unstack_block=unstack,
        turn_on_lightbulb=partial(flip_switch, sign=1),
        turn_off_lightbulb=partial(flip_switch, sign=-1),
        turn_on_led=press_button,
        turn_off_led=press_button,
        push_into_drawer=push_into_drawer,
    )
    assert set(table) == set(task_names()), sorted(set(task_names()) ^ set(table))
    return table


SKILLS = _skill_table()


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!")


def _instruction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for task in task_names():
        for text in [eval_instruction(task), *train_instructions(task)]:
            key = _normalise(text)
            assert table.get(key, task) == task, f"instruction {text!r} names two tasks"
            table[key] = task
    return table


_INSTRUCTIONS: dict[str, str] | None = None


def task_for_instruction(text: str) -> str:
    """The task an evaluation instruction or training paraphrase asks for; UserError otherwise."""
    global _INSTRUCTIONS
    if _INSTRUCTIONS is None:
        _INSTRUCTIONS = _instruction_table()
    key = _normalise(str(text))
    if key in _INSTRUCTIONS:
        return _INSTRUCTIONS[key]
    raise UserError(
        f"ScriptedExpert does not know the instruction {text!r}.{did_you_mean(key, _INSTRUCTIONS)} "
        "It understands the evaluation instruction and the training paraphrases of each of the 34 tasks "
        "(dreamrt.sim.language); give it one of those."
    )


# ---------------------------------------------------------------------------- the policy


class ScriptedExpert:
    """A Policy that solves CALVIN-style tasks with scripted skills (see the module docstring)."""

    ACTION_MODES = ("rel_cartesian", "abs_cartesian")

    def __init__(
        self,
        scene: str = "D",
        seed: int = 0,
        noise: ExpertNoise | None = None,
        action_mode: str = "rel_cartesian",
    ):
        from dreamrt.sim import scene as scene_module

        choose("scene variant", scene, scene_module.SCENES)
        if action_mode not in self.ACTION_MODES:
            raise UserError(
                f"The scripted expert speaks Cartesian targets, not env.action_mode={action_mode!r}. "
                "Set env.action_mode=rel_cartesian (CALVIN's relative actions) or env.action_mode=abs_cartesian."
            )
        self.spec = PolicySpec(rate_hz=30.0, action_dim=7, horizon=1, n_obs_steps=1, action_mode=action_mode)
        if noise is not None and not isinstance(noise, ExpertNoise):
            raise UserError(
                f"ScriptedExpert noise must be an ExpertNoise or None, got {type(noise).__name__}."
            )
        self.scene = scene
        self.noise = noise
        self._landmarks = Landmarks(scene)
        self._seed = seed
        self.reset(seed)

    @property
    def task(self) -> str | None:
        """The task the current plan solves."""
        return self._task

    def reset(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int(self._rng.integers(2**31)) if hasattr(self, "_rng") else self._seed
        self._rng = np.random.default_rng(seed)
        self._motion = Motion(self._landmarks, self._rng)
        self._plan: Actions | None = None
        self._instruction: str | None = None
        self._task: str | None = None
        self._fresh = True

    def observe(self, observation: dict) -> None:
        pass  # the expert replans from each observation it acts on; skipped steps carry nothing

    def act(self, observation: dict) -> ActionChunk:
        instruction = observation.get("task")
        if not isinstance(instruction, str):
            raise UserError(
                f"ScriptedExpert needs the instruction string under 'task' in the observation, got "
                f"{type(instruction).__name__}."
            )
        m = self._motion
        m.obs = observation
        if self._plan is None or instruction != self._instruction:
            self._task = task_for_instruction(instruction)
            self._instruction = instruction
            self._plan = self._make_plan(self._task)
        action = next(self._plan)
        if self.spec.action_mode == "abs_cartesian":
            action = m.absolute_action(action[6])
        return ActionChunk(np.asarray(action, np.float32)[None], info={"task": self._task})

    def _make_plan(self, task: str) -> Actions:
        m, noise = self._motion, self.noise
        fresh, self._fresh = self._fresh, False
        if noise is not None:
            m.speed = float(self._rng.uniform(noise.speed_min, noise.speed_max))
            m.waypoint_noise = noise.waypoint_mm / 1000.0
            m.action_noise = noise.action_std

        def plan() -> Actions:
            if fresh or m.target_pos is None:
                yield from settle(m, noise.start_mm if noise is not None else 0.0)
            yield from SKILLS[task](m)
            yield from m.hold()

        return plan()
