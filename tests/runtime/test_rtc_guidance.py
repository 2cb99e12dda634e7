"""RTC's guided inpainting on a tiny DP-T: the new chunk's prefix is pulled towards the previous chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import one_torch_thread  # noqa: F401 (a fixture)

from dreamrt.errors import UserError
from dreamrt.policies.dpt import DPT, preset
from dreamrt.policies.guidance import guided_sample
from dreamrt.policies.schedulers import DDIMSampler, DDPMSampler, NoiseSchedule, NoiseScheduleConfig
from dreamrt.runtime.chunking import soft_mask

H, A = 8, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DPT(preset("tiny", action_dim=A, obs_dim=3, horizon=H)).eval().requires_grad_(False)


def denoiser(model, seed: int):
    features = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(seed))
    return lambda x, t: model(x, torch.tensor(t), features)


def noise(seed: int) -> torch.Tensor:
    return torch.randn(1, H, A, generator=torch.Generator().manual_seed(seed))


def weighted_error(x: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> float:
    return float((w[:, None] * (x[0] - target) ** 2).sum().sqrt())


@pytest.mark.parametrize("sampler_name", ["ddim", "ddpm"])
def test_guidance_pulls_the_prefix_towards_the_previous_chunk(model, sampler_name):
    schedule = NoiseSchedule(NoiseScheduleConfig())
    sampler = DDIMSampler(schedule, num_steps=10) if sampler_name == "ddim" else DDPMSampler(schedule, 20)
    w = torch.from_numpy(soft_mask(H, 3, 3))  # [1, 1, 1, decay, decay, 0, 0, 0]
    ratios, suffix_gaps = [], []
    for seed in range(4):
        denoise = denoiser(model, seed)
        with torch.no_grad():
            previous = sampler.sample(denoise, noise(100 + seed), generator=torch.Generator().manual_seed(1))[
                0
            ]
            plain = sampler.sample(denoise, noise(seed), generator=torch.Generator().manual_seed(2))
        guided = guided_sample(
            denoise,
            sampler,
            noise(seed),
            previous,
            w,
            max_guidance=5.0,
            generator=torch.Generator().manual_seed(2),
        )
        ratios.append(weighted_error(guided, previous, w) / weighted_error(plain, previous, w))
        suffix_gaps.append(float((guided[0, 5:] - previous[5:]).abs().mean()))
    assert max(ratios) < 0.5 and np.mean(ratios) < 0.3, ratios
    assert min(suffix_gaps) > 0.2  # where W = 0 the new chunk is free, not a copy


def test_no_weight_is_plain_sampling(model):
    sampler = DDIMSampler(NoiseSchedule(NoiseScheduleConfig()), num_steps=10, eta=0.5)
    denoise = denoiser(model, 0)
    previous = torch.ones(H, A)
    with torch.no_grad():
        plain = sampler.sample(denoise, noise(0), generator=torch.Generator().manual_seed(3))
    zero = guided_sample(
        denoise, sampler, noise(0), previous, torch.zeros(H), generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    unweighted = guided_sample(
        denoise,
        sampler,
        noise(0),
        previous,
        torch.ones(H),
        max_guidance=0.0,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(unweighted, plain, rtol=1e-5, atol=1e-5)  # beta = 0 turns guidance off


def test_guidance_runs_inside_inference_mode(model):
    """A policy's predict_actions runs under torch.inference_mode; the guidance still gets its gradients."""
    sampler = DDIMSampler(NoiseSchedule(NoiseScheduleConfig()), num_steps=5)
    w = torch.from_numpy(soft_mask(H, 2, 3))
    with torch.inference_mode():
        features = torch.randn(1, 2, 3)  # an inference tensor the denoiser closes over
        out = guided_sample(
            lambda x, t: model(x, torch.tensor(t), features), sampler, noise(0), torch.zeros(H, A), w
        )
    assert out.shape == (1, H, A) and torch.isfinite(out).all()


def test_shape_errors(model):
    sampler = DDIMSampler(NoiseSchedule(NoiseScheduleConfig()), num_steps=5)
    denoise = denoiser(model, 0)
    with pytest.raises(UserError, match="prefix"):
        guided_sample(denoise, sampler, noise(0), torch.zeros(H + 1, A), torch.ones(H))
    with pytest.raises(UserError, match="weights"):
        guided_sample(denoise, sampler, noise(0), torch.zeros(H, A), torch.ones(H - 1))
    with pytest.raises(UserError, match="max_guidance"):
        guided_sample(denoise, sampler, noise(0), torch.zeros(H, A), torch.ones(H), max_guidance=-1)
