"""The policy factory: built-ins, checkpoints, and the runtime options sampler/steps/cache/backend/n_action_steps/threads."""

import math

import numpy as np
import pytest
import torch

from dreamrt.episodes.normalize import Normalizer
from dreamrt.errors import UserError
from dreamrt.policies import schedulers
from dreamrt.policies.diffusion_policy import (
    DiffusionPolicy,
    DiffusionPolicyConfig,
    load_diffusion_policy,
    save_diffusion_policy,
)
from dreamrt.policies.dpt import preset
from dreamrt.policies.encoders import ObsEncoderConfig, ObservationEncoder
from dreamrt.policies.factory import PolicyConfig, is_consistency_student, load_policy, make_policy
from dreamrt.policies.random_policy import RandomPolicy
from dreamrt.policies.schedulers import DDIMSampler, DDPMSampler, SamplerConfig
from dreamrt.runtime.bac import CachedDenoiser, make_schedule, save_schedule, uniform_schedule

STATE = 5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_policy(path, sampler: SamplerConfig, seed: int = 0):
    stats = {
        "observation.state": {
            "min": [-1.0] * STATE,
            "max": [1.0] * STATE,
            "mean": [0.0] * STATE,
            "std": [1.0] * STATE,
        },  # fmt: skip
        "action": {"min": [-2.0, -1.0], "max": [2.0, 1.0], "mean": [0.0, 0.0], "std": [1.0, 1.0]},
    }
    enc = ObsEncoderConfig(lowdim_keys=["observation.state"], lowdim_dims=[STATE])
    cfg = DiffusionPolicyConfig(
        encoder=enc,
        model=preset("tiny", action_dim=2, obs_dim=enc.obs_feature_dim),
        sampler=sampler,
        n_action_steps=3,
    )
    torch.manual_seed(seed)
    policy = DiffusionPolicy(cfg, Normalizer.from_stats(stats)).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return save_diffusion_policy(policy, path)


@pytest.fixture(scope="module")
def ddim_ckpt(tmp_path_factory):
    return save_policy(
        tmp_path_factory.mktemp("ddim") / "ckpt", SamplerConfig(name="ddim", num_steps=6, eta=0.5)
    )


@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory):
    return save_policy(tmp_path_factory.mktemp("ddpm") / "ckpt", SamplerConfig(name="ddpm", num_steps=None))


def obs(i: int) -> dict:
    return {"observation.state": np.linspace(-0.5, 0.5, STATE).astype(np.float32) * (1 + 0.1 * i)}


def chunk(policy, seed: int = 0) -> np.ndarray:
    policy.reset(seed)
    return policy.act(obs(0)).actions


# ---------------------------------------------------------------------------- defaults


def test_builtins_and_defaults_are_unchanged(ddim_ckpt):
    assert isinstance(make_policy(PolicyConfig(name="random"), action_dim=3), RandomPolicy)
    policy = make_policy(PolicyConfig(path=str(ddim_ckpt)))
    assert isinstance(policy, DiffusionPolicy) and isinstance(policy.encoder, ObservationEncoder)
    assert policy.denoiser_factory is None
    assert policy.sampler_config == SamplerConfig(name="ddim", num_steps=6, eta=0.5)
    np.testing.assert_array_equal(chunk(policy), chunk(load_diffusion_policy(ddim_ckpt)))
    assert load_policy(str(ddim_ckpt)).sampler_config == policy.sampler_config  # the old signature


# ---------------------------------------------------------------------------- sampler and steps


@pytest.mark.parametrize(
    "ckpt, sampler, steps, expected_type, expected_steps, expected_eta",
    [
        ("ddim", None, 3, DDIMSampler, 3, 0.5),  # steps alone: the checkpoint's sampler, its eta kept
        ("ddim", "ddim", None, DDIMSampler, 6, 0.5),
        ("ddim", "ddpm", None, DDPMSampler, 100, None),  # another sampler: its defaults
        ("ddim", "ddpm", 20, DDPMSampler, 20, None),
        ("ddpm", "ddim", None, DDIMSampler, 10, 0.0),
        ("ddpm", None, None, DDPMSampler, 100, None),
    ],
)
def test_sampler_and_steps(
    ddim_ckpt, ddpm_ckpt, ckpt, sampler, steps, expected_type, expected_steps, expected_eta
):
    path = str({"ddim": ddim_ckpt, "ddpm": ddpm_ckpt}[ckpt])
    policy = load_policy(path, PolicyConfig(path=path, sampler=sampler, steps=steps))
    assert type(policy.sampler) is expected_type and policy.sampler.num_steps == expected_steps
    if expected_eta is not None:
        assert policy.sampler_config.eta == expected_eta
    assert chunk(policy).shape == (3, 2)


def test_consistency_needs_a_student(ddim_ckpt):
    assert not is_consistency_student(ddim_ckpt)
    with pytest.raises(UserError, match="consistency-distilled student"):
        load_policy(str(ddim_ckpt), PolicyConfig(path=str(ddim_ckpt), sampler="consistency"))


@pytest.mark.skipif(
    "consistency" not in schedulers.SAMPLERS, reason="SamplerConfig does not know the consistency sampler yet"
)
def test_consistency_student_takes_its_sampler_and_steps(ddim_ckpt, tmp_path):
    from dreamrt.policies.consistency import ConsistencySampler
    from dreamrt.training.distill import build_student

    student = build_student(load_diffusion_policy(ddim_ckpt), 1).eval()
    path = str(save_diffusion_policy(student, tmp_path / "student"))
    assert is_consistency_student(path)
    one = load_policy(path, PolicyConfig(path=path))
    three = load_policy(path, PolicyConfig(path=path, sampler="consistency", steps=3))
    assert isinstance(one.sampler, ConsistencySampler) and one.sampler.num_steps == 1
    assert isinstance(three.sampler, ConsistencySampler) and three.sampler.num_steps == 3
    ort = load_policy(path, PolicyConfig(path=path, sampler="consistency", steps=3, backend="onnxruntime"))
    np.testing.assert_allclose(chunk(ort), chunk(three), atol=1e-4)


# ---------------------------------------------------------------------------- cache


def test_uniform_cache_spreads_the_budget(ddpm_ckpt):
    path = str(ddpm_ckpt)
    plain = load_policy(path)
    for updates, every in ((None, 10), (5, 20), (30, 4)):
        policy = load_policy(path, PolicyConfig(path=path, cache="uniform", cache_updates=updates))
        assert isinstance(policy.denoiser_factory, CachedDenoiser)
        schedule = policy.denoiser_factory.schedule
        assert schedule.method == "uniform" and schedule.update_steps[0] == tuple(range(0, 100, every))
        assert len(schedule.update_steps[0]) == math.ceil(100 / every)
    cached = chunk(policy)
    assert cached.shape == (3, 2) and np.abs(cached - chunk(plain)).max() > 1e-5  # caching really ran


def test_bac_reads_the_checkpoints_schedule_and_checks_it(ddim_ckpt, tmp_path):
    path = save_policy(tmp_path / "ckpt", SamplerConfig(name="ddim", num_steps=6))
    cfg = PolicyConfig(path=str(path), cache="bac")
    with pytest.raises(UserError, match="bac calibrate"):
        load_policy(str(path), cfg)
    reference = load_policy(str(path))
    k = len(reference.sampler.timesteps)
    steps = [tuple(range(0, k, 1 + j % 3)) for j in range(len(reference.model.sub_blocks))]
    schedule = make_schedule(reference.model, reference.sampler, steps, settings={"num_updates": 3})
    save_schedule(schedule, path)
    policy = load_policy(str(path), cfg)
    assert isinstance(policy.denoiser_factory, CachedDenoiser)
    assert policy.denoiser_factory.schedule.update_steps == schedule.update_steps
    manual = load_policy(str(path))
    manual.denoiser_factory = CachedDenoiser(manual.model, schedule, manual.sampler)
    np.testing.assert_array_equal(chunk(policy), chunk(manual))
    with pytest.raises(UserError, match="calibrated for a 6-step"):
        load_policy(
            str(path), PolicyConfig(path=str(path), cache="bac", steps=4)
        )  # the schedule is for 6 steps
    with pytest.raises(UserError, match="budget"):
        load_policy(str(path), PolicyConfig(path=str(path), cache="bac", cache_updates=7))
    # A schedule object passed in (e.g. calibrated on the fly) wins over the file.
    other = uniform_schedule(reference.model, reference.sampler, every=2)
    policy = load_policy(str(path), cfg, bac_schedule=other)
    assert policy.denoiser_factory.schedule is other


# ---------------------------------------------------------------------------- backend and threads


def test_onnxruntime_backend_exports_on_first_use_and_matches_torch(ddim_ckpt, tmp_path):
    from dreamrt.runtime.onnx_backend import (
        OrtCachedDenoiser,
        OrtDenoiser,
        OrtObservationEncoder,
        read_manifest,
    )

    path = save_policy(tmp_path / "ckpt", SamplerConfig(name="ddim", num_steps=6))
    torch.set_num_threads(2)
    policy = load_policy(str(path), PolicyConfig(path=str(path), backend="onnxruntime", threads=1))
    assert torch.get_num_threads() == 1  # the sampler arithmetic left to torch runs on one thread
    assert isinstance(policy.encoder, OrtObservationEncoder) and isinstance(
        policy.denoiser_factory, OrtDenoiser
    )
    assert policy.encoder.session.get_session_options().intra_op_num_threads == 1
    assert read_manifest(path / "onnx")["max_abs_error"] < 1e-4
    np.testing.assert_allclose(chunk(policy), chunk(load_policy(str(path))), atol=1e-4)
    cached = load_policy(str(path), PolicyConfig(path=str(path), backend="onnxruntime", cache="uniform", cache_updates=3))  # fmt: skip
    assert isinstance(cached.denoiser_factory, OrtCachedDenoiser)
    torch_cached = load_policy(str(path), PolicyConfig(path=str(path), cache="uniform", cache_updates=3))
    np.testing.assert_allclose(chunk(cached), chunk(torch_cached), atol=1e-4)


def test_noise_scale_option_is_the_samplers_temperature(ddim_ckpt, tmp_path):
    path = str(ddim_ckpt)
    saved = load_policy(path, PolicyConfig(path=path))
    cold = load_policy(path, PolicyConfig(path=path, noise_scale=0.0))
    assert cold.sampler_config == SamplerConfig(name="ddim", num_steps=6, eta=0.5, noise_scale=0.0)
    # The step noise of eta 0.5 still varies with the seed; eta 0 with no starting noise does not.
    assert not np.array_equal(chunk(cold, seed=1), chunk(cold, seed=2))
    frozen = load_policy(path, PolicyConfig(path=path, steps=6, noise_scale=0.0))
    frozen.set_sampler(SamplerConfig(name="ddim", num_steps=6, eta=0.0, noise_scale=0.0))
    np.testing.assert_array_equal(chunk(frozen, seed=1), chunk(frozen, seed=2))
    # Scale 1 is the checkpoint's own sampling, noise for noise.
    np.testing.assert_array_equal(
        chunk(load_policy(path, PolicyConfig(path=path, noise_scale=1.0))), chunk(saved)
    )
    # A checkpoint saved with a temperature keeps it, and the option overrides it.
    warm = str(save_policy(tmp_path / "warm", SamplerConfig(name="ddim", num_steps=6, noise_scale=0.5)))
    assert load_policy(warm, PolicyConfig(path=warm)).sampler_config.noise_scale == 0.5
    assert load_policy(warm, PolicyConfig(path=warm, sampler="ddpm")).sampler_config.noise_scale == 0.5
    assert load_policy(warm, PolicyConfig(path=warm, noise_scale=1.0)).sampler_config.noise_scale == 1.0


def test_threads_option_sets_torchs_pool(ddim_ckpt):
    torch.set_num_threads(2)
    load_policy(str(ddim_ckpt), PolicyConfig(path=str(ddim_ckpt), threads=1))
    assert torch.get_num_threads() == 1


def test_n_action_steps_option_executes_a_prefix_of_the_same_prediction(ddim_ckpt):
    path = str(ddim_ckpt)
    saved = load_policy(path, PolicyConfig(path=path))
    shorter = load_policy(path, PolicyConfig(path=path, n_action_steps=2))
    assert saved.spec.horizon == 3 and shorter.spec.horizon == 2
    # Same weights and noise: the executed chunk is the first Ta actions of the same prediction.
    np.testing.assert_array_equal(chunk(shorter), chunk(saved)[:2])
    too_long = 1 + shorter.config.model.horizon - shorter.config.model.n_obs_steps + 1
    with pytest.raises(UserError, match="n_action_steps"):
        load_policy(path, PolicyConfig(path=path, n_action_steps=too_long))


# ---------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "dddim"}, "Did you mean 'ddim'.*consistency, ddim, ddpm"),
        ({"backend": "onnxrutime"}, "Did you mean 'onnxruntime'.*onnxruntime, torch"),
        ({"cache": "bca"}, "Did you mean 'bac'.*bac, none, uniform"),
        ({"steps": 0}, "policy.steps must be a positive integer"),
        ({"threads": -1}, "policy.threads"),
        ({"cache_updates": 5}, "needs a cache"),
        ({"n_action_steps": 0}, "policy.n_action_steps must be a positive integer"),
        ({"noise_scale": 1.5}, r"policy.noise_scale must be in \[0, 1\]"),
        ({"noise_scale": -0.1}, r"policy.noise_scale must be in \[0, 1\]"),
    ],
)
def test_misspelt_or_impossible_options_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        PolicyConfig(path="ckpt", **kwargs)


def test_runtime_options_need_a_checkpoint():
    with pytest.raises(UserError, match="policy.backend apply to checkpoint policies"):
        PolicyConfig(name="expert", backend="onnxruntime")
    assert PolicyConfig(name="random").runtime_options() == {}


def test_options_compose_through_the_cli_config():
    from dreamrt.cli.commands import by_name
    from dreamrt.cli.main import compose

    cfg, _ = compose(
        by_name()["bench sim"],
        ["policy.path=/some/ckpt", "policy.sampler=ddim", "policy.steps=4", "policy.backend=onnxruntime"],
    )
    assert (cfg.policy.path, cfg.policy.sampler, cfg.policy.steps, cfg.policy.backend) == ("/some/ckpt", "ddim", 4, "onnxruntime")  # fmt: skip
    assert cfg.policy.cache == "none" and cfg.policy.threads is None
    with pytest.raises(UserError, match="Did you mean 'uniform'"):
        compose(by_name()["bench sim"], ["policy.path=/some/ckpt", "policy.cache=uniforn"])
