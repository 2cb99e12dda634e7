"""The policy interface every dreamrt policy implements.

The scripted expert, the random policy, DP-T and later policies all look the same to the
control loop, the evaluator and the recorder: ``reset()`` at the start of an episode,
``act(observation) -> ActionChunk`` whenever new actions are needed, and a ``spec`` saying
how to drive them. This module imports only numpy so the loop stays light.

Observations are dicts with LeRobot-style keys (``observation.state``,
``observation.environment_state``, ``observation.images.<camera>``, ...) holding numpy
arrays for the current step, plus ``task``: the language instruction string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

Observation = dict[str, Any]


@dataclass(frozen=True)
class PolicySpec:
    rate_hz: float  # control rate the policy was trained for
    action_dim: int
    horizon: int  # actions predicted per call (Ta); the caller may execute fewer
    n_obs_steps: int = 1  # observation history the policy consumes (To)
    action_mode: str = "rel_cartesian"  # env action mode the actions are meant for (see sim.env.ACTION_MODES)

    def __post_init__(self) -> None:
        if self.rate_hz <= 0 or self.action_dim <= 0 or self.horizon <= 0 or self.n_obs_steps <= 0:
            raise ValueError(f"PolicySpec fields must be positive, got {self}")


@dataclass
class ActionChunk:
    actions: np.ndarray  # (Ta, action_dim) float32, to be executed one per control step
    start_step: int | None = None  # absolute control step of actions[0], when the caller tracks steps
    info: dict[str, Any] = field(default_factory=dict)  # e.g. sampler steps, latency

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions, dtype=np.float32)
        if self.actions.ndim != 2 or len(self.actions) == 0:
            raise ValueError(
                f"ActionChunk.actions must be (Ta>0, action_dim), got shape {self.actions.shape}"
            )


@runtime_checkable
class Policy(Protocol):
    spec: PolicySpec

    def reset(self, seed: int | None = None) -> None:
        """Forget any episode state (observation history, cached plans).

        ``seed`` fixes the randomness of the coming episode (e.g. sampler noise) so that an
        evaluation gives the same result whichever worker process runs which episode.
        """

    def observe(self, observation: Observation) -> None:
        """Take an observation of a step on which no new actions are asked for.

        Callers hand over every step's observation, through ``act`` or ``observe``, so a
        policy with an observation history sees consecutive steps, as in training."""

    def act(self, observation: Observation) -> ActionChunk:
        """Return the next actions for this observation (and the history seen since reset)."""
