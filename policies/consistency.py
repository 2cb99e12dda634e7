"""Consistency students of diffusion policies: the boundary-condition parameterisation and the few-step sampler.

A consistency model (Song et al., ICML 2023) maps any point x_t of a probability-flow ODE
trajectory straight to the trajectory's clean end. A student distilled from a DP-T teacher
(:mod:`dreamrt.training.distill`) is the very same DP-T network, initialised from the
teacher, read through this parameterisation:

    f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_pred(F(x_t, t), x_t, t)

- ``F`` is the DP-T output, read with the policy's ``NoiseScheduleConfig.prediction_type``:
  ``x0_pred = F`` for "sample" (what distilled students use), ``x0_pred = (x_t - sqrt(1 -
  ab_t) F) / sqrt(ab_t)`` for "epsilon". Students predict the clean sample because an
  epsilon network's x0 estimate multiplies its errors by 1/sqrt(ab_t) (7x at t = 90, where
  one-step sampling starts): measured in docs/distillation.md, an epsilon-reading student
  stayed 2x further from its teacher after 4x the training.
- Time runs over the extended timesteps ``t in {-1, 0, ..., T-1}``: ``-1`` is clean data
  (alpha_bar = 1), the end every DDIM trajectory of the teacher lands on.
- ``c_skip``, ``c_out`` (LCM's choice, Luo et al. 2023, for discrete-time teachers):
  ``c_skip = s_d^2 / ((k (t+1))^2 + s_d^2)``, ``c_out = k (t+1) / sqrt((k (t+1))^2 + s_d^2)``
  with ``s_d = 0.5`` and ``k = 10``. At the boundary t = -1 they are exactly 1 and 0, so
  ``f(x, -1) = x`` whatever the network says (the boundary condition holds by construction);
  from t = 0 on ``c_out >= 0.9987``, so f is essentially the network's x0 estimate.

Both parts fold into two numbers per timestep, ``f = coef_x[t] * x_t + coef_out[t] * F``,
kept as buffers of :class:`ConsistencyParameterisation` and gathered by timestep, so
:class:`ConsistencyModel` (DP-T + parameterisation) exports to ONNX with the same inputs and
output shape as the bare DP-T: one student step is one exported graph, as one teacher step is.

Multistep consistency sampling (Song et al., Algorithm 1) over descending timesteps
``t_1 > ... > t_n``: ``x0 = clip(f(x_T, t_1))``; then for i >= 2 re-noise
``x = sqrt(ab_{t_i}) x0 + sqrt(1 - ab_{t_i}) z_i`` and denoise again ``x0 = clip(f(x, t_i))``.
:func:`consistency_timesteps` picks ``t_1`` at the top of Diffusion Policy's DDIM-10 grid
(0.9 T, 90 of 100), where the teacher's default sampler starts from pure noise, so the
student reproduces the map the teacher is deployed with; distillation trains the range
0..t_1. The other steps are spaced evenly below: 1 step [90], 2 steps [90, 45], 3 steps
[90, 60, 30].

Dimensions: B batch, Ta action horizon, A action dim; samplers work on any shape whose first
axis is the batch. Use:

    sampler = ConsistencySampler(schedule, num_steps=1)   # or SamplerConfig(name="consistency", num_steps=1)
    x0 = sampler.sample(denoise, x_T, generator=g)         # denoise(x_t, t: int) -> raw DP-T output
    student = ConsistencyModel(policy.model, ConsistencyParameterisation(schedule))  # f, for export
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dreamrt.errors import UserError
from dreamrt.policies.schedulers import NoiseSchedule, TimestepSampler

Denoiser = Callable[[Tensor, int], Tensor]  # (x_t (B, ...), timestep) -> raw network output (B, ...)

SAMPLER_NAME = "consistency"  # SamplerConfig.name of the consistency sampler
SIGMA_DATA = 0.5  # s_d in c_skip / c_out (LCM, and Song et al.'s EDM-based models)
TIMESTEP_SCALING = 10.0  # k: how fast c_skip falls from 1 at t = -1 (0.0025 at t = 0)
START_FRACTION = 0.9  # t_1 = round(0.9 * T): the top of the leading DDIM-10 grid (90 of 100)
MAX_STEPS = 8  # more steps than this is what the teacher is for


# ---------------------------------------------------------------------------- parameterisation


def boundary_coefficients(
    t: int, sigma_data: float = SIGMA_DATA, scaling: float = TIMESTEP_SCALING
) -> tuple[float, float]:
    """(c_skip, c_out) at extended timestep ``t`` >= -1; exactly (1, 0) at t = -1."""
    u = scaling * (t + 1)
    return sigma_data**2 / (u * u + sigma_data**2), u / math.sqrt(u * u + sigma_data**2)


class ConsistencyParameterisation(nn.Module):
    """``forward(model_output, x_t, timesteps) -> f(x_t, t)``; the boundary condition as two per-timestep tables.

    ``timesteps`` are extended timesteps in [-1, T) (a (B,) tensor or a scalar). The tables
    are non-persistent buffers computed from the schedule, so a policy's checkpoint holds
    nothing of them and they cannot disagree with its noise config.
    """

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        cfg = schedule.config
        coef_x, coef_out = [], []
        for t in range(-1, schedule.num_train_timesteps):  # row t + 1
            c_skip, c_out = boundary_coefficients(t)
            ab = schedule.alpha_bar(t)
            if cfg.prediction_type == "epsilon":  # x0_pred = (x - sqrt(1 - ab) F) / sqrt(ab)
                coef_x.append(c_skip + c_out / math.sqrt(ab))
                coef_out.append(-c_out * math.sqrt(1.0 - ab) / math.sqrt(ab))
            else:  # "sample": x0_pred = F
                coef_x.append(c_skip)
                coef_out.append(c_out)
        self.num_train_timesteps = schedule.num_train_timesteps
        # Both (T+1,), row t + 1 for extended timestep t.
        self.register_buffer("coef_x", torch.tensor(coef_x, dtype=torch.float32), persistent=False)
        self.register_buffer("coef_out", torch.tensor(coef_out, dtype=torch.float32), persistent=False)

    def forward(self, model_output: Tensor, x_t: Tensor, timesteps: Tensor) -> Tensor:
        row = (timesteps.reshape(-1) + 1).long()  # (B,) or (1,)
        shape = (-1, *([1] * (x_t.ndim - 1)))  # broadcast over everything but the batch
        return self.coef_x[row].reshape(shape) * x_t + self.coef_out[row].reshape(shape) * model_output


class ConsistencyModel(nn.Module):
    """A DP-T read as a consistency function: ``forward(noisy_actions, timesteps, obs_features) -> f``.

    Same inputs and output shape as :class:`dreamrt.policies.dpt.DPT` (``timesteps`` may
    also be -1, clean data); the output is the clean action sequence (not clipped), which
    is what ONNX export of one student step produces.
    """

    def __init__(self, model: nn.Module, parameterisation: ConsistencyParameterisation):
        super().__init__()
        self.model = model
        self.parameterisation = parameterisation

    def forward(self, noisy_actions: Tensor, timesteps: Tensor, obs_features: Tensor) -> Tensor:
        return self.parameterisation(
            self.model(noisy_actions, timesteps, obs_features), noisy_actions, timesteps
        )


# ---------------------------------------------------------------------------- sampler


def consistency_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """Descending sampling timesteps: t_1 = round(0.9 T), then evenly spaced, ``round(t_1 (n - i) / n)``."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= MAX_STEPS:
        raise UserError(
            f"A consistency sampler takes 1 to {MAX_STEPS} steps, got {num_steps!r}. Distilled students are "
            "meant for 1-3 steps; sample the teacher for more."
        )
    start = round(START_FRACTION * num_train_timesteps)
    start = min(start, num_train_timesteps - 1)
    steps = [round(start * (num_steps - i) / num_steps) for i in range(num_steps)]
    if len(set(steps)) != num_steps:
        raise UserError(
            f"{num_steps} consistency steps do not fit in a schedule of {num_train_timesteps} timesteps "
            f"(they would repeat: {steps}). Use fewer steps."
        )
    return steps


class ConsistencySampler(TimestepSampler):
    """Multistep consistency sampling over descending ``timesteps`` (see the module docstring).

    Same step API as :class:`dreamrt.policies.schedulers.Sampler`: ``timesteps``,
    ``num_steps``, ``is_stochastic``, ``prev_timestep(t)``, ``predict_x0``, ``step`` and
    ``sample``. ``denoise`` returns the raw DP-T output; the parameterisation is applied here.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 1, timesteps: Sequence[int] | None = None):
        T = schedule.num_train_timesteps
        if timesteps is None:
            timesteps = consistency_timesteps(T, num_steps)
        else:
            timesteps = [int(t) for t in timesteps]
            if (
                not timesteps
                or any(not 0 <= t < T for t in timesteps)
                or any(a <= b for a, b in zip(timesteps, timesteps[1:]))
            ):
                raise UserError(
                    f"Consistency timesteps must be a non-empty, strictly descending list of integers in [0, {T}), "
                    f"got {timesteps}."
                )
        super().__init__(schedule, timesteps)
        self.parameterisation = ConsistencyParameterisation(schedule)

    @property
    def is_stochastic(self) -> bool:
        """Whether any step re-noises (every step but the last does)."""
        return self.num_steps > 1

    def x0_estimate(self, model_output: Tensor, t: int, x_t: Tensor) -> Tensor:
        """f(x_t, t): the parameterisation applied to the raw DP-T output (unclipped)."""
        self._step_index(t)
        p = self.parameterisation.to(x_t.device)
        return p(model_output, x_t, torch.tensor(int(t), device=x_t.device))

    def step_from_x0(
        self,
        x0: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Re-noise the clipped x0 to ``prev_timestep(t)`` (return it clean after the last step)."""
        x0 = self.clip(x0)
        t_next = self.prev_timestep(t)
        if t_next < 0:
            return x0
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
        ab = self.schedule.alpha_bar(t_next)
        return math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * noise


def make_consistency_sampler(schedule: NoiseSchedule, num_steps: int | None) -> ConsistencySampler:
    """The sampler ``SamplerConfig(name="consistency", num_steps=n)`` names (None: one step)."""
    return ConsistencySampler(schedule, num_steps=1 if num_steps is None else num_steps)
