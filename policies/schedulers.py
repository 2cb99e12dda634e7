"""Noise schedules and the DDPM / DDIM samplers for diffusion policies.

Written for Diffusion Policy's setting (Chi et al., RSS 2023): 100 training steps, the
``squaredcos_cap_v2`` schedule (Nichol & Dhariwal 2021), epsilon prediction (the clean
sample as an option) and the predicted clean sample clipped to [-1, 1]. DDPM is Ho et al.
2020 with the "fixed small" posterior variance; DDIM is Song et al. 2021 with its ``eta``.
Timestep spacing ("leading") and the final step to alpha_bar = 1 follow diffusers'
defaults, which Diffusion Policy uses.

Dimensions: B batch, Ta action horizon, A action dim; samplers work on any shape whose
first axis is the batch.

Both samplers reduce every step to one update with coefficients precomputed in float64:

    x0_hat = clip(predicted clean sample)               from the model output and x_t
    x_prev = c_x0[i] * x0_hat + c_xt[i] * x_t + sigma[i] * noise[i]

DDIM's direction term uses eps = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t), the epsilon
implied by the clipped x0 (diffusers' ``use_clipped_model_output=True``), folded into the
two coefficients. That keeps DDIM with eta=1 on all training steps the very same update as
DDPM. diffusers' DDIM default (and so Diffusion Policy's DDIM) pairs the clipped x0 with
the raw model epsilon instead; the two agree whenever clipping does not bite. Checked
against diffusers 0.42 (outside this repo): DDPM-100/10 and DDIM-10/16 (eta 0), -8 (eta
0.5), -100/7 (eta 1) and the trailing spacing agree to <= 1e-5, the rest being diffusers'
float32 betas.

Use:
    schedule = NoiseSchedule(NoiseScheduleConfig())
    x_t = schedule.add_noise(x0, noise, t)                  # training, t (B,) int64
    target = schedule.training_target(x0, noise)            # what the network regresses
    sampler = DDIMSampler(schedule, num_steps=10)           # or DDPMSampler(schedule)
    x0 = sampler.sample(denoise, x_T, generator=g)          # denoise(x_t, t: int) -> model output
or step by step (inpainting, distillation, caching experiments):
    for t in sampler.timesteps:
        x = sampler.step(denoise(x, t), t, x, noise=...)    # sampler.prev_timestep(t): where it lands
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dreamrt.errors import UserError, choose

Denoiser = Callable[[Tensor, int], Tensor]  # (x_t (B, ...), timestep) -> model output (B, ...)

BETA_SCHEDULES = ("squaredcos_cap_v2",)
PREDICTION_TYPES = ("epsilon", "sample")
SPACINGS = ("leading", "trailing")


# ---------------------------------------------------------------------------- schedule


def squaredcos_cap_v2_betas(num_steps: int, max_beta: float = 0.999) -> list[float]:
    """Betas of the cosine schedule: alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2, capped at max_beta."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]


@dataclass(frozen=True)
class NoiseScheduleConfig:
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # what the network outputs: "epsilon" (noise) or "sample" (x0)
    clip_sample: bool = True  # clip the predicted clean sample to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise UserError(
                f"NoiseScheduleConfig.num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}. "
                "Diffusion Policy uses 100."
            )
        choose("beta schedule", self.beta_schedule, BETA_SCHEDULES)
        choose("prediction type", self.prediction_type, PREDICTION_TYPES)
        if not self.clip_sample_range > 0:
            raise UserError(
                f"NoiseScheduleConfig.clip_sample_range must be > 0, got {self.clip_sample_range!r}."
            )


class NoiseSchedule:
    """The forward process: alpha_bar per training timestep, noising and the training target."""

    def __init__(self, config: NoiseScheduleConfig):
        self.config = config
        self.num_train_timesteps = config.num_train_timesteps
        betas = torch.tensor(squaredcos_cap_v2_betas(config.num_train_timesteps), dtype=torch.float64)
        self.betas = betas  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64: alpha_bar_t

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at timestep t; t = -1 means "before the first step" (alpha_bar = 1, clean data)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, per sample; timesteps (B,) int in [0, T)."""
        ab = self.alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype)  # (B,)
        ab = ab.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ...)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def training_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """What the network is trained to output for x_t = add_noise(x0, noise, t)."""
        return noise if self.config.prediction_type == "epsilon" else x0

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device=None
    ) -> Tensor:
        """Uniform training timesteps (B,) int64."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)


# ---------------------------------------------------------------------------- samplers


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """Descending inference timesteps. "leading" (diffusers' default, used by Diffusion Policy):
    k * (T // n), so 10 of 100 is [90, 80, ..., 0]; "trailing": round(T - k * T / n) - 1, so
    [99, 89, ..., 9], which starts from pure noise and is the better choice for few steps."""
    choose("timestep spacing", spacing, SPACINGS)
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise UserError(
            f"The number of sampler steps must be an integer in [1, {num_train_timesteps}] "
            f"(the training timesteps), got {num_steps!r}."
        )
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return [k * ratio for k in reversed(range(num_steps))]
    ratio = num_train_timesteps / num_steps
    return [round(num_train_timesteps - k * ratio) - 1 for k in range(num_steps)]


class TimestepSampler(abc.ABC):
    """What every reverse process shares: a fixed list of timesteps and the loop over them.

    ``timesteps[i]`` is the timestep the denoiser sees at step i; step i goes from
    ``timesteps[i]`` to ``timesteps[i + 1]`` (clean data after the last step). Subclasses
    define ``step``; the DDPM/DDIM samplers below and the consistency student's
    (:mod:`dreamrt.policies.consistency`) differ only there.
    """

    def __init__(self, schedule: NoiseSchedule, timesteps: Sequence[int]):
        self.schedule = schedule
        self.timesteps: list[int] = list(timesteps)
        self._index = {t: i for i, t in enumerate(self.timesteps)}

    def _step_index(self, t: int) -> int:
        i = self._index.get(int(t))
        if i is None:
            raise UserError(
                f"Timestep {t!r} is not one of this sampler's timesteps {self.timesteps}; "
                "iterate over `sampler.timesteps` and pass those values."
            )
        return i

    def prev_timestep(self, t: int) -> int:
        """The timestep the step from ``t`` lands on; -1 after the last step (clean data)."""
        i = self._step_index(t)
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @abc.abstractmethod
    def x0_estimate(self, model_output: Tensor, t: int, x_t: Tensor) -> Tensor:
        """The clean-sample estimate from the denoiser's output at ``t``, unclipped and differentiable
        (RTC's guidance back-propagates through it)."""

    @abc.abstractmethod
    def step_from_x0(
        self,
        x0: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One reverse step from ``t`` to ``prev_timestep(t)`` given a clean estimate (clipped here).

        ``noise`` (same shape as x_t) is used when the step is stochastic; when it is None,
        fresh noise is drawn from ``generator``.
        """

    def clip(self, x0: Tensor) -> Tensor:
        cfg = self.schedule.config
        return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range) if cfg.clip_sample else x0

    def predict_x0(self, model_output: Tensor, t: int, x_t: Tensor) -> Tensor:
        """The (clipped) clean-sample estimate from the model output at timestep ``t``."""
        return self.clip(self.x0_estimate(model_output, t, x_t))

    def step(
        self,
        model_output: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One reverse step from timestep ``t`` (one of ``timesteps``) to ``prev_timestep(t)``."""
        return self.step_from_x0(self.x0_estimate(model_output, t, x_t), t, x_t, noise, generator)

    def sample(
        self,
        denoise: Denoiser,
        x_T: Tensor,
        noise: Sequence[Tensor] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run all steps from ``x_T`` (B, ...), usually standard normal noise; returns the clean sample.

        ``denoise(x_t, t)`` gets the current sample and the integer timestep and returns the
        model output (epsilon or x0, per the schedule's prediction type). Step noise comes
        from ``noise`` (one tensor per step, shape of x_T; entries of deterministic steps are
        ignored) or, when None, from ``generator``. Gradients are not disabled here: wrap the
        call in ``torch.inference_mode()`` for inference.
        """
        if noise is not None and len(noise) != self.num_steps:
            raise UserError(
                f"{type(self).__name__}.sample got {len(noise)} step noises for {self.num_steps} steps; pass one "
                f"tensor shaped like x_T per step (a ({self.num_steps}, *x_T.shape) tensor works too)."
            )
        x = x_T
        for i, t in enumerate(self.timesteps):
            x = self.step(denoise(x, t), t, x, None if noise is None else noise[i], generator)
        return x


class Sampler(TimestepSampler):
    """A reverse process over fixed timesteps: ``x_prev = c_x0 * x0_hat + c_xt * x_t + sigma * noise``.

    Built by ``DDPMSampler`` or ``DDIMSampler``, which only compute the coefficient tables.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        timesteps: Sequence[int],
        c_x0: Sequence[float],
        c_xt: Sequence[float],
        sigma: Sequence[float],
    ):
        assert len(timesteps) == len(c_x0) == len(c_xt) == len(sigma)
        super().__init__(schedule, timesteps)
        self.c_x0 = [float(c) for c in c_x0]
        self.c_xt = [float(c) for c in c_xt]
        self.sigma = [float(s) for s in sigma]
        # For the x0 estimate: x0 = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t).
        abs_ = [schedule.alpha_bar(t) for t in self.timesteps]
        self._sqrt_one_minus_ab = [math.sqrt(1.0 - ab) for ab in abs_]
        self._inv_sqrt_ab = [1.0 / math.sqrt(ab) for ab in abs_]

    @property
    def is_stochastic(self) -> bool:
        """Whether any step adds fresh noise (and so reads ``noise`` or the generator)."""
        return any(s > 0 for s in self.sigma)

    def x0_estimate(self, model_output: Tensor, t: int, x_t: Tensor) -> Tensor:
        if self.schedule.config.prediction_type == "epsilon":
            i = self._step_index(t)
            return (x_t - self._sqrt_one_minus_ab[i] * model_output) * self._inv_sqrt_ab[i]
        return model_output

    def step_from_x0(
        self,
        x0: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        i = self._step_index(t)
        x_prev = self.c_x0[i] * self.clip(x0) + self.c_xt[i] * x_t
        if self.sigma[i] > 0:
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
            x_prev = x_prev + self.sigma[i] * noise
        return x_prev


class DDPMSampler(Sampler):
    """Ancestral sampling with the posterior q(x_prev | x_t, x0_hat) and its "fixed small" variance.

    ``num_steps=None`` uses every training timestep (Diffusion Policy's 100); fewer steps
    skip timesteps with the leading spacing, as diffusers does.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None):
        n = schedule.num_train_timesteps if num_steps is None else num_steps
        timesteps = spaced_timesteps(schedule.num_train_timesteps, n, "leading")
        c_x0, c_xt, sigma = [], [], []
        for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
            ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
            alpha = ab_t / ab_prev  # of this (possibly multi-step) transition
            beta = 1.0 - alpha
            c_x0.append(math.sqrt(ab_prev) * beta / (1.0 - ab_t))
            c_xt.append(math.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab_t))
            sigma.append(math.sqrt(max((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20)) if t_prev >= 0 else 0.0)
        super().__init__(schedule, timesteps, c_x0, c_xt, sigma)


class DDIMSampler(Sampler):
    """DDIM over ``num_steps`` spaced timesteps (or an explicit descending ``timesteps`` list).

    ``eta`` scales the step noise: 0 is deterministic, 1 matches DDPM's variance (on all
    training steps it is DDPM exactly).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 10,
        eta: float = 0.0,
        spacing: str = "leading",
        timesteps: Sequence[int] | None = None,
    ):
        if not 0.0 <= eta <= 1.0:
            raise UserError(f"DDIM eta must be in [0, 1] (0 deterministic, 1 DDPM-like), got {eta!r}.")
        if timesteps is None:
            timesteps = spaced_timesteps(schedule.num_train_timesteps, num_steps, spacing)
        else:
            timesteps = [int(t) for t in timesteps]
            T = schedule.num_train_timesteps
            if (
                not timesteps
                or any(not 0 <= t < T for t in timesteps)
                or any(a <= b for a, b in zip(timesteps, timesteps[1:]))
            ):
                raise UserError(
                    f"DDIM timesteps must be a non-empty, strictly descending list of integers in [0, {T}), "
                    f"got {timesteps}."
                )
        c_x0, c_xt, sigma = [], [], []
        for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
            ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
            var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
            s = eta * math.sqrt(var)
            direction = math.sqrt(max(1.0 - ab_prev - s * s, 0.0))  # multiplies eps
            # eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t), folded into the two coefficients.
            c_x0.append(math.sqrt(ab_prev) - direction * math.sqrt(ab_t) / math.sqrt(1.0 - ab_t))
            c_xt.append(direction / math.sqrt(1.0 - ab_t))
            sigma.append(s)
        super().__init__(schedule, timesteps, c_x0, c_xt, sigma)


# ---------------------------------------------------------------------------- factory


@dataclass(frozen=True)
class SamplerConfig:
    name: str = (
        "ddim"  # "ddpm", "ddim" or "consistency" (a distilled student's, dreamrt.policies.consistency)
    )
    num_steps: int | None = 10  # None: every training timestep (consistency: 1)
    eta: float = 0.0  # DDIM only
    spacing: str = "leading"  # DDIM only: "leading" (Diffusion Policy) or "trailing"
    # Temperature of the starting noise: x_T = noise_scale * N(0, I). 1 samples the learned
    # distribution; lower values lean toward its modes, and 0 starts every sample from the
    # same point (then DDIM with eta 0 and a consistency student act deterministically).
    noise_scale: float = 1.0
    # A temperature per task, by task name ({"rotate_red_block_left": 0.5}), for the tasks whose
    # best temperature differs from ``noise_scale``; the others keep ``noise_scale``. A language
    # policy applies it to the task its instruction names (its table's task labels).
    task_noise_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choose("sampler", self.name, SAMPLERS)
        choose("timestep spacing", self.spacing, SPACINGS)
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise UserError(
                f"SamplerConfig.num_steps must be a positive integer or None, got {self.num_steps!r}."
            )
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"SamplerConfig.eta must be in [0, 1], got {self.eta!r}.")
        if not (isinstance(self.noise_scale, int | float) and 0.0 <= self.noise_scale <= 1.0):
            raise UserError(
                f"SamplerConfig.noise_scale must be in [0, 1] (1: the learned distribution, 0: its centre), "
                f"got {self.noise_scale!r}."
            )
        # A private copy with plain floats: the config is frozen, and YAML may hold ints.
        object.__setattr__(
            self,
            "task_noise_scale",
            task_temperatures(self.task_noise_scale, "SamplerConfig.task_noise_scale"),
        )


def task_temperatures(value: Any, where: str) -> dict[str, float]:
    """``value`` checked as a {task name: temperature in [0, 1]} mapping, with float values."""
    example = f"{where}={{rotate_red_block_left: 0.5}}"
    if not isinstance(value, Mapping):
        raise UserError(f"{where} maps task names to temperatures ({example}); got {value!r}.")
    for task, scale in value.items():
        if not (
            isinstance(task, str)
            and isinstance(scale, int | float)
            and not isinstance(scale, bool)
            and 0.0 <= scale <= 1.0
        ):
            raise UserError(
                f"{where} maps task names to temperatures in [0, 1] ({example}); got {task!r}: {scale!r}."
            )
    return {task: float(scale) for task, scale in value.items()}


SAMPLERS = ("ddpm", "ddim", "consistency")


def make_sampler(schedule: NoiseSchedule, config: SamplerConfig) -> Sampler:
    """Build the sampler a config names."""
    n = schedule.num_train_timesteps if config.num_steps is None else config.num_steps
    match config.name:
        case "ddpm":
            return DDPMSampler(schedule, n)
        case "ddim":
            return DDIMSampler(schedule, n, eta=config.eta, spacing=config.spacing)
        case "consistency":
            # A distilled student's few-step sampler (dreamrt.training.distill); eta and spacing do not apply.
            from dreamrt.policies.consistency import make_consistency_sampler

            return make_consistency_sampler(schedule, config.num_steps)
        case _:
            raise AssertionError(config.name)  # SamplerConfig validated the name
