"""Test helpers shared by the runtime tests (NOT part of dreamrt; imported by tests/runtime/test_*.py).

- :class:`CountingPolicy`: chunk n (0-based call count) is ``100 * (n + 1) + i`` at index i,
  one action dimension, so an executed action names the chunk and the index it came from.
  Fault knobs: ``fail_calls`` (calls that raise), ``nan_at`` ({call: index} made NaN),
  ``value_at`` ({call: (index, value)} overrides), ``compute_s`` (per-call sleep, first call
  ``first_compute_s``).
- :class:`TinyDPTPolicy`: a real DP-T (``dpt.preset("tiny")``, random seeded weights) with a
  real DDIM sampler over ``observation.state`` history: the slow policy of the timing tests
  (many sampler steps take several 33 ms ticks), and a :class:`GuidedPolicy` through
  :func:`dreamrt.policies.guidance.guided_sample`. Built warm (one call of each path).

The clock and the recording robot the tests use are the library's own
(:class:`~dreamrt.runtime.clock.VirtualClock`, :class:`~dreamrt.runtime.robot.RecordingRobot`).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import pytest
import torch

from dreamrt.policies.dpt import DPT, preset
from dreamrt.policies.guidance import guided_sample
from dreamrt.policies.protocol import ActionChunk, PolicySpec
from dreamrt.policies.schedulers import DDIMSampler, NoiseSchedule, NoiseScheduleConfig


class CountingPolicy:
    def __init__(
        self,
        horizon: int = 4,
        rate_hz: float = 30.0,
        fail_calls: set[int] | None = None,
        nan_at: dict[int, int] | None = None,
        value_at: dict[int, tuple[int, float]] | None = None,
        compute_s: float = 0.0,
        first_compute_s: float | None = None,
    ):
        self.spec = PolicySpec(rate_hz=rate_hz, action_dim=1, horizon=horizon)
        self.fail_calls = fail_calls or set()
        self.nan_at = nan_at or {}
        self.value_at = value_at or {}
        self.compute_s = compute_s
        self.first_compute_s = first_compute_s
        self.calls = 0
        self.observations: list[dict] = []

    def reset(self, seed: int | None = None) -> None:
        self.calls = 0

    def act(self, observation: dict) -> ActionChunk:
        n = self.calls
        self.calls += 1
        self.observations.append(observation)
        cost = self.first_compute_s if (n == 0 and self.first_compute_s is not None) else self.compute_s
        if cost:
            time.sleep(cost)
        if n in self.fail_calls:
            raise RuntimeError(f"injected failure in call {n}")
        actions = 100.0 * (n + 1) + np.arange(self.spec.horizon, dtype=np.float32)[:, None]
        if n in self.nan_at:
            actions[self.nan_at[n]] = np.nan
        if n in self.value_at:
            index, value = self.value_at[n]
            actions[index] = value
        return ActionChunk(actions)


class TinyDPTPolicy:
    """An untrained tiny DP-T sampling ``num_steps`` DDIM steps; actions scaled by ``scale``."""

    def __init__(
        self,
        action_dim: int = 2,
        horizon: int = 16,
        num_steps: int = 100,
        n_layer: int = 2,
        seed: int = 0,
        scale=0.01,
    ):
        cfg = preset("tiny", action_dim=action_dim, obs_dim=action_dim, horizon=horizon, n_layer=n_layer)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = DPT(cfg).eval().requires_grad_(False)
        self.sampler = DDIMSampler(NoiseSchedule(NoiseScheduleConfig()), num_steps=num_steps)
        self.spec = PolicySpec(
            rate_hz=30.0, action_dim=action_dim, horizon=horizon, n_obs_steps=cfg.n_obs_steps
        )
        self.scale = scale
        self.guided_calls = 0
        self._history: deque[np.ndarray] = deque(maxlen=cfg.n_obs_steps)
        # Warm both paths up, as a deployment would: torch's first calls (and autograd's first
        # backward, about 1 s) are far slower than the steady state the loop schedules for.
        zeros = {"observation.state": np.zeros(action_dim, np.float32)}
        self.reset(seed)
        self.act(zeros)
        self.act_guided(zeros, np.zeros((horizon, action_dim), np.float32), np.ones(horizon, np.float32))
        self.guided_calls = 0
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        self._history.clear()
        self._generator = torch.Generator().manual_seed(0 if seed is None else seed)

    def _features(self, observation: dict) -> torch.Tensor:
        state = np.asarray(observation["observation.state"], np.float32)
        if not self._history:
            self._history.extend([state] * self._history.maxlen)
        else:
            self._history.append(state)
        return torch.from_numpy(np.stack(self._history))[None]  # (1, To, O)

    def _start(self) -> torch.Tensor:
        return torch.randn(1, self.spec.horizon, self.spec.action_dim, generator=self._generator)

    def act(self, observation: dict) -> ActionChunk:
        features = self._features(observation)
        with torch.inference_mode():
            x = self.sampler.sample(
                lambda x, t: self.model(x, torch.tensor(t), features),
                self._start(),
                generator=self._generator,
            )
        return ActionChunk(x[0].numpy() * self.scale)

    def act_guided(self, observation: dict, prefix_actions: np.ndarray, weights: np.ndarray) -> ActionChunk:
        self.guided_calls += 1
        features = self._features(observation)
        prefix = torch.from_numpy(np.asarray(prefix_actions, np.float32) / self.scale)
        x = guided_sample(
            lambda x, t: self.model(x, torch.tensor(t), features),
            self.sampler,
            self._start(),
            prefix,
            torch.from_numpy(np.asarray(weights, np.float32)),
            generator=self._generator,
        )
        return ActionChunk(x[0].detach().numpy() * self.scale)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread while a test runs: the tiny DP-T is faster so, and two threads would fight
    the control loop (and each other) for the 2 cores. Import it into a test module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
