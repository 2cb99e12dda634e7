"""Plain data shared by the CALVIN-style environment, its task checks and its protocol.

The environment produces a :class:`SceneState` snapshot from MuJoCo each step; the task
checks compare two snapshots (subtask start vs now) and never touch MuJoCo themselves, so
they are testable on constructed states. :class:`SymbolicState` is the protocol's coarse
description of a scene (CALVIN's 192 start states and the state a chain of tasks leads to);
the environment can be reset into any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BLOCK_COLORS = ("red", "blue", "pink")

# What a block can touch, as named by SceneState.contacts. Every MuJoCo geom of the scene
# maps to exactly one of these names.
SURFACES = (
    "table",  # the desk top
    "drawer",  # the drawer's inside
    "slider_cabinet",  # the shelf behind the sliding door
    "robot",  # any link or finger of the arm
    "red_block",
    "blue_block",
    "pink_block",
    "furniture",  # anything else: cabinet walls, door, button, switch, handles
)

# Symbolic block locations used by the protocol and by environment resets.
BLOCK_LOCATIONS = ("table", "slider_left", "slider_right", "drawer", "stacked", "grasped")


@dataclass(frozen=True)
class BlockState:
    pos: np.ndarray  # (3,) world xyz, metres
    euler: np.ndarray  # (3,) roll, pitch, yaw (xyz convention, radians) as CALVIN's scene_obs
    lin_vel: np.ndarray  # (3,) m/s; "at rest" checks use its norm
    contacts: frozenset[str]  # names from SURFACES this block touches now (never itself)

    def __eq__(self, other: object) -> bool:
        # The generated __eq__ would compare numpy arrays elementwise and fail on truth testing.
        if not isinstance(other, BlockState):
            return NotImplemented
        return (
            np.array_equal(self.pos, other.pos)
            and np.array_equal(self.euler, other.euler)
            and np.array_equal(self.lin_vel, other.lin_vel)
            and self.contacts == other.contacts
        )

    __hash__ = None  # mutable numpy fields: not hashable


@dataclass(frozen=True)
class SceneState:
    slider: float  # sliding door joint, metres in [0, 0.28]; 0.28 = left
    drawer: float  # drawer joint, metres in [0, 0.22]; 0.22 = open
    button: float  # button joint, metres in [0, 0.02]
    switch: float  # switch joint, metres in [0, 0.088]
    lightbulb: int  # 1 while the switch is above its midpoint
    led: int  # toggled by each press of the button past its midpoint
    blocks: dict[str, BlockState]  # keyed by colour, see BLOCK_COLORS
    tcp_pos: np.ndarray = field(default_factory=lambda: np.zeros(3))  # (3,) tool centre point
    gripper_width: float = 0.0  # metres between the fingers

    def __eq__(self, other: object) -> bool:
        # Exact comparison with numpy-aware fields (gymnasium's determinism check compares infos).
        if not isinstance(other, SceneState):
            return NotImplemented
        scalars = ("slider", "drawer", "button", "switch", "lightbulb", "led", "gripper_width")
        return (
            all(getattr(self, k) == getattr(other, k) for k in scalars)
            and self.blocks == other.blocks
            and np.array_equal(self.tcp_pos, other.tcp_pos)
        )

    __hash__ = None  # mutable numpy fields: not hashable

    def scene_obs(self) -> np.ndarray:
        """CALVIN's 24-d scene observation: slider, drawer, button, switch, lightbulb, LED,
        then xyz + euler of the red, blue and pink blocks."""
        parts = [np.array([self.slider, self.drawer, self.button, self.switch, self.lightbulb, self.led])]
        for color in BLOCK_COLORS:
            parts += [self.blocks[color].pos, self.blocks[color].euler]
        return np.concatenate(parts).astype(np.float64)


@dataclass(frozen=True)
class SymbolicState:
    """A scene as the protocol sees it; the environment realises it with concrete poses."""

    led: int
    lightbulb: int
    slider: str  # "left" or "right"
    drawer: str  # "open" or "closed"
    blocks: dict[str, str]  # colour -> one of BLOCK_LOCATIONS

    def __post_init__(self) -> None:
        if self.slider not in ("left", "right"):
            raise ValueError(f"slider must be 'left' or 'right', got {self.slider!r}")
        if self.drawer not in ("open", "closed"):
            raise ValueError(f"drawer must be 'open' or 'closed', got {self.drawer!r}")
        if set(self.blocks) != set(BLOCK_COLORS):
            raise ValueError(f"blocks must name exactly {BLOCK_COLORS}, got {sorted(self.blocks)}")
        for color, where in self.blocks.items():
            if where not in BLOCK_LOCATIONS:
                raise ValueError(
                    f"block {color!r} at unknown location {where!r}; expected one of {BLOCK_LOCATIONS}"
                )
