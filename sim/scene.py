"""The CALVIN-style tabletop as MJCF, generated from a dataclass of scene parameters.

World frame (metres): z up; the desk top is z = 0; the robot base stands on a pedestal at the
origin, level with the desk top, and faces -y across the desk; +x is "left" as seen by the
robot and by the static camera behind it (CALVIN's push-left task moves a block towards +x).

Layout (x ranges move with the variant's ``cabinet_x`` / ``drawer_x``):

- desk: top 1.5 x 0.6 m, x in [-0.75, 0.75], y in [-0.80, -0.20]; blocks start on the table
  region x in [-0.30, 0.30], y in [-0.43, -0.27].
- slider cabinet at the far edge: a shelf (top at z = 0.05) 0.64 m wide and 0.18 m deep
  behind its open front at y = -0.60, under a roof at z = 0.50; a sliding door (joint
  ``slider``, 0..0.28 m, +x; 0.28 = "left") covers the right (-x) half of the opening at 0
  and the left half at 0.28; a bar handle sticks out of its front towards the robot.
- drawer under the desk top at the near edge, opening towards the robot (joint ``drawer``,
  0..0.22 m, +y; 0.22 = open), 0.24 x 0.24 m inside, floor at z = -0.12; its front plate
  rises 0.025 m above the desk top and carries a horizontal handle bar at desk level.
- button on the desk (joint ``button``, pressed 0..0.02 m down, spring-returned), with the
  green LED beside it; the environment toggles the LED on each press past 0.01.
- switch: a lever on the robot-facing side of a post (joint ``switch``, 0..0.088 m up);
  the yellow lightbulb on the cabinet roof is lit while the switch is above 0.044.
- three free blocks (red, blue, pink) of the variant's sizes.

Every geom is named ``<surface>/<part>`` where ``<surface>`` is one of
:data:`dreamrt.sim.state.SURFACES`; :func:`geom_surface` reads that mapping back. Named sites
(see :data:`LANDMARKS`) mark the handles, the button, the lever and the block spots for
scripted controllers. Lights cast no shadows and the visual quality settings keep offscreen
rendering fast (about 0.7 ms for a 96x96 plus a 64x64 frame on a 2-core CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.sim import panda
from dreamrt.sim.state import BLOCK_COLORS, SURFACES

TIMESTEP = 1.0 / 240.0
ROBOT_BASE = (0.0, 0.0, 0.0)
ROBOT_YAW = -math.pi / 2  # the arm's forward axis points along world -y

DESK_X = (-0.75, 0.75)
DESK_Y = (-0.80, -0.20)
DESK_THICKNESS = 0.04
FLOOR_Z = -0.75
# Table blocks start here: the far edge keeps a palm (0.09 m half-width) grasping across y
# clear of the door handle, which reaches y = -0.528; the near edge keeps every block on the
# desk top (it ends at y = -0.20) whatever its yaw.
TABLE_REGION = ((-0.30, 0.30), (-0.43, -0.27))  # x range, y range where table blocks start

CABINET_FRONT_Y = -0.60
CABINET_DEPTH = 0.18
CABINET_HALF_WIDTH = 0.32  # inside
SHELF_Z = 0.05
CABINET_ROOF_Z = 0.50
SLIDER_RANGE = 0.28
DOOR_HALF_WIDTH = 0.15

DRAWER_RANGE = 0.22
DRAWER_CLOSED_Y = -0.33  # drawer body centre when closed
DRAWER_CENTER_Z = -0.09
DRAWER_HALF = (0.13, 0.12, 0.04)  # outer half sizes of the drawer box
DRAWER_FLOOR_Z = -0.12  # world z of the drawer's inner floor
DRAWER_PLATE_TOP = 0.025  # the drawer's front plate rises this far above the desk top
DRAWER_HANDLE_Z = 0.0  # world z of the handle bar's axis
DRAWER_HANDLE_STANDOFF = 0.065  # handle axis in front of the front plate (room for open fingers)

BUTTON_RANGE = 0.02
SWITCH_RANGE = 0.088
SWITCH_LEVER_Z0 = 0.08  # lever height when the switch is at 0
SLIDER_HANDLE_Z = 0.17  # world z of the door handle's centre
# Joint limits of the furniture: a short time constant (the smallest MuJoCo keeps stable at
# 240 Hz is 2 timesteps) so the arm cannot push a part far past its end stop.
STIFF_LIMIT = 'solreflimit="0.009 1" solimplimit="0.95 0.99 0.001"'

# CALVIN scene D's block sizes (full extents, metres) at block_scale 1.
BLOCK_SIZE = {"red": (0.07, 0.05, 0.05), "blue": (0.05, 0.05, 0.05), "pink": (0.10, 0.05, 0.05)}
BLOCK_RGBA = {"red": (0.85, 0.12, 0.1, 1), "blue": (0.12, 0.3, 0.85, 1), "pink": (0.95, 0.5, 0.72, 1)}
BLOCK_DENSITY = 1000.0  # kg/m^3: 0.125-0.25 kg blocks, light enough for a firm grasp, heavy enough to push
BLOCK_FRICTION = 1.0

# Sites for scripted controllers: name -> what it marks.
LANDMARKS = {
    "tcp": "tool centre point, between the finger pads",
    "slider_handle": "middle of the sliding door's handle bar (moves with the door)",
    "drawer_handle": "middle of the drawer's handle bar (moves with the drawer)",
    "button_top": "centre of the button cap's top face (moves with the button)",
    "switch_lever": "tip region of the switch lever (moves with the switch)",
    "slider_left_spot": "shelf spot behind the left (+x) half of the door opening, at shelf height",
    "slider_right_spot": "shelf spot behind the right (-x) half of the door opening, at shelf height",
    "drawer_spot": "centre of the drawer's floor (moves with the drawer)",
    "lightbulb": "the lightbulb on the cabinet roof",
    "led": "the LED beside the button",
}

DESK_TEXTURES = ("checker", "flat", "gradient")


@dataclass(frozen=True)
class SceneConfig:
    """One scene variant: desk look, furniture placement and block size."""

    name: str = "D"
    desk_texture: str = "checker"  # one of DESK_TEXTURES
    desk_rgb1: tuple[float, float, float] = (0.72, 0.74, 0.76)
    desk_rgb2: tuple[float, float, float] = (0.64, 0.66, 0.70)
    cabinet_x: float = -0.05  # x of the slider cabinet's centre
    drawer_x: float = -0.27  # x of the drawer's centre
    button_xy: tuple[float, float] = (0.52, -0.30)
    switch_xy: tuple[float, float] = (-0.55, -0.42)
    block_scale: float = 1.0  # multiplies BLOCK_SIZE

    def __post_init__(self) -> None:
        choose("desk texture", self.desk_texture, DESK_TEXTURES)
        if not -0.35 <= self.cabinet_x <= 0.35:
            raise UserError(
                f"SceneConfig.cabinet_x={self.cabinet_x} puts the cabinet off the desk or out of reach; "
                "expected a value in [-0.35, 0.35]."
            )
        if not 0.16 <= abs(self.drawer_x) <= 0.45:
            raise UserError(
                f"SceneConfig.drawer_x={self.drawer_x} collides with the robot pedestal or leaves the desk; "
                "expected |drawer_x| in [0.16, 0.45]."
            )
        if not 0.8 <= self.block_scale <= 1.15:
            raise UserError(
                f"SceneConfig.block_scale={self.block_scale} makes blocks the gripper cannot hold "
                "(it opens 0.08 m); expected a value in [0.8, 1.15]."
            )
        for name, (x, y) in (("button_xy", self.button_xy), ("switch_xy", self.switch_xy)):
            if not (0.45 <= abs(x) <= 0.65 and -0.5 <= y <= -0.25):
                raise UserError(
                    f"SceneConfig.{name}=({x}, {y}) is inside the block region or off the desk; "
                    "expected 0.45 <= |x| <= 0.65 and -0.5 <= y <= -0.25."
                )

    def block_size(self, color: str) -> np.ndarray:
        """Full extents (3,) of a block in this scene, metres."""
        return np.array(BLOCK_SIZE[color]) * self.block_scale


# CALVIN's four environments differ in desk texture, furniture placement and block size;
# D is the evaluation scene.
SCENES = {
    "A": SceneConfig(
        name="A",
        desk_texture="checker",
        desk_rgb1=(0.78, 0.62, 0.45),
        desk_rgb2=(0.70, 0.54, 0.38),
        cabinet_x=-0.08,
        drawer_x=0.27,
        button_xy=(-0.52, -0.30),
        switch_xy=(0.55, -0.42),
        block_scale=1.1,
    ),
    "B": SceneConfig(
        name="B",
        desk_texture="flat",
        desk_rgb1=(0.55, 0.62, 0.52),
        desk_rgb2=(0.50, 0.56, 0.47),
        cabinet_x=0.08,
        drawer_x=-0.27,
        button_xy=(0.52, -0.30),
        switch_xy=(-0.55, -0.42),
        block_scale=1.05,
    ),
    "C": SceneConfig(
        name="C",
        desk_texture="gradient",
        desk_rgb1=(0.45, 0.32, 0.22),
        desk_rgb2=(0.62, 0.46, 0.32),
        cabinet_x=0.0,
        drawer_x=0.27,
        button_xy=(0.52, -0.40),
        switch_xy=(-0.55, -0.32),
        block_scale=0.95,
    ),
    "D": SceneConfig(),
}


def scene_config(name: str) -> SceneConfig:
    """The preset for scene variant ``name`` ("A" .. "D")."""
    return SCENES[choose("scene variant", name, SCENES)]


def geom_surface(geom_name: str) -> str:
    """The SURFACES name a geom belongs to: the part of its name before the first slash."""
    surface = geom_name.split("/", 1)[0]
    if surface not in SURFACES or "/" not in geom_name:
        raise ValueError(
            f"geom {geom_name!r} does not follow the '<surface>/<part>' naming; surfaces: {SURFACES}"
        )
    return surface


def slider_spot(cfg: SceneConfig, side: str) -> np.ndarray:
    """World xyz of the shelf spot behind the left (+x) or right (-x) half of the opening."""
    sign = 1.0 if side == "left" else -1.0
    # 0.07 m behind the opening: a palm grasping across y (0.09 m half-width) clears the back wall.
    return np.array([cfg.cabinet_x + sign * 0.16, CABINET_FRONT_Y - 0.07, SHELF_Z])


def _fmt(values) -> str:
    return " ".join(f"{float(v):.6g}" for v in values)


def _box(name: str, lo, hi, cls: str = "world", extra: str = "") -> str:
    """A box geom spanning the corners lo..hi (world or body frame)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return (
        f'<geom name="{name}" type="box" pos="{_fmt((lo + hi) / 2)}" size="{_fmt((hi - lo) / 2)}" '
        f'class="{cls}" {extra}/>'
    )


def _look_at(pos, target) -> str:
    """MJCF ``xyaxes`` for a camera at ``pos`` looking at ``target`` with world z up."""
    f = np.asarray(target, float) - np.asarray(pos, float)
    f /= np.linalg.norm(f)
    right = np.cross(f, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, f)
    return _fmt(np.concatenate([right, up]))


GRIPPER_CAMERA_POS = (-0.05, 0.0, 0.06)  # in the hand frame (fingers point along +z)
GRIPPER_CAMERA_TILT = 0.3  # x over z of the viewing direction, towards the fingers
STATIC_CAMERA_POS = (0.0, 0.62, 1.1)  # behind and above the robot, looking over it at the desk
STATIC_CAMERA_TARGET = (0.0, -0.45, 0.0)


def _desk(cfg: SceneConfig) -> str:
    (x0, x1), (y0, y1) = DESK_X, DESK_Y
    dx = cfg.drawer_x
    parts = [
        '<body name="desk">',
        _box("table/top", (x0, y0, -DESK_THICKNESS), (x1, y1, 0.0), extra='material="desk"'),
    ]
    for i, (lx, ly) in enumerate(
        ((x0 + 0.05, y0 + 0.05), (x1 - 0.05, y0 + 0.05), (x0 + 0.05, y1 - 0.05), (x1 - 0.05, y1 - 0.05))
    ):
        parts.append(
            _box(
                f"furniture/desk_leg{i}",
                (lx - 0.03, ly - 0.03, FLOOR_Z),
                (lx + 0.03, ly + 0.03, -DESK_THICKNESS),
                extra='material="wood"',
            )
        )
    # The drawer's housing under the desk top: two sides, a floor and a back.
    hx, hy = DRAWER_HALF[0] + 0.015, DRAWER_HALF[1]
    back_y = DRAWER_CLOSED_Y - hy - 0.015
    bottom = DRAWER_CENTER_Z - DRAWER_HALF[2] - 0.02
    for side, sx in (("l", dx + hx), ("r", dx - hx)):
        parts.append(
            _box(
                f"furniture/drawer_housing_{side}",
                (sx - 0.008, back_y, bottom),
                (sx + 0.008, y1, -DESK_THICKNESS),
                extra='material="wood"',
            )
        )
    parts.append(
        _box(
            "furniture/drawer_housing_floor",
            (dx - hx, back_y, bottom - 0.01),
            (dx + hx, y1, bottom),
            extra='material="wood"',
        )
    )
    parts.append(
        _box(
            "furniture/drawer_housing_back",
            (dx - hx, back_y - 0.01, bottom),
            (dx + hx, back_y, -DESK_THICKNESS),
            extra='material="wood"',
        )
    )
    parts.append("</body>")
    # The robot's pedestal, level with the desk top.
    parts.append('<body name="pedestal">')
    parts.append(
        _box("furniture/pedestal", (-0.12, -0.12, FLOOR_Z), (0.12, 0.12, 0.0), extra='material="metal"')
    )
    parts.append("</body>")
    return "\n".join(parts)


def _cabinet(cfg: SceneConfig) -> str:
    cx, w = cfg.cabinet_x, CABINET_HALF_WIDTH
    yf, yb = CABINET_FRONT_Y, CABINET_FRONT_Y - CABINET_DEPTH
    t = 0.02  # wall thickness
    roof = CABINET_ROOF_Z
    bulb = (cx + w - 0.06, (yf + yb) / 2, roof + 0.03 + 0.03)
    parts = [
        '<body name="cabinet">',
        _box(
            "slider_cabinet/shelf",
            (cx - w - t, yb - t, 0.0),
            (cx + w + t, yf, SHELF_Z),
            extra='material="cabinet"',
        ),
        _box(
            "furniture/cabinet_wall_r",
            (cx - w - t, yb - t, SHELF_Z),
            (cx - w, yf, roof),
            extra='material="cabinet"',
        ),
        _box(
            "furniture/cabinet_wall_l",
            (cx + w, yb - t, SHELF_Z),
            (cx + w + t, yf, roof),
            extra='material="cabinet"',
        ),
        _box(
            "furniture/cabinet_back",
            (cx - w, yb - t, SHELF_Z),
            (cx + w, yb, roof),
            extra='material="cabinet"',
        ),
        _box(
            "furniture/cabinet_roof",
            (cx - w - t, yb - t, roof),
            (cx + w + t, yf, roof + 0.03),
            extra='material="cabinet"',
        ),
        f'<geom name="furniture/lightbulb_socket" type="cylinder" size="0.02 0.015" pos="{_fmt((bulb[0], bulb[1], roof + 0.045))}" class="visual" rgba="0.3 0.3 0.3 1"/>',
        f'<geom name="furniture/lightbulb" type="sphere" size="0.03" pos="{_fmt(bulb)}" class="visual" material="bulb_off"/>',
        f'<site name="lightbulb" pos="{_fmt(bulb)}" size="0.01" group="4"/>',
        f'<site name="slider_left_spot" pos="{_fmt(slider_spot(cfg, "left"))}" size="0.01" group="4"/>',
        f'<site name="slider_right_spot" pos="{_fmt(slider_spot(cfg, "right"))}" size="0.01" group="4"/>',
        "</body>",
    ]
    # The door: at joint 0 it covers the right (-x) half of the opening.
    door_h = (roof - SHELF_Z) / 2 - 0.005
    handle_z = SLIDER_HANDLE_Z - (SHELF_Z + roof) / 2  # in the door's frame
    door_pos = (cx - w + DOOR_HALF_WIDTH, yf + 0.012, SHELF_Z + (roof - SHELF_Z) / 2)
    parts += [
        f'<body name="slider_door" pos="{_fmt(door_pos)}">',
        f'  <joint name="slider" type="slide" axis="1 0 0" range="0 {SLIDER_RANGE}" damping="20" frictionloss="2" armature="2" {STIFF_LIMIT}/>',
        f'  <geom name="furniture/slider_door" type="box" size="{DOOR_HALF_WIDTH} 0.01 {door_h}" class="world" material="door" mass="1.5"/>',
        # A bar sticking out towards the robot, low on the door so the wrist stays clear of the
        # roof: open fingers straddle it from above and push or pull the door along x.
        f'  <geom name="furniture/slider_handle" type="box" size="0.014 0.025 0.03" pos="0 0.035 {handle_z}" class="world" material="metal" mass="0.1"/>',
        f'  <site name="slider_handle" pos="0 0.045 {handle_z}" size="0.01" group="4"/>',
        "</body>",
    ]
    return "\n".join(parts)


def _drawer(cfg: SceneConfig) -> str:
    hx, hy, hz = DRAWER_HALF
    t = 0.005
    floor_rel = DRAWER_FLOOR_Z - DRAWER_CENTER_Z  # the inner floor, in the drawer's frame
    # The front plate rises just above the desk top, and the handle bar sits at desk level,
    # stood off far enough for open fingers: a top-down hand can then grasp or hook it
    # without its palm meeting the desk top.
    plate_top = DRAWER_PLATE_TOP - DRAWER_CENTER_Z
    handle_z = DRAWER_HANDLE_Z - DRAWER_CENTER_Z
    handle_y = hy + 0.012 + DRAWER_HANDLE_STANDOFF
    return "\n".join(
        [
            f'<body name="drawer" pos="{_fmt((cfg.drawer_x, DRAWER_CLOSED_Y, DRAWER_CENTER_Z))}">',
            f'  <joint name="drawer" type="slide" axis="0 1 0" range="0 {DRAWER_RANGE}" damping="20" frictionloss="2" armature="2" {STIFF_LIMIT}/>',
            _box(
                "drawer/floor",
                (-hx, -hy, floor_rel - 2 * t),
                (hx, hy, floor_rel),
                extra='material="drawer" mass="0.6"',
            ),
            _box(
                "drawer/wall_l",
                (hx - 2 * t, -hy, floor_rel),
                (hx, hy, hz),
                extra='material="drawer" mass="0.2"',
            ),
            _box(
                "drawer/wall_r",
                (-hx, -hy, floor_rel),
                (-hx + 2 * t, hy, hz),
                extra='material="drawer" mass="0.2"',
            ),
            _box(
                "drawer/wall_back",
                (-hx, -hy, floor_rel),
                (hx, -hy + 2 * t, hz),
                extra='material="drawer" mass="0.2"',
            ),
            _box(
                "drawer/front",
                (-hx - 0.01, hy, floor_rel - 2 * t),
                (hx + 0.01, hy + 0.012, plate_top),
                extra='material="door" mass="0.3"',
            ),
            f'  <geom name="furniture/drawer_handle" type="capsule" fromto="-0.07 {handle_y} {handle_z} 0.07 {handle_y} {handle_z}" size="0.01" class="world" material="metal" mass="0.05"/>',
            _box(
                "furniture/drawer_handle_post_l",
                (0.06, hy + 0.012, handle_z - 0.007),
                (0.074, handle_y, handle_z + 0.007),
                extra='material="metal" mass="0.01"',
            ),
            _box(
                "furniture/drawer_handle_post_r",
                (-0.074, hy + 0.012, handle_z - 0.007),
                (-0.06, handle_y, handle_z + 0.007),
                extra='material="metal" mass="0.01"',
            ),
            f'  <site name="drawer_handle" pos="0 {handle_y} {handle_z}" size="0.01" group="4"/>',
            f'  <site name="drawer_spot" pos="0 0 {floor_rel}" size="0.01" group="4"/>',
            "</body>",
        ]
    )


def _button_and_switch(cfg: SceneConfig) -> str:
    bx, by = cfg.button_xy
    sx, sy = cfg.switch_xy
    base_top = 0.03
    post_half = (0.04, 0.03, 0.105)
    return "\n".join(
        [
            f'<body name="button_base" pos="{_fmt((bx, by, 0))}">',
            _box(
                "furniture/button_base", (-0.05, -0.05, 0), (0.05, 0.05, base_top), extra='material="metal"'
            ),
            '  <geom name="furniture/led" type="sphere" size="0.012" pos="0.037 0.037 0.03" class="visual" material="led_off"/>',
            '  <site name="led" pos="0.037 0.037 0.03" size="0.01" group="4"/>',
            "</body>",
            f'<body name="button" pos="{_fmt((bx, by, base_top + 0.005))}" gravcomp="1">',
            # Pressing moves the cap down; a spring brings it back to 0.
            f'  <joint name="button" type="slide" axis="0 0 -1" range="0 {BUTTON_RANGE}" stiffness="300" damping="20" armature="1" {STIFF_LIMIT}/>',
            '  <geom name="furniture/button" type="cylinder" size="0.03 0.015" pos="0 0 0.015" class="world" material="button" mass="0.05"/>',
            '  <site name="button_top" pos="0 0 0.03" size="0.01" group="4"/>',
            "</body>",
            f'<body name="switch_base" pos="{_fmt((sx, sy, 0))}">',
            _box(
                "furniture/switch_post",
                (-post_half[0], -post_half[1], 0),
                (post_half[0], post_half[1], 2 * post_half[2]),
                extra='material="cabinet"',
            ),
            _box(
                "furniture/switch_slot",
                (-0.006, post_half[1], SWITCH_LEVER_Z0 - 0.02),
                (0.006, post_half[1] + 0.002, SWITCH_LEVER_Z0 + SWITCH_RANGE + 0.02),
                cls="visual",
                extra='rgba="0.1 0.1 0.1 1"',
            ),
            "</body>",
            f'<body name="switch" pos="{_fmt((sx, sy + post_half[1], SWITCH_LEVER_Z0))}">',
            # Armature gives the light furniture parts enough inertia that their (mass-scaled,
            # soft) joint limits hold against the stiff arm.
            f'  <joint name="switch" type="slide" axis="0 0 1" range="0 {SWITCH_RANGE}" damping="5" frictionloss="1" armature="0.5" {STIFF_LIMIT}/>',
            # A plain bar sticking out towards the robot: open fingers straddle it from above.
            # Long enough that the wrist above the grasp point clears the post.
            '  <geom name="furniture/switch_lever" type="box" size="0.014 0.045 0.014" pos="0 0.045 0" class="world" material="button" mass="0.05"/>',
            '  <site name="switch_lever" pos="0 0.065 0" size="0.01" group="4"/>',
            "</body>",
        ]
    )


def _blocks(cfg: SceneConfig) -> str:
    parts = []
    for i, color in enumerate(BLOCK_COLORS):
        half = cfg.block_size(color) / 2
        # Parked apart above the desk; resets place them properly.
        parts += [
            f'<body name="{color}_block" pos="{_fmt((-0.2 + 0.2 * i, -0.35, half[2] + 0.001))}">',
            f'  <freejoint name="{color}_block"/>',
            f'  <geom name="{color}_block/box" type="box" size="{_fmt(half)}" class="block" rgba="{_fmt(BLOCK_RGBA[color])}"/>',
            "</body>",
        ]
    return "\n".join(parts)


def _desk_texture(cfg: SceneConfig) -> str:
    rgb1, rgb2 = _fmt(cfg.desk_rgb1), _fmt(cfg.desk_rgb2)
    if cfg.desk_texture == "checker":
        return f'<texture name="desk" type="2d" builtin="checker" rgb1="{rgb1}" rgb2="{rgb2}" width="64" height="64"/>'
    if cfg.desk_texture == "flat":
        return (
            f'<texture name="desk" type="2d" builtin="flat" rgb1="{rgb1}" rgb2="{rgb2}" mark="random" '
            f'random="0.08" markrgb="{rgb2}" width="128" height="128"/>'
        )
    return f'<texture name="desk" type="2d" builtin="gradient" rgb1="{rgb1}" rgb2="{rgb2}" width="128" height="128"/>'


def build_mjcf(cfg: SceneConfig, offscreen_width: int = 96, offscreen_height: int = 96) -> str:
    """The whole scene as an MJCF string.

    ``offscreen_width`` / ``offscreen_height`` size MuJoCo's fixed offscreen framebuffer; it must
    hold all camera images side by side (:func:`dreamrt.sim.render.strip_size`).
    """
    # The wrist camera sits beside the palm, level with its lower face, and looks along the
    # fingers, tilted towards them: the finger pads frame the left and right of the image.
    look = np.array([GRIPPER_CAMERA_TILT, 0.0, 1.0])
    look /= np.linalg.norm(look)
    cam_y = np.array([look[2], 0.0, -look[0]])  # image up: towards the palm's +x side
    gripper_camera = (
        f'<camera name="gripper" pos="{_fmt(GRIPPER_CAMERA_POS)}" xyaxes="0 1 0 {_fmt(cam_y)}" fovy="75"/>'
    )
    return f"""<mujoco model="calvin_style_{cfg.name}">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP:.8f}" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <size memory="20M"/>
  <statistic extent="2" center="0 -0.4 0.2"/>
  <visual>
    <quality shadowsize="0" offsamples="0" numslices="10" numstacks="4" numquads="1"/>
    <global offwidth="{offscreen_width}" offheight="{offscreen_height}"/>
    <map znear="0.005" zfar="3"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
  </visual>
  <default>
    <default class="world">
      <geom contype="1" conaffinity="3" condim="3" friction="0.8 0.005 0.0001"/>
    </default>
    <default class="visual">
      <geom contype="0" conaffinity="0" group="1"/>
    </default>
    <default class="robot">
      <geom contype="2" conaffinity="1" condim="3" friction="0.8 0.005 0.0001" rgba="0.92 0.92 0.92 1"/>
    </default>
    <default class="finger">
      <geom contype="2" conaffinity="1" condim="4" friction="1.5 0.02 0.0001" solref="0.01 1"
            solimp="0.95 0.99 0.001" rgba="0.25 0.25 0.25 1"/>
    </default>
    <default class="block">
      <geom contype="1" conaffinity="3" condim="4" friction="{BLOCK_FRICTION} 0.01 0.0001" density="{BLOCK_DENSITY}"/>
    </default>
  </default>
  <asset>
    {_desk_texture(cfg)}
    <material name="desk" texture="desk" texrepeat="6 3" specular="0.1"/>
    <material name="wood" rgba="0.45 0.33 0.22 1"/>
    <material name="cabinet" rgba="0.86 0.84 0.78 1"/>
    <material name="door" rgba="0.55 0.42 0.30 1"/>
    <material name="drawer" rgba="0.66 0.52 0.36 1"/>
    <material name="metal" rgba="0.35 0.36 0.38 1"/>
    <material name="button" rgba="0.15 0.15 0.15 1"/>
    <material name="bulb_off" rgba="0.55 0.55 0.45 1"/>
    <material name="bulb_on" rgba="1 0.9 0.2 1" emission="1"/>
    <material name="led_off" rgba="0.05 0.25 0.05 1"/>
    <material name="led_on" rgba="0.2 1 0.2 1" emission="1"/>
    <texture name="floor" type="2d" builtin="flat" rgb1="0.42 0.42 0.44" width="16" height="16"/>
    <material name="floor" texture="floor"/>
  </asset>
  <worldbody>
    <light name="sun" directional="true" castshadow="false" pos="0 0 3" dir="0.2 0.3 -1" diffuse="0.55 0.55 0.55"/>
    <geom name="furniture/floor" type="box" pos="0 0 {FLOOR_Z - 0.05}" size="2 2 0.05" class="world" material="floor"/>
    <camera name="static" pos="{_fmt(STATIC_CAMERA_POS)}" xyaxes="{_look_at(STATIC_CAMERA_POS, STATIC_CAMERA_TARGET)}" fovy="50"/>
{_desk(cfg)}
{_cabinet(cfg)}
{_drawer(cfg)}
{_button_and_switch(cfg)}
{_blocks(cfg)}
{panda.arm_mjcf(ROBOT_BASE, ROBOT_YAW, gripper_camera)}
  </worldbody>
  <contact>
    <exclude body1="desk" body2="drawer"/>
    <exclude body1="cabinet" body2="slider_door"/>
    <exclude body1="button_base" body2="button"/>
    <exclude body1="switch_base" body2="switch"/>
  </contact>
  <equality>
    {panda.arm_equality_mjcf()}
  </equality>
  <actuator>
{panda.arm_actuators_mjcf()}
  </actuator>
</mujoco>
"""
