"""Which frame a policy predicts its Cartesian targets in: the world's, or the tool's.

An ``abs_cartesian`` action names the tool's target pose in the world (xyz in metres,
roll/pitch/yaw in radians, then the gripper). Min-max normalised over the workspace, a
centimetre of such a target is a few hundredths of the network's [-1, 1], which is what a
precise grasp has to get right. With ``action_frame="tool"`` the policy predicts each target
of the horizon relative to the tool pose it observes at the current step (the last of its
To observation steps): the position as a world-axis offset from the tool, each angle as the
wrapped difference from the tool's. The range of those offsets is what the tool travels in
one horizon (tens of centimetres at most, and most of the data within a few), so the same
network resolution buys finer targets; the target itself is still named, unlike a
``rel_cartesian`` delta, which moves a target pose the policy never observes. The gripper
command stays as it is.

The conversion needs only the observed tool pose: the first six numbers of
``observation.state`` (tcp xyz, tcp roll/pitch/yaw; CALVIN's ``robot_obs`` layout).
Training converts the batch's actions before normalising them; acting converts the sampled
actions back after unnormalising them, so everything outside the policy (the env, episode
stores, the runtime) only ever sees world-frame targets.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from dreamrt.errors import UserError

ACTION_FRAMES = ("world", "tool")
TOOL_POSE_KEY = "observation.state"  # its first TOOL_POSE_DIM numbers: tcp xyz, tcp roll/pitch/yaw
TOOL_POSE_DIM = 6


def wrap_angle(x: Tensor) -> Tensor:
    """Angles to [-pi, pi)."""
    return torch.remainder(x + math.pi, 2.0 * math.pi) - math.pi


def to_tool_frame(actions: Tensor, tool_pose: Tensor) -> Tensor:
    """World-frame targets (B, H, A>=6) -> relative to ``tool_pose`` (B, 6); other dims unchanged."""
    pose = tool_pose[:, None, :]
    return torch.cat(
        [
            actions[..., :3] - pose[..., :3],
            wrap_angle(actions[..., 3:6] - pose[..., 3:6]),
            actions[..., TOOL_POSE_DIM:],
        ],
        dim=-1,
    )


def to_world_frame(actions: Tensor, tool_pose: Tensor) -> Tensor:
    """The inverse of :func:`to_tool_frame` (angles wrapped to [-pi, pi))."""
    pose = tool_pose[:, None, :]
    return torch.cat(
        [
            actions[..., :3] + pose[..., :3],
            wrap_angle(actions[..., 3:6] + pose[..., 3:6]),
            actions[..., TOOL_POSE_DIM:],
        ],
        dim=-1,
    )


def tool_frame_stats(
    actions: np.ndarray, states: np.ndarray, windows: np.ndarray, horizon: int, current: int
) -> dict[str, np.ndarray]:
    """min / max / mean / std of the actions of every training window, in its tool frame.

    ``actions`` (N, A) and ``states`` (N, S) are a store's columns; ``windows`` are the
    sampler's rows ``[buffer_start, buffer_end, sample_start, sample_end]``
    (:func:`dreamrt.episodes.sampler.create_indices`: window position p shows row
    ``buffer_start + clip(p - sample_start, 0, buffer_end - buffer_start - 1)``). Each window's
    ``horizon`` actions are expressed in the tool frame of its position ``current`` (To - 1):
    these are the statistics a policy with ``action_frame="tool"`` normalises its actions with.
    """
    actions = np.asarray(actions, np.float64)
    states = np.asarray(states, np.float64)
    windows = np.asarray(windows, np.int64)
    if len(states) != len(actions) or windows.ndim != 2 or windows.shape[1] != 4 or not len(windows):
        raise UserError(
            f"tool_frame_stats needs actions and states with one row per frame ({len(actions)} and {len(states)}) "
            f"and at least one window row [buffer_start, buffer_end, sample_start, sample_end] (got {windows.shape})."
        )
    if actions.shape[1] < TOOL_POSE_DIM or states.shape[1] < TOOL_POSE_DIM:
        raise UserError(
            f"action_frame='tool' needs actions and {TOOL_POSE_KEY} with at least {TOOL_POSE_DIM} numbers "
            f"(xyz, roll, pitch, yaw), got {actions.shape[1]} and {states.shape[1]}."
        )
    buffer_start, buffer_end, sample_start = windows[:, 0], windows[:, 1], windows[:, 2]

    def rows_at(position: int) -> np.ndarray:
        return buffer_start + np.clip(position - sample_start, 0, buffer_end - buffer_start - 1)

    pose = states[rows_at(current), :TOOL_POSE_DIM]
    lo = np.full(actions.shape[1], np.inf)
    hi = np.full(actions.shape[1], -np.inf)
    total = np.zeros(actions.shape[1])
    total_sq = np.zeros(actions.shape[1])
    for position in range(horizon):
        rel = actions[rows_at(position)]
        rel[:, :3] -= pose[:, :3]
        rel[:, 3:TOOL_POSE_DIM] = (
            np.remainder(rel[:, 3:TOOL_POSE_DIM] - pose[:, 3:] + np.pi, 2 * np.pi) - np.pi
        )
        lo = np.minimum(lo, rel.min(0))
        hi = np.maximum(hi, rel.max(0))
        total += rel.sum(0)
        total_sq += np.square(rel).sum(0)
    count = len(windows) * horizon
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"min": lo, "max": hi, "mean": mean, "std": std}
