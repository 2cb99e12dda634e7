"""A 7-DoF arm with Franka Panda kinematics, built from primitives, and its numpy kinematics.

The body frames follow the Panda's modified (Craig) Denavit-Hartenberg parameters: link i's
frame is its parent's frame moved by ``RotX(alpha_{i-1}) TransX(a_{i-1}) TransZ(d_i)`` and
joint i turns about the new z axis. Because a turn about z commutes with a shift along z,
each MJCF body can carry the whole fixed part of that transform and a hinge on its own z
axis. The hand sits 0.107 m beyond joint 7 (the flange), turned -45 degrees about the
flange axis as on the real robot; its two fingers slide along the hand's y axis and the tool
centre point (site ``tcp``) lies 0.1034 m beyond the flange, between the finger pads.

Geometry is capsules, cylinders and boxes sized after the real links; masses follow the
data sheet roughly and every arm body is gravity-compensated (``gravcomp``), as a Panda's
controller does, so the position servos only fight inertia and contact.

Naming: every collision geom is called ``robot/<part>`` (the scene maps geoms to surfaces by
the text before the slash); bodies are ``link0`` .. ``link7``, ``hand``, ``finger_left``,
``finger_right``; joints ``joint1`` .. ``joint7``, ``finger_left``, ``finger_right``;
actuators ``joint1`` .. ``joint7`` and ``gripper``.
"""

from __future__ import annotations

import math

import numpy as np

# (a_{i-1}, d_i, alpha_{i-1}) per joint, metres and radians (modified DH).
DH = (
    (0.0, 0.333, 0.0),
    (0.0, 0.0, -math.pi / 2),
    (0.0, 0.316, math.pi / 2),
    (0.0825, 0.0, math.pi / 2),
    (-0.0825, 0.384, -math.pi / 2),
    (0.0, 0.0, math.pi / 2),
    (0.088, 0.0, math.pi / 2),
)
FLANGE_D = 0.107  # joint 7 frame to the flange, along its z axis
HAND_YAW = -math.pi / 4  # the hand is mounted turned about the flange axis
TCP_OFFSET = 0.1034  # flange to tool centre point, along the flange axis
FINGER_BASE = 0.0584  # flange to the base of the fingers
FINGER_LENGTH = 0.054
FINGER_TRAVEL = 0.04  # per finger; the gripper opens to 0.08 m
# Hand geometry a scripted controller must keep clear of furniture (hand frame: fingers
# slide along y and point along z): the palm box's half sizes and its centre height, and
# each finger's half thickness along x and y.
PALM_HALF = (0.03, 0.09, 0.03)
PALM_CENTER_Z = 0.028
FINGER_HALF_XY = (0.012, 0.008)

JOINT_LOWER = np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973])
JOINT_UPPER = np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])
VELOCITY_LIMIT = np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61])  # rad/s
TORQUE_LIMIT = np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0])  # N m
# The common "ready" pose: elbow up, hand pointing down, fingers across the arm's plane.
NEUTRAL_QPOS = np.array([0.0, -math.pi / 4, 0.0, -3 * math.pi / 4, 0.0, math.pi / 2, math.pi / 4])

LINK_MASS = (4.97, 0.646, 3.23, 3.59, 1.23, 1.67, 0.735)  # links 1..7, kg
HAND_MASS = 0.73
FINGER_MASS = 0.05  # heavier than the real 0.015 kg: very light fingers make stiff grasps jitter

# Servo gains (N m / rad and N m s / rad): about critically damped for the joint inertias of
# the working poses (0.7-1.5 kg m^2 for joints 1-4, 0.05-0.09 for the wrist, armature
# included), stable at 240 Hz with implicit damping; the wrist gains respect its 12 N m limit.
# The environment feeds the setpoint velocity forward through the control (see env.py), so
# the damping does not make the arm lag behind a moving target.
KP = (4500.0, 4500.0, 3500.0, 3500.0, 1200.0, 1200.0, 1000.0)
KV = (120.0, 160.0, 110.0, 110.0, 18.0, 22.0, 15.0)
CTRL_MARGIN = 0.5  # rad: setpoints may exceed the joint limits by the velocity feedforward term
ARMATURE = (0.2, 0.2, 0.15, 0.15, 0.05, 0.05, 0.05)
GRIPPER_KP = 1500.0  # N/m on the finger opening: ~35 N of squeeze on a 0.05 m block
GRIPPER_FORCE = 70.0  # N, the actuator's force limit (shared by both fingers)

# Collision shapes per link body, in that body's frame: (kind, size, fromto-or-pos).
# kind "capsule"/"cylinder" use fromto (6 numbers) and a radius; "box" uses pos + half sizes.
_LINK_SHAPES: tuple[tuple[tuple[str, float, tuple[float, ...]], ...], ...] = (
    # link1: from the top of the base up to the shoulder
    (("capsule", 0.06, (0, 0, -0.19, 0, 0, -0.06)),),
    # link2: shoulder housing (along the J2 axis) and the start of the upper arm
    (("cylinder", 0.06, (0, 0, -0.06, 0, 0, 0.06)), ("capsule", 0.06, (0, 0, 0, 0, -0.2, 0))),
    # link3: rest of the upper arm and the elbow knuckle
    (("capsule", 0.06, (0, 0, -0.13, 0, 0, -0.02)), ("capsule", 0.055, (0, 0, 0, 0.0825, 0, 0))),
    # link4: elbow housing and the start of the forearm
    (("cylinder", 0.055, (0, 0, -0.055, 0, 0, 0.055)), ("capsule", 0.055, (0, 0, 0, -0.0825, 0.12, 0))),
    # link5: the forearm up to the wrist
    (("capsule", 0.05, (0, 0, -0.27, 0, 0, -0.07)),),
    # link6: wrist housing and the offset to joint 7
    (("cylinder", 0.05, (0, 0, -0.06, 0, 0, 0.05)), ("capsule", 0.045, (0, 0, 0, 0.088, 0, 0))),
    # link7: the flange cylinder
    (("cylinder", 0.045, (0, 0, -0.03, 0, 0, 0.095)),),
)


def _quat_rotx(angle: float) -> tuple[float, float, float, float]:
    return (math.cos(angle / 2), math.sin(angle / 2), 0.0, 0.0)


def _fmt(values) -> str:
    return " ".join(f"{float(v):.6g}" for v in values)


def link_offsets() -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """Each link body's (pos, quat wxyz) in its parent's frame, from the DH table."""
    out = []
    for a, d, alpha in DH:
        # RotX(alpha) TransX(a) TransZ(d): the z shift happens in the rotated frame.
        pos = np.array([a, -d * math.sin(alpha), d * math.cos(alpha)])
        out.append((pos, _quat_rotx(alpha)))
    return out


def arm_mjcf(base_pos: tuple[float, float, float], base_yaw: float, gripper_camera: str) -> str:
    """The arm as an MJCF ``<body>`` tree rooted at ``link0``.

    ``gripper_camera`` is inserted verbatim into the hand body (the scene decides the camera's
    resolution-independent pose and field of view).
    """
    lines = [
        f'<body name="link0" pos="{_fmt(base_pos)}" quat="{_fmt(_quat_z(base_yaw))}" gravcomp="1">',
        '  <geom name="robot/base" type="cylinder" size="0.085 0.075" pos="0 0 0.075" mass="3" '
        'class="robot"/>',
    ]
    indent = "  "
    for i, (pos, quat) in enumerate(link_offsets()):
        n = i + 1
        lines.append(f'{indent}<body name="link{n}" pos="{_fmt(pos)}" quat="{_fmt(quat)}" gravcomp="1">')
        lines.append(
            f'{indent}  <joint name="joint{n}" axis="0 0 1" range="{JOINT_LOWER[i]:.5f} {JOINT_UPPER[i]:.5f}" '
            f'armature="{ARMATURE[i]}"/>'
        )
        shapes = _LINK_SHAPES[i]
        mass_each = LINK_MASS[i] / len(shapes)
        for k, (kind, radius, fromto) in enumerate(shapes):
            lines.append(
                f'{indent}  <geom name="robot/link{n}_{k}" type="{kind}" size="{radius}" '
                f'fromto="{_fmt(fromto)}" mass="{mass_each:.4f}" class="robot"/>'
            )
        indent += "  "
    # The hand: a box palm, two sliding fingers and the tool centre point.
    lines += [
        f'{indent}<body name="hand" pos="0 0 {FLANGE_D}" quat="{_fmt(_quat_z(HAND_YAW))}" gravcomp="1">',
        f'{indent}  <geom name="robot/palm" type="box" size="{_fmt(PALM_HALF)}" pos="0 0 {PALM_CENTER_Z}" '
        f'mass="{HAND_MASS}" class="robot"/>',
        f'{indent}  <site name="tcp" pos="0 0 {TCP_OFFSET}" size="0.005" rgba="1 0 0 0" group="4"/>',
        f"{indent}  {gripper_camera}",
    ]
    for side, sign in (("left", 1), ("right", -1)):
        # At joint value 0 the pads touch at y = 0; each finger opens by its joint value.
        lines += [
            f'{indent}  <body name="finger_{side}" pos="0 0 {FINGER_BASE}" gravcomp="1">',
            f'{indent}    <joint name="finger_{side}" type="slide" axis="0 {sign} 0" '
            f'range="0 {FINGER_TRAVEL}" armature="0.01" damping="10"/>',
            f'{indent}    <geom name="robot/finger_{side}" type="box" '
            f'size="{FINGER_HALF_XY[0]} {FINGER_HALF_XY[1]} {FINGER_LENGTH / 2}" '
            f'pos="0 {sign * FINGER_HALF_XY[1]} {FINGER_LENGTH / 2}" mass="{FINGER_MASS}" class="finger"/>',
            f"{indent}  </body>",
        ]
    lines.append(f"{indent}</body>")
    for _ in range(8):
        indent = indent[:-2]
        lines.append(f"{indent}</body>")
    return "\n".join(lines)


def arm_actuators_mjcf() -> str:
    """Position servos on the seven joints and one on the (coupled) gripper opening."""
    lines = []
    for i in range(7):
        lines.append(
            f'<position name="joint{i + 1}" joint="joint{i + 1}" kp="{KP[i]}" kv="{KV[i]}" '
            f'ctrlrange="{JOINT_LOWER[i] - CTRL_MARGIN:.5f} {JOINT_UPPER[i] + CTRL_MARGIN:.5f}" '
            f'forcerange="{-TORQUE_LIMIT[i]} {TORQUE_LIMIT[i]}"/>'
        )
    # The gripper servo drives the left finger; the equality below mirrors it to the right one.
    lines.append(
        f'<position name="gripper" joint="finger_left" kp="{GRIPPER_KP}" kv="40" '
        f'ctrlrange="0 {FINGER_TRAVEL}" forcerange="{-GRIPPER_FORCE} {GRIPPER_FORCE}"/>'
    )
    return "\n".join(lines)


def arm_equality_mjcf() -> str:
    return '<joint name="finger_coupling" joint1="finger_right" joint2="finger_left" solref="0.005 1"/>'


def _quat_z(angle: float) -> tuple[float, float, float, float]:
    return (math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2))


def forward_kinematics(
    q: np.ndarray, base_pos: np.ndarray | tuple = (0.0, 0.0, 0.0), base_yaw: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Tool centre point (pos (3,), rotation matrix (3, 3)) in the world, from the DH table.

    Independent of MuJoCo, so tests can check the MJCF body tree against the data sheet.
    """
    c, s = math.cos(base_yaw), math.sin(base_yaw)
    T = np.eye(4)
    T[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    T[:3, 3] = base_pos
    for (a, d, alpha), theta in zip(DH, q):
        ca, sa, ct, st = math.cos(alpha), math.sin(alpha), math.cos(theta), math.sin(theta)
        # Craig's modified DH: RotX(alpha) TransX(a) RotZ(theta) TransZ(d).
        A = np.array(
            [
                [ct, -st, 0, a],
                [st * ca, ct * ca, -sa, -sa * d],
                [st * sa, ct * sa, ca, ca * d],
                [0, 0, 0, 1],
            ]
        )
        T = T @ A
    hc, hs = math.cos(HAND_YAW), math.sin(HAND_YAW)
    tool = np.eye(4)
    tool[:3, :3] = [[hc, -hs, 0], [hs, hc, 0], [0, 0, 1]]
    tool[2, 3] = FLANGE_D + TCP_OFFSET
    # The hand turn is about the flange axis, so it commutes with the shift along it.
    T = T @ tool
    return T[:3, 3].copy(), T[:3, :3].copy()
