"""The 34 CALVIN tasks as data, with their success checks.

A check compares two :class:`~dreamrt.sim.state.SceneState` snapshots, the one taken when
the subtask started and the current one, and says whether the subtask has been achieved
(CALVIN: "a subtask succeeds the first step its check fires"). Checks never touch MuJoCo,
so they run on constructed states in tests.

Categories follow CALVIN's evaluation code (``task_categories`` in
``calvin_agent/evaluation/multistep_sequences.py``): the five tasks of a chain must come from
five distinct categories. Rotations and pushes of blocks share one category, the three lift
sources are three categories, the four light switches are one. See ``docs/calvin_protocol.md``.

Conventions the checks rely on (the environment must produce them):
- ``BlockState.euler`` is (roll, pitch, yaw) with R = Rz(yaw) @ Ry(pitch) @ Rx(roll), as
  PyBullet's ``getEulerFromQuaternion`` that CALVIN's scene_obs uses.
- "left"/"right" for a push are +x/-x: the robot faces -y across the desk, so its left is +x
  (CALVIN's robot faces +y and uses -x; the sign follows the scene, the meaning does not); a rotation to the
  left is counter-clockwise seen from above (positive yaw).
- The slider joint grows to the left (0.28 m = left), the drawer joint grows when opening.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dreamrt.errors import UserError, did_you_mean
from dreamrt.sim.state import BLOCK_COLORS, SceneState

# Thresholds, as in CALVIN's task configuration.
ROTATE_MIN_YAW_DEG = 60.0  # relative yaw must go beyond this, the right way
ROTATE_MAX_YAW_DEG = 180.0
ROTATE_MAX_TILT_DEG = 30.0  # relative roll and pitch must stay under this
ROTATE_MAX_MOVE_M = 0.1  # the block may not travel further than this while rotated
PUSH_MIN_X_M = 0.1
SLIDER_MIN_M = 0.15
DRAWER_MIN_M = 0.12
LIFT_MIN_Z_M = {"table": 0.05, "slider": 0.03, "drawer": 0.05}
# CALVIN only rejects a stack above 1 m/s; we ask for a block that has actually settled so a
# block bouncing off another one does not count. A resting MuJoCo block moves ~1e-4 m/s.
STACK_MAX_SPEED_M_S = 0.05

BLOCK_SURFACES = frozenset(f"{color}_block" for color in BLOCK_COLORS)
# Where a lift_*_{source} task's block must start, as SceneState contact names.
LIFT_SOURCE_SURFACE = {"table": "table", "slider": "slider_cabinet", "drawer": "drawer"}

# CALVIN's 11 categories, in the order of its evaluation code.
CATEGORIES = (
    "move_block",  # rotate_* and push_*_left/right
    "slider",
    "drawer",
    "lift_table",
    "lift_slider",
    "lift_drawer",
    "place",  # place_in_slider, place_in_drawer
    "lights",  # lightbulb and LED, on and off
    "push_into_drawer",
    "stack",
    "unstack",
)

Check = Callable[[SceneState, SceneState], bool]


@dataclass(frozen=True)
class Task:
    name: str
    category: str  # one of CATEGORIES
    check: Check  # check(start, now) -> True once the task is achieved
    success: str  # the check in words, for docs and error messages

    def __post_init__(self) -> None:
        assert self.category in CATEGORIES, self.category


# --- geometry ---------------------------------------------------------------------------


def euler_to_matrix(euler: np.ndarray) -> np.ndarray:
    """(3,) roll, pitch, yaw -> (3, 3) rotation Rz(yaw) @ Ry(pitch) @ Rx(roll)."""
    roll, pitch, yaw = (float(a) for a in euler)
    cr, sr, cp, sp, cy, sy = (
        np.cos(roll),
        np.sin(roll),
        np.cos(pitch),
        np.sin(pitch),
        np.cos(yaw),
        np.sin(yaw),
    )
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def matrix_to_euler(rot: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (3,) roll, pitch, yaw, the inverse of :func:`euler_to_matrix`.
    Roll and yaw come out in (-pi, pi], so yaw differences never need manual wrapping."""
    pitch = np.arcsin(np.clip(-rot[2, 0], -1.0, 1.0))
    roll = np.arctan2(rot[2, 1], rot[2, 2])
    yaw = np.arctan2(rot[1, 0], rot[0, 0])
    return np.array([roll, pitch, yaw])


def relative_rotation_deg(start_euler: np.ndarray, now_euler: np.ndarray) -> np.ndarray:
    """(3,) roll, pitch, yaw in degrees of the world-frame rotation taking the start
    orientation to the current one (R_now @ R_start^T, CALVIN's ``end * start.inv()``)."""
    rel = euler_to_matrix(now_euler) @ euler_to_matrix(start_euler).T
    return np.degrees(matrix_to_euler(rel))


# --- checks -----------------------------------------------------------------------------


def _rotate(color: str, direction: int) -> Check:
    def check(start: SceneState, now: SceneState) -> bool:
        b0, b1 = start.blocks[color], now.blocks[color]
        if np.linalg.norm(b1.pos - b0.pos) > ROTATE_MAX_MOVE_M:
            return False
        if not (b1.contacts - {"robot"}):  # held in the air by the robot is not a rotation
            return False
        roll, pitch, yaw = relative_rotation_deg(b0.euler, b1.euler)
        if abs(roll) >= ROTATE_MAX_TILT_DEG or abs(pitch) >= ROTATE_MAX_TILT_DEG:
            return False
        return ROTATE_MIN_YAW_DEG < direction * yaw < ROTATE_MAX_YAW_DEG

    return check


def _push(color: str, direction: int) -> Check:
    def check(start: SceneState, now: SceneState) -> bool:
        b0, b1 = start.blocks[color], now.blocks[color]
        surfaces = b0.contacts - {"robot"}
        # Sliding, not carrying: what it rested on at the start it still rests on.
        if not surfaces or not surfaces <= b1.contacts:
            return False
        return direction * float(b1.pos[0] - b0.pos[0]) > PUSH_MIN_X_M

    return check


def _joint(attr: str, threshold: float, direction: int) -> Check:
    def check(start: SceneState, now: SceneState) -> bool:
        return direction * (getattr(now, attr) - getattr(start, attr)) > threshold

    return check


def _lift(color: str, source: str) -> Check:
    surface, min_z = LIFT_SOURCE_SURFACE[source], LIFT_MIN_Z_M[source]

    def check(start: SceneState, now: SceneState) -> bool:
        b0, b1 = start.blocks[color], now.blocks[color]
        # As CALVIN: the robot may already touch the block at the start (e.g. right after a
        # push); only the source surface contact at the start and the robot alone at the end count.
        return surface in b0.contacts and b1.contacts == {"robot"} and float(b1.pos[2] - b0.pos[2]) > min_z

    return check


def _place(surface: str) -> Check:
    def check(start: SceneState, now: SceneState) -> bool:
        held = [c for c in BLOCK_COLORS if "robot" in start.blocks[c].contacts]
        if len(held) != 1:
            return False
        b0, b1 = start.blocks[held[0]], now.blocks[held[0]]
        return b0.contacts == {"robot"} and "robot" not in b1.contacts and surface in b1.contacts

    return check


def _stack(start: SceneState, now: SceneState) -> bool:
    for color in BLOCK_COLORS:
        b0, b1 = start.blocks[color], now.blocks[color]
        if (
            not (b0.contacts & BLOCK_SURFACES)
            and b1.contacts
            and b1.contacts <= BLOCK_SURFACES
            and float(np.linalg.norm(b1.lin_vel)) < STACK_MAX_SPEED_M_S
        ):
            return True
    return False


def _unstack(start: SceneState, now: SceneState) -> bool:
    for color in BLOCK_COLORS:
        b0, b1 = start.blocks[color], now.blocks[color]
        if b0.contacts and b0.contacts <= BLOCK_SURFACES and not (b1.contacts & BLOCK_SURFACES):
            return True
    return False


def _light(attr: str, before: int, after: int) -> Check:
    def check(start: SceneState, now: SceneState) -> bool:
        return int(getattr(start, attr)) == before and int(getattr(now, attr)) == after

    return check


def _push_into_drawer(start: SceneState, now: SceneState) -> bool:
    for color in BLOCK_COLORS:
        b0, b1 = start.blocks[color], now.blocks[color]
        if b0.contacts == {"table"} and "drawer" in b1.contacts and "robot" not in b1.contacts:
            return True
    return False


# --- the table --------------------------------------------------------------------------


def _build_tasks() -> dict[str, Task]:
    tasks: list[Task] = []
    for color in BLOCK_COLORS:
        for side, sign in (("right", -1), ("left", 1)):
            tasks.append(
                Task(
                    f"rotate_{color}_block_{side}",
                    "move_block",
                    _rotate(color, sign),
                    f"relative yaw {'>' if sign > 0 else '<'} {sign * ROTATE_MIN_YAW_DEG:+.0f} deg "
                    f"({'counter-clockwise' if sign > 0 else 'clockwise'} from above), roll and pitch within +-"
                    f"{ROTATE_MAX_TILT_DEG:.0f} deg, moved <= {ROTATE_MAX_MOVE_M} m, touches something "
                    "other than the robot at the end",
                )
            )
    for color in BLOCK_COLORS:
        for side, sign in (("right", -1), ("left", 1)):
            tasks.append(
                Task(
                    f"push_{color}_block_{side}",
                    "move_block",
                    _push(color, sign),
                    f"x moved {'>' if sign > 0 else '<'} {sign * PUSH_MIN_X_M:+.1f} m; its non-robot "
                    "contacts at the start (at least one) are all still present at the end",
                )
            )
    tasks += [
        Task(
            "move_slider_left",
            "slider",
            _joint("slider", SLIDER_MIN_M, 1),
            f"slider joint changed by > +{SLIDER_MIN_M} m",
        ),
        Task(
            "move_slider_right",
            "slider",
            _joint("slider", SLIDER_MIN_M, -1),
            f"slider joint changed by < -{SLIDER_MIN_M} m",
        ),
        Task(
            "open_drawer",
            "drawer",
            _joint("drawer", DRAWER_MIN_M, 1),
            f"drawer joint changed by > +{DRAWER_MIN_M} m",
        ),
        Task(
            "close_drawer",
            "drawer",
            _joint("drawer", DRAWER_MIN_M, -1),
            f"drawer joint changed by < -{DRAWER_MIN_M} m",
        ),
    ]
    for color in BLOCK_COLORS:
        for source in ("table", "slider", "drawer"):
            tasks.append(
                Task(
                    f"lift_{color}_block_{source}",
                    f"lift_{source}",
                    _lift(color, source),
                    f"z up > {LIFT_MIN_Z_M[source]} m; touched {LIFT_SOURCE_SURFACE[source]} at the start "
                    "(the robot may touch it too, as in CALVIN); touches only the robot at the end",
                )
            )
    tasks += [
        Task(
            "place_in_slider",
            "place",
            _place("slider_cabinet"),
            "at the start exactly one block touches the robot and only the robot; at the end the robot no "
            "longer touches it and it touches slider_cabinet",
        ),
        Task(
            "place_in_drawer",
            "place",
            _place("drawer"),
            "at the start exactly one block touches the robot and only the robot; at the end the robot no "
            "longer touches it and it touches drawer",
        ),
        Task(
            "stack_block",
            "stack",
            _stack,
            "some block touched no block at the start, touches only blocks (at least one) at the end and "
            f"moves slower than {STACK_MAX_SPEED_M_S} m/s",
        ),
        Task(
            "unstack_block",
            "unstack",
            _unstack,
            "some block touched only blocks (at least one) at the start and touches no block at the end",
        ),
        Task("turn_on_lightbulb", "lights", _light("lightbulb", 0, 1), "lightbulb 0 at the start, 1 now"),
        Task("turn_off_lightbulb", "lights", _light("lightbulb", 1, 0), "lightbulb 1 at the start, 0 now"),
        Task("turn_on_led", "lights", _light("led", 0, 1), "LED 0 at the start, 1 now"),
        Task("turn_off_led", "lights", _light("led", 1, 0), "LED 1 at the start, 0 now"),
        Task(
            "push_into_drawer",
            "push_into_drawer",
            _push_into_drawer,
            "some block touched only the table at the start and touches the drawer, not the robot, at the end",
        ),
    ]
    table = {t.name: t for t in tasks}
    assert len(table) == 34 == len(tasks)
    return table


TASKS: dict[str, Task] = _build_tasks()


def task_names() -> list[str]:
    """The 34 task names in a fixed order (blocks' rotations, pushes, slider, drawer, lifts,
    places, stack, unstack, lights, push_into_drawer)."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; a UserError suggesting the closest name otherwise."""
    if name in TASKS:
        return TASKS[name]
    raise UserError(
        f"Unknown CALVIN task {name!r}.{did_you_mean(str(name), TASKS)} Expected one of the 34 names of "
        "dreamrt.sim.tasks.task_names(), e.g. 'open_drawer' or 'lift_red_block_table'; fix the task name."
    )


def check_success(task_name: str, start: SceneState, now: SceneState) -> bool:
    """Whether ``task_name`` is achieved in ``now`` relative to the subtask's ``start``."""
    return bool(get_task(task_name).check(start, now))


def category_of(task_name: str) -> str:
    """The CALVIN category of ``task_name`` (one of CATEGORIES)."""
    return get_task(task_name).category
