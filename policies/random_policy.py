"""A policy that acts uniformly at random: the floor every evaluation table starts from."""

from __future__ import annotations

import numpy as np

from dreamrt.policies.protocol import ActionChunk, Observation, PolicySpec


class RandomPolicy:
    """Uniform actions in [-1, 1] per dimension; the last (gripper) dimension is -1 or +1.

    Meant for the normalised relative Cartesian action mode, where [-1, 1] is the full range.
    """

    def __init__(self, action_dim: int = 7, rate_hz: float = 30.0, seed: int = 0):
        self.spec = PolicySpec(rate_hz=rate_hz, action_dim=action_dim, horizon=1)
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self._rng = np.random.default_rng([self._seed, seed])

    def observe(self, observation: Observation) -> None:
        pass  # memoryless

    def act(self, observation: Observation) -> ActionChunk:
        action = self._rng.uniform(-1.0, 1.0, size=(1, self.spec.action_dim))
        action[:, -1] = np.where(action[:, -1] > 0, 1.0, -1.0)
        return ActionChunk(actions=action)
