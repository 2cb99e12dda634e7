"""Noise schedule, DDPM and DDIM samplers: formulas, the DDIM(eta=1) == DDPM identity, noise contracts."""

import math

import pytest
import torch

from dreamrt.errors import UserError
from dreamrt.policies.schedulers import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    NoiseScheduleConfig,
    SamplerConfig,
    make_sampler,
    spaced_timesteps,
)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(NoiseScheduleConfig())


def _toy_denoiser(scale: float):
    """A fixed nonlinear 'network'; a large scale makes x0 clipping bite."""
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)) * 0.5

    def denoise(x, t):
        return scale * torch.tanh(x @ w + 0.01 * t)

    return denoise


def test_cosine_schedule_matches_closed_form(schedule):
    assert schedule.betas.shape == (100,) and float(schedule.betas.max()) <= 0.999
    ab = schedule.alphas_cumprod
    assert bool((ab[1:] < ab[:-1]).all()) and 0 < float(ab[-1]) < 1e-3

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # Uncapped steps: alpha_bar_t = f((t + 1) / T) / f(0).
    for t in (0, 10, 50, 90):
        assert float(ab[t]) == pytest.approx(f((t + 1) / 100) / f(0), rel=1e-9)


def test_add_noise_and_training_target(schedule):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 5, 2, generator=g), torch.randn(4, 5, 2, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    x_t = schedule.add_noise(x0, noise, t)
    for b in range(4):
        ab = float(schedule.alphas_cumprod[t[b]])
        expected = math.sqrt(ab) * x0[b] + math.sqrt(1 - ab) * noise[b]
        torch.testing.assert_close(x_t[b], expected, rtol=1e-6, atol=1e-6)
    assert schedule.training_target(x0, noise) is noise
    sample_schedule = NoiseSchedule(NoiseScheduleConfig(prediction_type="sample"))
    assert sample_schedule.training_target(x0, noise) is x0
    ts = schedule.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert ts.dtype == torch.int64 and int(ts.min()) == 0 and int(ts.max()) == 99


@pytest.mark.parametrize("t", [0, 7, 50, 99])
def test_one_ddim_step_with_true_eps_recovers_x0(schedule, t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(3, 8, 2, generator=g) * 1.8 - 0.9  # inside the clip range
    noise = torch.randn(3, 8, 2, generator=g)
    x_t = schedule.add_noise(x0, noise, torch.full((3,), t))
    sampler = DDIMSampler(schedule, timesteps=[t])
    assert sampler.prev_timestep(t) == -1
    torch.testing.assert_close(sampler.step(noise, t, x_t), x0, rtol=0, atol=2e-4 if t == 99 else 2e-5)
    # Sample prediction: the model output is x0 itself.
    sample_sampler = DDIMSampler(NoiseSchedule(NoiseScheduleConfig(prediction_type="sample")), timesteps=[t])
    torch.testing.assert_close(sample_sampler.step(x0, t, x_t), x0)


@pytest.mark.parametrize("scale", [0.5, 3.0], ids=["no_clipping", "clipping"])
def test_ddim_eta1_all_steps_reproduces_ddpm(schedule, scale):
    """Acceptance test of issue #4: same noise -> same samples."""
    ddpm, ddim = DDPMSampler(schedule), DDIMSampler(schedule, num_steps=100, eta=1.0)
    assert ddpm.timesteps == ddim.timesteps == list(range(99, -1, -1))
    for table in ("c_x0", "c_xt", "sigma"):
        assert getattr(ddim, table) == pytest.approx(getattr(ddpm, table), rel=1e-9, abs=1e-12)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(8, 16, 3, generator=g)
    noise = torch.randn(100, 8, 16, 3, generator=g)
    denoise = _toy_denoiser(scale)
    a = ddpm.sample(denoise, x_T, noise=noise)
    b = ddim.sample(denoise, x_T, noise=noise)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # The noise matters (so the comparison is not vacuous).
    c = ddpm.sample(denoise, x_T, noise=torch.randn(100, 8, 16, 3, generator=g))
    assert (a - c).abs().max() > 1e-2


def test_ddim_deterministic_ten_steps(schedule):
    sampler = DDIMSampler(schedule, num_steps=10, eta=0.0)
    assert sampler.timesteps == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0] and not sampler.is_stochastic
    x_T = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0))
    calls = []

    def denoise(x, t):
        calls.append(t)
        return _toy_denoiser(1.0)(x, t)

    a = sampler.sample(denoise, x_T, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(denoise, x_T, generator=torch.Generator().manual_seed(2))
    assert calls == sampler.timesteps * 2
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.abs().max() <= 1.0 + 1e-6


def test_ddpm_generator_and_explicit_noise_agree(schedule):
    sampler = DDPMSampler(schedule)
    assert sampler.is_stochastic and sampler.sigma[-1] == 0.0 and all(s > 0 for s in sampler.sigma[:-1])
    denoise = _toy_denoiser(1.0)
    x_T = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    a = sampler.sample(denoise, x_T, generator=torch.Generator().manual_seed(5))
    again = sampler.sample(denoise, x_T, generator=torch.Generator().manual_seed(5))
    other = sampler.sample(denoise, x_T, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, again) and not torch.allclose(a, other)
    # The generator is drawn once per stochastic step, in step order.
    g = torch.Generator().manual_seed(5)
    noise = [torch.randn(x_T.shape, generator=g) for _ in range(99)] + [torch.full(x_T.shape, float("nan"))]
    assert torch.equal(sampler.sample(denoise, x_T, noise=noise), a)  # last entry ignored (sigma = 0)


def test_step_api_matches_sample(schedule):
    sampler = DDIMSampler(schedule, num_steps=8, eta=0.5)
    denoise = _toy_denoiser(2.0)
    g = torch.Generator().manual_seed(0)
    x_T, noise = torch.randn(2, 6, 3, generator=g), torch.randn(8, 2, 6, 3, generator=g)
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        x0_hat = sampler.predict_x0(denoise(x, t), t, x)
        assert x0_hat.abs().max() <= 1.0
        x = sampler.step(denoise(x, t), t, x, noise=noise[i])
    assert torch.equal(x, sampler.sample(denoise, x_T, noise=noise))
    assert sampler.timesteps == [84, 72, 60, 48, 36, 24, 12, 0]
    assert sampler.prev_timestep(84) == 72 and sampler.prev_timestep(0) == -1
    with pytest.raises(UserError, match="not one of this sampler's timesteps"):
        sampler.step(denoise(x, 5), 5, x)
    with pytest.raises(UserError, match="2 step noises for 8 steps"):
        sampler.sample(denoise, x_T, noise=noise[:2])


def _unit_gaussian_setup():
    """Data N(0, 1): the exact epsilon is sqrt(1 - ab_t) x_t, so each step's map is known in closed form."""
    schedule = NoiseSchedule(NoiseScheduleConfig(clip_sample=False))

    def exact_eps(x, t):
        return math.sqrt(1 - schedule.alpha_bar(t)) * x

    x_T = torch.randn(50000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return schedule, exact_eps, x_T


@pytest.mark.parametrize("num_steps, spacing", [(10, "leading"), (16, "trailing"), (100, "leading")])
def test_ddim_with_exact_score_rotates_by_the_angle_steps(num_steps, spacing):
    # Writing ab = cos(phi)^2, a DDIM step with the exact epsilon multiplies x by cos(phi_t - phi_prev).
    schedule, exact_eps, x_T = _unit_gaussian_setup()
    sampler = DDIMSampler(schedule, num_steps, spacing=spacing)
    phis = [math.acos(math.sqrt(schedule.alpha_bar(t))) for t in sampler.timesteps] + [0.0]
    gain = math.prod(math.cos(a - b) for a, b in zip(phis, phis[1:]))
    torch.testing.assert_close(sampler.sample(exact_eps, x_T), gain * x_T, rtol=1e-12, atol=1e-12)
    assert gain > 0.85  # few steps shrink the spread a little; many steps barely


def test_ddpm_with_exact_score_has_the_posterior_mean_and_variance():
    # Exact reverse of N(0, 1) data: mean sqrt(alpha_t) x_t; DDPM's "fixed small" variance
    # beta_t (1 - ab_prev) / (1 - ab_t) sits below the exact beta_t, so the spread shrinks a bit.
    schedule, exact_eps, x_T = _unit_gaussian_setup()
    sampler = DDPMSampler(schedule)
    alphas = [1 - float(b) for b in schedule.betas]
    zero = torch.zeros(100, *x_T.shape, dtype=x_T.dtype)
    mean_gain = math.prod(math.sqrt(a) for a in alphas)
    torch.testing.assert_close(
        sampler.sample(exact_eps, x_T, noise=zero), mean_gain * x_T, rtol=1e-10, atol=1e-12
    )
    var = 1.0
    for t in range(99, -1, -1):
        ab, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t - 1)
        var = alphas[t] * var + (1 - alphas[t]) * (1 - ab_prev) / (1 - ab)
    out = sampler.sample(exact_eps, x_T, generator=torch.Generator().manual_seed(1))
    assert float(out.std()) == pytest.approx(math.sqrt(var), rel=0.01)
    assert 0.95 < math.sqrt(var) < 0.99 and abs(float(out.mean())) < 0.015


def test_spacings_and_validation(schedule):
    assert spaced_timesteps(100, 10, "trailing") == [99, 89, 79, 69, 59, 49, 39, 29, 19, 9]
    assert spaced_timesteps(100, 3, "leading") == [66, 33, 0]
    assert spaced_timesteps(100, 100, "trailing") == list(range(99, -1, -1))
    with pytest.raises(UserError, match="integer in \\[1, 100\\]"):
        spaced_timesteps(100, 0)
    with pytest.raises(UserError, match="Did you mean 'trailing'"):
        spaced_timesteps(100, 10, "trailin")
    with pytest.raises(UserError, match="strictly descending"):
        DDIMSampler(schedule, timesteps=[10, 50])
    with pytest.raises(UserError, match="eta"):
        DDIMSampler(schedule, eta=1.5)
    with pytest.raises(UserError, match="Did you mean 'epsilon'"):
        NoiseScheduleConfig(prediction_type="epsilom")
    with pytest.raises(UserError, match="num_train_timesteps"):
        NoiseScheduleConfig(num_train_timesteps=1)


def test_make_sampler(schedule):
    ddpm = make_sampler(schedule, SamplerConfig(name="ddpm", num_steps=None))
    assert isinstance(ddpm, DDPMSampler) and ddpm.num_steps == 100
    ddim = make_sampler(schedule, SamplerConfig(name="ddim", num_steps=16, eta=0.2, spacing="trailing"))
    assert isinstance(ddim, DDIMSampler) and ddim.timesteps[0] == 99 and ddim.num_steps == 16
    assert ddim.is_stochastic
    with pytest.raises(UserError, match="Did you mean 'ddim'"):
        SamplerConfig(name="ddim_")
    with pytest.raises(UserError, match="num_steps"):
        SamplerConfig(num_steps=0)
    with pytest.raises(UserError, match="noise_scale"):
        SamplerConfig(noise_scale=2.0)
    with pytest.raises(UserError, match=r"task_noise_scale maps task names to temperatures in \[0, 1\]"):
        SamplerConfig(task_noise_scale={"open_drawer": -0.5})
    with pytest.raises(UserError, match=r"task_noise_scale maps task names to temperatures \(SamplerConfig"):
        SamplerConfig(task_noise_scale=[("open_drawer", 0.5)])
    assert SamplerConfig(task_noise_scale={"open_drawer": 0}).task_noise_scale == {"open_drawer": 0.0}
