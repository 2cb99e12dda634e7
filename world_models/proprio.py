"""Robot-state prediction, for world models conditioned on the robot state.

A dynamics model conditioned on the state (``DynamicsConfig.state_dim > 0``) needs the state of
every frame it generates. Replaying a recorded episode can feed it the recorded states, but
that is information from the future the model is asked to predict; rolling out in the dream,
under new actions, there is no recording at all. The state predictor supplies them: a small
residual MLP that steps the normalised state under the action,

    s_{i+1} = s_i + step_scale * f(s_i, a_i),

trained open loop over ``unroll`` frames (each step fed its own previous prediction), so it
learns to keep its errors from compounding, which one-step training does not teach.

State dims that jump across half their range between consecutive frames in more than 10% of
steps (an angle wrapping at +-pi, like a top-down gripper's roll: 34% of steps in the CALVIN-style
demonstrations) carry nothing a smooth map can predict; :func:`wrapping_dims` finds them in the
data and the predictor holds them at their last value. Dims that jump now and then for a reason
(the gripper command, 1.3% of steps) stay predicted.

Dimensions: B batch, T frames, K unrolled steps, S state dim, A action dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dreamrt.errors import UserError

STATE_KIND = "world_model/state"


@dataclass
class StatePredictorConfig:
    state_dim: int = 15  # S (taken from the store by the training job)
    action_dim: int = 7  # A
    hidden: int = 256
    layers: int = 2
    # The MLP outputs a change per frame; normalised states move a few percent of their range per
    # frame at 30 Hz, so a unit output maps to that scale.
    step_scale: float = 0.05
    held: list[int] = field(default_factory=list)  # dims kept at their last value (wrapping_dims)

    def __post_init__(self) -> None:
        for name in ("state_dim", "action_dim", "hidden", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"StatePredictorConfig.{name} must be a positive integer, got {value!r}.")
        if not self.step_scale > 0:
            raise UserError(f"StatePredictorConfig.step_scale must be > 0, got {self.step_scale}.")
        bad = [d for d in self.held if not 0 <= d < self.state_dim]
        if bad:
            raise UserError(f"StatePredictorConfig.held has dims {bad} outside [0, {self.state_dim}).")


class StatePredictor(nn.Module):
    """Steps the normalised robot state under an action; see the module docstring."""

    def __init__(self, config: StatePredictorConfig):
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = []
        width = c.state_dim + c.action_dim
        for _ in range(c.layers):
            layers += [nn.Linear(width, c.hidden), nn.SiLU()]
            width = c.hidden
        layers.append(nn.Linear(width, c.state_dim))
        self.net = nn.Sequential(*layers)
        moving = torch.ones(c.state_dim)
        moving[list(c.held)] = 0.0
        self.register_buffer("moving", moving, persistent=False)

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        """(B, S) normalised state at frame i, (B, A) normalised action taken there -> the state at i+1."""
        change = self.config.step_scale * self.net(torch.cat([state, action], dim=-1))
        return state + change * self.moving

    def unroll(self, state: Tensor, actions: Tensor) -> Tensor:
        """From (B, S) under (B, K, A) actions, each step fed the previous prediction -> (B, K + 1, S)."""
        states = [state]
        for i in range(actions.shape[1]):
            states.append(self(states[-1], actions[:, i]))
        return torch.stack(states, dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def state_rollout_loss(
    model: StatePredictor, states: Tensor, actions: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Open-loop error of a clip: store-aligned (B, T, S) states and (B, T, A) actions (row i taken
    at frame i); the predictor starts at the first state and steps through the first T - 1 actions.
    Mean squared error over the predicted (not held) dims of frames 1..T-1."""
    predicted = model.unroll(states[:, 0], actions[:, :-1])[:, 1:]
    err = (predicted - states[:, 1:]).pow(2) * model.moving
    loss = err.sum(-1).mean() / model.moving.sum().clamp(min=1)
    return loss, {"loss": float(loss.detach())}


def wrapping_dims(states: np.ndarray, episode_ends: np.ndarray, threshold: float = 0.1) -> list[int]:
    """Dims of normalised (F, S) states (range [-1, 1]) that jump by more than 1 (half the range)
    between consecutive frames of an episode in more than ``threshold`` of the steps."""
    step = np.abs(np.diff(states, axis=0))
    inside = np.ones(len(step), bool)
    inside[np.asarray(episode_ends[:-1], np.int64) - 1] = False  # no step across an episode boundary
    if not inside.any():
        return []
    jumps = (step[inside] > 1.0).mean(axis=0)
    return [int(d) for d in np.flatnonzero(jumps > threshold)]


def open_loop_error(
    model: StatePredictor, states: Tensor, actions: Tensor, horizons: list[int]
) -> dict[str, float]:
    """Mean absolute error (normalised units, predicted dims) at each horizon, for the predictor and
    for holding the first state: clips (B, T, S) / (B, T, A) with T > max(horizons)."""
    with torch.no_grad():
        predicted = model.unroll(states[:, 0], actions[:, : max(horizons)])
    moving = model.moving.bool()
    out: dict[str, float] = {}
    for h in horizons:
        truth = states[:, h][:, moving]
        out[f"state_mae_h{h}"] = float((predicted[:, h][:, moving] - truth).abs().mean())
        out[f"state_mae_hold_h{h}"] = float((states[:, 0][:, moving] - truth).abs().mean())
    return out


def save_state_predictor(
    model: StatePredictor,
    path: str | Path,
    *,
    normalizer: dict[str, Any],
    step: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write an inference checkpoint (kind ``world_model/state``) with the normaliser of its units."""
    from dreamrt.training.checkpoint import save_checkpoint

    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=model.config,
        normalizer=normalizer,
        step=step,
        kind=STATE_KIND,
        overwrite=overwrite,
    )


def load_state_predictor(path: str | Path) -> tuple[StatePredictor, dict[str, Any]]:
    """Load a state-predictor checkpoint (or a run's newest): the model in eval mode and its normaliser."""
    from dreamrt.training.checkpoint import config_from_dict, load_checkpoint, load_into

    ckpt = load_checkpoint(path, kind=STATE_KIND)
    model = StatePredictor(
        config_from_dict(StatePredictorConfig, ckpt.config, source=f"{ckpt.path}/config.yaml")
    )
    load_into(model, ckpt)
    return model.eval(), ckpt.normalizer


def load_state_predictor_for(
    path: str, model: Any, dynamics_normalizer: dict[str, Any], state_key: str
) -> StatePredictor:
    """Load a state predictor for a dynamics ``model``: it must take states, in the same units."""
    if not model.config.state_dim:
        raise UserError(
            f"state_model={path} predicts robot states, but the dynamics model takes none (state_dim=0); leave "
            f"state_model out."
        )
    predictor, normalizer = load_state_predictor(path)
    check_units(normalizer, dynamics_normalizer, state_key)
    return predictor


def check_units(
    predictor_normalizer: dict[str, Any], dynamics_normalizer: dict[str, Any], state_key: str
) -> None:
    """A predictor and a dynamics model work together only in the same normalised state units."""
    from dreamrt.episodes import Normalizer

    a, b = Normalizer.from_dict(predictor_normalizer), Normalizer.from_dict(dynamics_normalizer)
    pa, pb = a.params(state_key), b.params(state_key)
    if not (np.allclose(pa.scale, pb.scale) and np.allclose(pa.offset, pb.offset)):
        raise UserError(
            f"The state predictor normalises '{state_key}' differently from the dynamics model: train it on the "
            f"store the dynamics model was trained on (min-max over that store's statistics)."
        )
