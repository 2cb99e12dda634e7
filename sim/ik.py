"""Rotation helpers in CALVIN's conventions and damped-least-squares differential IK.

Euler angles are (roll, pitch, yaw) with ``R = Rz(yaw) Ry(pitch) Rx(roll)`` (rotations about
the fixed world axes x, then y, then z), as pybullet's ``getEulerFromQuaternion`` returns and
CALVIN's observations use. Quaternions are MuJoCo's (w, x, y, z).

The IK works on a scratch ``MjData`` so the physics state is never touched: from the last
commanded joint vector it takes a few damped-least-squares steps on ``mj_jacSite`` towards
a target pose, pulls the redundant degree of freedom towards a rest posture in the Jacobian's
null space, caps each joint's change by its velocity limit over one control period and
clamps to the joint limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import numpy as np

from dreamrt.errors import UserError
from dreamrt.sim import panda


def euler_to_mat(euler: np.ndarray) -> np.ndarray:
    """(3,) roll, pitch, yaw -> (3, 3) rotation matrix Rz Ry Rx."""
    r, p, y = euler
    cr, sr, cp, sp, cy, sy = math.cos(r), math.sin(r), math.cos(p), math.sin(p), math.cos(y), math.sin(y)
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def mat_to_euler(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation matrix -> (3,) roll, pitch, yaw in (-pi, pi], pitch in [-pi/2, pi/2]."""
    sp = -R[2, 0]
    if abs(sp) < 1.0 - 1e-9:
        pitch = math.asin(sp)
        roll = math.atan2(R[2, 1], R[2, 2])
        yaw = math.atan2(R[1, 0], R[0, 0])
    else:  # gimbal lock: fold the roll into the yaw
        pitch = math.copysign(math.pi / 2, sp)
        roll = 0.0
        yaw = math.atan2(-R[0, 1], R[1, 1])
    return np.array([roll, pitch, yaw])


def quat_to_mat(quat: np.ndarray) -> np.ndarray:
    mat = np.empty(9)
    mujoco.mju_quat2Mat(mat, np.asarray(quat, dtype=np.float64))
    return mat.reshape(3, 3)


def mat_to_quat(R: np.ndarray) -> np.ndarray:
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, np.ascontiguousarray(R, dtype=np.float64).reshape(9))
    return quat


def quat_to_euler(quat: np.ndarray) -> np.ndarray:
    return mat_to_euler(quat_to_mat(quat))


def euler_to_quat(euler: np.ndarray) -> np.ndarray:
    return mat_to_quat(euler_to_mat(euler))


def rotation_error(R_target: np.ndarray, R_current: np.ndarray) -> np.ndarray:
    """(3,) axis * angle (world frame) that turns R_current into R_target."""
    R_err = R_target @ R_current.T
    quat = mat_to_quat(R_err)
    if quat[0] < 0:  # take the short way round
        quat = -quat
    vec = np.empty(3)
    mujoco.mju_quat2Vel(vec, quat, 1.0)
    return vec


@dataclass(frozen=True)
class IKConfig:
    """Differential IK settings; the defaults suit one 30 Hz control period."""

    iterations: int = 3
    damping: float = 0.03  # lambda of the damped least squares; larger = calmer near singularities
    rotation_weight: float = 0.5  # metres per radian when mixing position and orientation error
    nullspace_gain: float = 0.1  # per-iteration pull of the redundancy towards the rest posture
    limit_margin: float = 0.02  # rad kept clear of each joint limit
    max_step_s: float = 1.0 / 30.0  # joint velocity limits are applied over this period

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise UserError(f"IKConfig.iterations must be >= 1, got {self.iterations}.")
        if self.damping <= 0 or self.rotation_weight <= 0:
            raise UserError(
                f"IKConfig.damping={self.damping} and rotation_weight={self.rotation_weight} must be positive."
            )


class DiffIK:
    """Damped-least-squares IK for the arm's ``tcp`` site on a private copy of the model state."""

    def __init__(
        self, model: mujoco.MjModel, config: IKConfig | None = None, rest_qpos: np.ndarray | None = None
    ):
        self.config = config or IKConfig()
        self._model = model
        self._data = mujoco.MjData(model)
        self._site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "tcp")
        self._qadr = np.array([model.joint(f"joint{i}").qposadr[0] for i in range(1, 8)])
        self._dadr = np.array([model.joint(f"joint{i}").dofadr[0] for i in range(1, 8)])
        m = self.config.limit_margin
        self.lower = panda.JOINT_LOWER + m
        self.upper = panda.JOINT_UPPER - m
        self.rest = panda.NEUTRAL_QPOS.copy() if rest_qpos is None else np.asarray(rest_qpos, float).copy()
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def forward(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """TCP (pos (3,), rotation (3, 3)) for arm joints ``q``."""
        self._data.qpos[self._qadr] = q
        mujoco.mj_kinematics(self._model, self._data)
        return self._data.site_xpos[self._site].copy(), self._data.site_xmat[self._site].reshape(3, 3).copy()

    def solve(
        self,
        q_start: np.ndarray,
        target_pos: np.ndarray,
        target_rot: np.ndarray,
        iterations: int | None = None,
    ) -> np.ndarray:
        """Joint vector (7,) that brings the TCP towards (target_pos, target_rot) from ``q_start``.

        Each joint moves at most its velocity limit times ``max_step_s`` in total, so calling
        this once per control period yields a feasible joint trajectory.
        """
        cfg = self.config
        q = np.clip(np.asarray(q_start, float), self.lower, self.upper)
        max_total = panda.VELOCITY_LIMIT * cfg.max_step_s
        q0 = q.copy()
        w = cfg.rotation_weight
        lam2 = cfg.damping**2
        for _ in range(iterations or cfg.iterations):
            self._data.qpos[self._qadr] = q
            mujoco.mj_kinematics(self._model, self._data)
            mujoco.mj_comPos(self._model, self._data)
            mujoco.mj_jacSite(self._model, self._data, self._jacp, self._jacr, self._site)
            J = np.vstack([self._jacp[:, self._dadr], w * self._jacr[:, self._dadr]])  # (6, 7)
            pos = self._data.site_xpos[self._site]
            rot = self._data.site_xmat[self._site].reshape(3, 3)
            err = np.concatenate([target_pos - pos, w * rotation_error(target_rot, rot)])  # (6,)
            q = self._limited_step(q, J, err, lam2)
            q = q0 + np.clip(q - q0, -max_total, max_total)
        return q

    def _limited_step(self, q: np.ndarray, J: np.ndarray, err: np.ndarray, lam2: float) -> np.ndarray:
        """One DLS step; joints that sit at a limit and would be pushed past it are frozen and
        the step is re-solved with the rest, so a pinned joint cannot stall the others."""
        active = np.ones(7, bool)
        for _ in range(3):
            Ja = J * active  # (6, 7), frozen joints' columns zeroed
            J_pinv = Ja.T @ np.linalg.solve(Ja @ Ja.T + lam2 * np.eye(6), np.eye(6))  # (7, 6)
            dq = J_pinv @ err
            # The null-space pull keeps the elbow near the rest posture without moving the TCP.
            dq += ((np.eye(7) - J_pinv @ Ja) @ (self.config.nullspace_gain * (self.rest - q))) * active
            pinned = active & (((q <= self.lower + 1e-3) & (dq < 0)) | ((q >= self.upper - 1e-3) & (dq > 0)))
            if not pinned.any():
                break
            active &= ~pinned
        return np.clip(q + dq, self.lower, self.upper)
