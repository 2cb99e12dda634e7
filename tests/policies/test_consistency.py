"""Consistency students: the boundary condition, the parameterisation's formula, ONNX export, the few-step sampler."""

import math
import warnings

import numpy as np
import pytest
import torch

from dreamrt.errors import UserError
from dreamrt.policies.consistency import (
    ConsistencyModel,
    ConsistencyParameterisation,
    ConsistencySampler,
    boundary_coefficients,
    consistency_timesteps,
)
from dreamrt.policies.dpt import DPT, example_inputs, preset
from dreamrt.policies.schedulers import NoiseSchedule, NoiseScheduleConfig, SamplerConfig, make_sampler


@pytest.fixture(scope="module", params=["sample", "epsilon"])
def schedule(request):
    return NoiseSchedule(NoiseScheduleConfig(prediction_type=request.param))


def _model(seed: int = 0) -> DPT:
    torch.manual_seed(seed)
    return DPT(preset("tiny", action_dim=3, obs_dim=5)).eval()


def test_boundary_condition_holds_for_any_network_output(schedule):
    param = ConsistencyParameterisation(schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 3, generator=g) * 3.0  # beyond the clip range: f must not clip
    wild = torch.randn(4, 8, 3, generator=g) * 100.0  # whatever the network says at t = -1
    assert boundary_coefficients(-1) == (1.0, 0.0)
    assert torch.equal(param(wild, x, torch.full((4,), -1)), x)
    assert torch.equal(param(wild, x, torch.tensor(-1)), x)  # scalar timestep, as samplers pass it
    # The full model too: f(x, t_min) = x through the DP-T.
    model = ConsistencyModel(_model(), param)
    obs = torch.randn(4, 2, 5, generator=g)
    with torch.no_grad():
        assert torch.equal(model(x[:, :, :3], torch.full((4,), -1), obs), x)


def test_parameterisation_is_the_documented_formula(schedule):
    param = ConsistencyParameterisation(schedule)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, 3, generator=g, dtype=torch.float64)
    out = torch.randn(6, 8, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 7, 45, 90, 99])
    got = param(out.float(), x.float(), t).double()
    for i, ti in enumerate(t.tolist()):
        c_skip, c_out = boundary_coefficients(ti)
        sigma_data, u = 0.5, 10.0 * (ti + 1)
        assert c_skip == pytest.approx(sigma_data**2 / (u * u + sigma_data**2))
        assert c_out == pytest.approx(u / math.sqrt(u * u + sigma_data**2))
        ab = schedule.alpha_bar(ti)
        if schedule.config.prediction_type == "epsilon":
            x0 = (x[i] - math.sqrt(1 - ab) * out[i]) / math.sqrt(ab)
        else:
            x0 = out[i]
        expected = c_skip * x[i] + c_out * x0
        torch.testing.assert_close(got[i], expected, rtol=2e-5, atol=2e-4 if ti == 99 else 2e-6)
    # From t = 0 on f is essentially the network's x0 estimate.
    assert boundary_coefficients(0)[1] > 0.998 and boundary_coefficients(0)[0] < 0.003


def test_student_step_exports_to_onnx_like_the_teacher(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    schedule = NoiseSchedule(NoiseScheduleConfig(prediction_type="sample"))
    model = ConsistencyModel(_model(), ConsistencyParameterisation(schedule)).eval()
    names = ["noisy_actions", "timesteps", "obs_features"]
    path = tmp_path / "student.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; the dynamo exporter needs onnxscript (not installed).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            example_inputs(model.model.config, batch_size=2),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["x0"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "x0"]},
            opset_version=17,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names  # the teacher's DP-T export has the same inputs
    for batch in (1, 5):
        noisy, _, obs = example_inputs(model.model.config, batch_size=batch, seed=batch)
        timesteps = torch.tensor([90, -1, 0, 45, 99][:batch])  # includes the boundary
        (out,) = session.run(
            None,
            {"noisy_actions": noisy.numpy(), "timesteps": timesteps.numpy(), "obs_features": obs.numpy()},
        )
        with torch.inference_mode():
            expected = model(noisy, timesteps, obs).numpy()
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
        if batch == 5:
            np.testing.assert_array_equal(out[1], noisy[1].numpy())  # f(x, -1) = x survives export


def test_sampling_timesteps():
    assert consistency_timesteps(100, 1) == [90]
    assert consistency_timesteps(100, 2) == [90, 45]
    assert consistency_timesteps(100, 3) == [90, 60, 30]
    assert consistency_timesteps(1000, 2) == [900, 450]
    for bad in (0, 9, 2.0, True):
        with pytest.raises(UserError, match="1 to 8 steps"):
            consistency_timesteps(100, bad)
    with pytest.raises(UserError, match="repeat"):
        consistency_timesteps(2, 3)
    schedule = NoiseSchedule(NoiseScheduleConfig())
    with pytest.raises(UserError, match="strictly descending"):
        ConsistencySampler(schedule, timesteps=[30, 60])
    with pytest.raises(UserError, match="strictly descending"):
        ConsistencySampler(schedule, timesteps=[100])


def _denoiser(model: DPT, obs: torch.Tensor):
    def denoise(x, t):
        return model(x, torch.tensor(t), obs)

    return denoise


def test_one_step_sampling_is_the_clipped_consistency_function():
    schedule = NoiseSchedule(NoiseScheduleConfig(prediction_type="sample"))
    model = _model(1)
    noisy, _, obs = example_inputs(model.config, batch_size=4, seed=3)
    sampler = ConsistencySampler(schedule, num_steps=1)
    assert sampler.timesteps == [90] and sampler.num_steps == 1 and not sampler.is_stochastic
    assert sampler.prev_timestep(90) == -1
    with torch.no_grad():
        got = sampler.sample(_denoiser(model, obs), noisy)
        f = ConsistencyModel(model, ConsistencyParameterisation(schedule))(noisy, torch.full((4,), 90), obs)
    torch.testing.assert_close(got, f.clamp(-1, 1))


def test_multistep_sampling_renoises_between_steps():
    schedule = NoiseSchedule(NoiseScheduleConfig(prediction_type="sample"))
    model = _model(2)
    noisy, _, obs = example_inputs(model.config, batch_size=3, seed=4)
    sampler = ConsistencySampler(schedule, num_steps=3)
    assert sampler.is_stochastic and sampler.prev_timestep(90) == 60 and sampler.prev_timestep(30) == -1
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(3, *noisy.shape, generator=g)
    f = ConsistencyModel(model, ConsistencyParameterisation(schedule))
    with torch.no_grad():
        got = sampler.sample(_denoiser(model, obs), noisy, noise=noise)
        x = noisy
        for i, t in enumerate([90, 60, 30]):
            x0 = f(x, torch.full((3,), t), obs).clamp(-1, 1)
            if i < 2:
                t_next = [60, 30][i]
                ab = schedule.alpha_bar(t_next)
                x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise[i]
        torch.testing.assert_close(got, x0)
        # Generator-driven noise: reproducible, and different noise gives different samples.
        a = sampler.sample(_denoiser(model, obs), noisy, generator=torch.Generator().manual_seed(0))
        b = sampler.sample(_denoiser(model, obs), noisy, generator=torch.Generator().manual_seed(0))
        c = sampler.sample(_denoiser(model, obs), noisy, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(UserError, match="not one of this sampler's timesteps"):
        sampler.step(noisy, 50, noisy)
    with pytest.raises(UserError, match="step noises"):
        sampler.sample(_denoiser(model, obs), noisy, noise=noise[:2])


def test_sampler_config_builds_the_consistency_sampler():
    schedule = NoiseSchedule(NoiseScheduleConfig(prediction_type="sample"))
    sampler = make_sampler(schedule, SamplerConfig(name="consistency", num_steps=2))
    assert isinstance(sampler, ConsistencySampler) and sampler.timesteps == [90, 45]
    assert make_sampler(schedule, SamplerConfig(name="consistency", num_steps=None)).timesteps == [90]
