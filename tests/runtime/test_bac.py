"""BAC caching wrapper, schedule files and the `bac calibrate` job, on real DP-T models and samplers."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreamrt.errors import UserError
from dreamrt.policies.dpt import DPT, preset
from dreamrt.policies.schedulers import DDIMSampler, DDPMSampler, NoiseSchedule, NoiseScheduleConfig
from dreamrt.runtime.bac import (
    SCHEDULE_FILE,
    BACSchedule,
    BlockCache,
    CachedDenoiser,
    check_schedule,
    full_schedule,
    is_ffn,
    load_schedule,
    make_schedule,
    save_schedule,
    schedule_to_dict,
    uniform_schedule,
)
from dreamrt.runtime.bac_calibrate import (
    STATISTICS_FILE,
    CalibrateConfig,
    CalibrationStatistics,
    ObservationsSection,
    PolicySection,
    ScheduleSection,
    calibrate,
    record_statistics,
    run,
    sample_chunks,
)
from dreamrt.runtime.bac_schedule import SchedulerConfig, schedule_block

SCHEDULE = NoiseSchedule(NoiseScheduleConfig())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two intra-op threads on a shared 2-core machine can be 30x slower than one (spinning
    # workers); these models are far too small to gain from a second thread anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, **overrides) -> DPT:
    torch.manual_seed(seed)
    return DPT(preset("tiny", action_dim=3, obs_dim=5, **overrides)).eval().requires_grad_(False)


def _obs(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, 5, generator=torch.Generator().manual_seed(seed))


def _sample(model, sampler, denoiser, obs, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(obs.shape[0], model.config.horizon, model.config.action_dim, generator=g)
    with torch.inference_mode():
        return sampler.sample(denoiser, x_t, generator=g)


def _uncached(model, obs):
    return lambda x, t: model(x, torch.tensor(t), obs)


# ---------------------------------------------------------------------------- the wrapper


@pytest.mark.parametrize(
    "sampler", [DDPMSampler(SCHEDULE), DDIMSampler(SCHEDULE, 10)], ids=["ddpm100", "ddim10"]
)
def test_every_step_an_update_is_the_uncached_model_bitwise(sampler):
    model, obs = _model(), _obs()
    reference = _sample(model, sampler, _uncached(model, obs), obs)
    for schedule in (full_schedule(model, sampler), uniform_schedule(model, sampler, every=1)):
        out = _sample(model, sampler, CachedDenoiser(model, schedule, sampler)(obs), obs)
        assert torch.equal(out, reference)
    coarse = _sample(
        model, sampler, CachedDenoiser(model, uniform_schedule(model, sampler, 3), sampler)(obs), obs
    )
    assert not torch.equal(coarse, reference)


def test_blocks_run_only_at_their_update_steps():
    model, obs, sampler = _model(), _obs(), DDIMSampler(SCHEDULE, 10)
    names = [name for name, _ in model.sub_blocks]
    steps = [(0, 9), (0, 1, 2), (0, 5), tuple(range(10)), (0,), (0, 3, 6, 9)]
    schedule = make_schedule(model, sampler, steps)
    calls = {name: [] for name in [*names, "out"]}
    step = {"i": 0}
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: calls[n].append(step["i"]))
        for name in [*names, "out"]
    ]
    denoise = CachedDenoiser(model, schedule, sampler)(obs)

    def counting(x, t):
        out = denoise(x, t)
        step["i"] += 1
        return out

    try:
        _sample(model, sampler, counting, obs)
    finally:
        for h in hooks:
            h.remove()
    assert [tuple(calls[n]) for n in names] == steps
    assert calls["out"] == list(range(10))  # the head (and the condition encoder) run every step
    assert schedule.compute_fraction == pytest.approx(sum(map(len, steps)) / 60)
    assert schedule.update_table()[3] == (False, False, False, True, False, True)


def test_cache_is_fresh_for_every_chunk():
    model, sampler = _model(), DDIMSampler(SCHEDULE, 10)
    cached = CachedDenoiser(model, uniform_schedule(model, sampler, 4), sampler)
    a = _sample(model, sampler, cached(_obs(2, seed=0)), _obs(2, seed=0))
    b = _sample(model, sampler, cached(_obs(3, seed=1)), _obs(3, seed=1))  # another batch size
    assert torch.equal(_sample(model, sampler, cached(_obs(2, seed=0)), _obs(2, seed=0)), a)
    fresh = CachedDenoiser(model, uniform_schedule(model, sampler, 4), sampler)
    assert torch.equal(_sample(model, sampler, fresh(_obs(3, seed=1)), _obs(3, seed=1)), b)
    cache = BlockCache(6)
    denoise = cached.denoiser(cache, _obs(2))
    _sample(model, sampler, denoise, _obs(2))
    assert cache.step == 10 and all(r is not None and r.shape == (2, 8, 32) for r in cache.residuals)
    with pytest.raises(UserError, match="holds 5 blocks; the schedule has 6"):
        cached.denoiser(BlockCache(5), _obs(2))
    with pytest.raises(UserError, match="Call the CachedDenoiser again"):
        _sample(model, sampler, denoise, _obs(2))  # a second chunk through a spent denoiser


@pytest.fixture(scope="module")
def trained():
    """A tiny DP-T trained briefly to map observations to a ramp plus an observation offset."""
    torch.manual_seed(0)
    model = DPT(preset("tiny", action_dim=2, obs_dim=3))
    ramp = torch.linspace(-1, 1, 8)[None, :, None]  # (1, Ta, 1)

    def batch(n, g=None):
        obs = torch.rand(n, 2, 3, generator=g) * 2 - 1
        return obs, 0.6 * ramp * torch.tensor([1.0, -0.5]) + 0.3 * obs[:, -1:, :2]  # (n, Ta, 2)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        obs, actions = batch(64)
        noise = torch.randn_like(actions)
        t = SCHEDULE.sample_timesteps(64)
        loss = F.mse_loss(model(SCHEDULE.add_noise(actions, noise, t), t, obs), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), batch(12, torch.Generator().manual_seed(5))


def test_fewer_updates_differ_but_stay_close_on_a_trained_model(trained):
    model, (obs, target) = trained
    sampler = DDPMSampler(SCHEDULE)
    full = sample_chunks(model, sampler, obs, None, seed=1)
    spread = (sample_chunks(model, sampler, obs, None, seed=2) - full).abs().mean()  # sampling noise alone
    g = torch.Generator().manual_seed(0)
    errors = {}
    for m in (5, 20, 50):
        schedule, _ = calibrate(model, sampler, obs[:4], SchedulerConfig(num_updates=m), generator=g)
        cached = sample_chunks(model, sampler, obs, schedule, seed=1)
        assert not torch.equal(cached, full)
        errors[m] = float((cached - full).abs().mean())
    assert errors[20] < 0.5 * spread and errors[50] < 0.2 * spread, (errors, spread)
    assert errors[50] < errors[5]
    assert float((full - target).abs().mean()) < 0.2  # the model did learn the map


# ---------------------------------------------------------------------------- schedules


def test_schedule_json_round_trip(tmp_path):
    model, sampler = _model(), DDIMSampler(SCHEDULE, 10)
    steps = [(0, 9), (0, 1, 2), (0, 5), tuple(range(10)), (0,), (0, 3, 6, 9)]
    schedule = make_schedule(model, sampler, steps, settings={"metric": "cosine", "nested": {"a": [1, 2]}})
    path = save_schedule(schedule, tmp_path)
    assert path == tmp_path / SCHEDULE_FILE
    data = json.loads(path.read_text())
    assert data["sampler"] == {"name": "ddim", "num_steps": 10, "timesteps": sampler.timesteps}
    assert [b["name"] for b in data["blocks"]] == [n for n, _ in model.sub_blocks]
    back = load_schedule(tmp_path)  # a directory: its bac_schedule.json
    assert back == schedule and dict(back.settings) == dict(schedule.settings)
    assert back.update_steps == tuple(steps) and back.origin == str(path)
    check_schedule(back, model, sampler)
    with pytest.raises(UserError, match="exists"):
        save_schedule(schedule, path, overwrite=False)
    with pytest.raises(UserError, match="plain JSON values"):
        save_schedule(make_schedule(model, sampler, steps, settings={"x": object()}), tmp_path / "o.json")
    with pytest.raises(UserError, match="one of each per block"):
        BACSchedule(("a", "b"), (1,), ((0,), (0,)), sampler="ddpm", timesteps=(1, 0))


def test_schedule_for_another_model_or_sampler_is_refused(tmp_path):
    model, ddpm = _model(), DDPMSampler(SCHEDULE)
    path = save_schedule(uniform_schedule(model, ddpm, 10), tmp_path / "s.json")
    schedule = load_schedule(path)
    with pytest.raises(
        UserError, match=r"s\.json is for another model: it lists 6 sub-blocks, the model has 9"
    ):
        CachedDenoiser(_model(n_layer=3), schedule)
    with pytest.raises(UserError, match="another width: block 'layers.0.self_attn' had"):
        CachedDenoiser(_model(n_emb=64), schedule)
    with pytest.raises(UserError, match="calibrated for a 100-step ddpm sampler.*10-step ddim"):
        CachedDenoiser(model, schedule, DDIMSampler(SCHEDULE, 10))
    cached = CachedDenoiser(model, schedule)  # no sampler given: the first step catches it
    with pytest.raises(UserError, match="At step 0 the sampler asked for timestep 90.*runs 99 there"):
        _sample(model, DDIMSampler(SCHEDULE, 10), cached(_obs()), _obs())
    other_weights = _model(seed=1)  # same architecture: allowed (a schedule transfers, if not optimally)
    CachedDenoiser(other_weights, schedule, ddpm)
    with pytest.raises(UserError, match="no `sub_blocks`"):
        CachedDenoiser(torch.nn.Linear(2, 2), schedule)


def _valid_dict():
    model, sampler = _model(), DDIMSampler(SCHEDULE, 10)
    return schedule_to_dict(uniform_schedule(model, sampler, 3))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="something-else"), "is not a BAC schedule"),
        (lambda d: d.update(format_version=2), "format_version 2"),
        (lambda d: d.update(format_version=True), "format_version True"),
        (lambda d: d["blocks"][1].update(update_steps=[1, 4]), "starting with 0"),
        (lambda d: d["blocks"][1].update(update_steps=[0, 4, 4]), "strictly increasing"),
        (lambda d: d["blocks"][1].update(update_steps=[0, 10]), r"in \[0, 10\)"),
        (lambda d: d["blocks"][1].update(update_steps=[0, 2.5]), "must hold integers"),
        (lambda d: d["blocks"][1].update(update_steps=[0, True]), "must hold integers"),
        (lambda d: d["blocks"][2].update(name="layers.0.self_attn"), "more than once"),
        (lambda d: d["blocks"][0].pop("params"), "malformed"),
        (lambda d: d["sampler"].update(num_steps=100), "num_steps is 100 but 10 timesteps"),
        (lambda d: d.update(blocks="all"), "malformed"),
        (lambda d: d.update(method="magic"), "Unknown BAC schedule method"),
        (lambda d: d.update(blocks=[]), "at least one block"),
    ],
)
def test_malformed_schedule_files(tmp_path, edit, message):
    data = _valid_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        load_schedule(path)


def test_unreadable_schedule_files(tmp_path):
    with pytest.raises(UserError, match="No BAC schedule at"):
        load_schedule(tmp_path)
    (tmp_path / SCHEDULE_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_schedule(tmp_path)


# ---------------------------------------------------------------------------- calibration


def test_record_statistics_and_rescheduling(tmp_path):
    model, sampler = _model(), DDIMSampler(SCHEDULE, 12)
    g = torch.Generator().manual_seed(0)
    stats = record_statistics(model, sampler, _obs(3), "cosine", batch_size=2, generator=g)
    assert stats.errors.shape == stats.l1_distances.shape == (6, 12, 12) and stats.num_observations == 3
    for e in (stats.errors, stats.l1_distances):
        np.testing.assert_allclose(np.diagonal(e, axis1=1, axis2=2), 0.0, atol=1e-9)  # a step serves itself
        np.testing.assert_allclose(e, e.transpose(0, 2, 1), atol=1e-9)
    assert (stats.errors >= -1e-9).all() and (stats.errors <= 2).all() and stats.l1_distances.max() > 0
    config = SchedulerConfig(num_updates=4, bubble_top_n=2)
    schedule = stats.schedule(model, sampler, config, note="x")
    bubbled = schedule.settings["bubbled_blocks"]
    assert len(bubbled) == 2 and schedule.settings["note"] == "x"
    names = [n for n, _ in model.sub_blocks]
    plain = [schedule_block(error, 4) for error in stats.errors]
    for u, (name, steps) in enumerate(zip(names, schedule.update_steps)):
        expected = set(plain[u])
        if name in bubbled:  # refreshed with every FFN after it
            expected.update(*(plain[d] for d in range(u + 1, len(names)) if is_ffn(names[d])))
        assert steps == tuple(sorted(expected))
    back = CalibrationStatistics.load(stats.save(tmp_path / STATISTICS_FILE))
    assert back.blocks == stats.blocks and back.metric == "cosine"
    np.testing.assert_array_equal(back.errors, stats.errors)
    assert back.schedule(model, sampler, config).update_steps == schedule.update_steps
    with pytest.raises(UserError, match="measure 'cosine'"):
        back.schedule(model, sampler, SchedulerConfig(num_updates=4, metric="l1"))
    with pytest.raises(UserError, match="do not fit"):
        back.schedule(model, DDIMSampler(SCHEDULE, 10), config)


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_distance_metrics(metric, tmp_path):
    model, sampler = _model(), DDIMSampler(SCHEDULE, 8)
    stats = record_statistics(model, sampler, _obs(2), metric, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(np.diagonal(stats.errors, axis1=1, axis2=2), 0.0, atol=1e-9)
    assert (stats.errors >= 0).all() and stats.errors.max() > 0
    if metric == "l1":
        np.testing.assert_array_equal(stats.errors, stats.l1_distances)
    schedule = stats.schedule(model, sampler, SchedulerConfig(num_updates=3, metric=metric, bubble_top_n=0))
    assert all(len(s) == 3 and s[0] == 0 and s[-1] == 7 for s in schedule.update_steps)
    (tmp_path / "bad.safetensors").write_text("garbage")
    with pytest.raises(UserError, match="not a BAC calibration file"):
        CalibrationStatistics.load(tmp_path / "bad.safetensors")


def test_calibrate_rejects_budgets_beyond_the_sampler():
    model, sampler = _model(), DDIMSampler(SCHEDULE, 10)
    with pytest.raises(UserError, match="does not fit a 10-step sampler"):
        calibrate(model, sampler, _obs(), SchedulerConfig(num_updates=11))


def test_calibrate_job_on_a_preset(tmp_path):
    cfg = CalibrateConfig(
        policy=PolicySection(preset="tiny", action_dim=3, obs_dim=5),
        observations=ObservationsSection(num=3),
        schedule=ScheduleSection(num_updates=8, bubble_top_n=1),
        latency_repeats=1,
        progress=False,
    )
    result = run(cfg, tmp_path)
    s = result.summary
    assert s["method"] == "bac" and s["sampler"] == "ddpm" and s["num_steps"] == 100 and s["num_blocks"] == 6
    assert s["updates_min"] == 8 and len(s["bubbled_blocks"]) == 1
    assert s["latency_full_ms"] > 0 and s["latency_bac_ms"] > 0 and s["action_error_max"] > 0
    schedule = load_schedule(tmp_path)
    assert schedule.settings["preset"] == "tiny" and schedule.settings["num_updates"] == 8
    assert (tmp_path / STATISTICS_FILE).is_file() and json.loads((tmp_path / "summary.json").read_text()) == s
    torch.manual_seed(0)
    check_schedule(schedule, DPT(preset("tiny", action_dim=3, obs_dim=5)), DDPMSampler(SCHEDULE))

    uniform = CalibrateConfig(
        policy=PolicySection(preset="tiny", action_dim=3, obs_dim=5),
        schedule=ScheduleSection(method="uniform", every=25),
        latency_repeats=0,
        progress=False,
    )
    s = run(uniform, tmp_path / "uniform").summary
    assert s["method"] == "uniform" and s["updates_min"] == s["updates_max"] == 4 and "speedup" not in s
    assert load_schedule(tmp_path / "uniform").update_steps[0] == (0, 25, 50, 75)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one model"),
        ({"policy": PolicySection(path="ckpt", preset="tiny")}, "exactly one model"),
        ({"policy": PolicySection(path="ckpt")}, "observations.dataset=STORE"),
        (
            {"policy": PolicySection(preset="tiny"), "observations": ObservationsSection(dataset="x.zarr")},
            "random features",
        ),
        ({"policy": PolicySection(preset="tiny"), "copy_to_checkpoint": True}, "needs policy.path"),
        ({"policy": PolicySection(preset="tiny"), "overwrite": True}, "only applies with copy_to_checkpoint"),
        (
            {"policy": PolicySection(preset="tiny"), "schedule": ScheduleSection(method="unifrom")},
            "Did you mean",
        ),
        ({"policy": PolicySection(preset="tiny"), "schedule": ScheduleSection(metric="l3")}, "BAC metric"),
        ({"policy": PolicySection(preset="tiny"), "batch_size": 0}, "batch_size must be >= 1"),
        ({"policy": PolicySection(preset="dp_ref")}, "Did you mean 'dp_reference'"),
    ],
)
def test_calibrate_config_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        CalibrateConfig(**kwargs)


def test_calibrate_config_composes_from_yaml():
    from dreamrt.cli.commands import by_name
    from dreamrt.cli.main import compose

    command = by_name()["bac calibrate"]
    cfg, _ = compose(command, ["policy.preset=small", "schedule.num_updates=20", "sampler.num_steps=50"])
    assert isinstance(cfg, CalibrateConfig) and cfg.schedule.num_updates == 20 and cfg.sampler.num_steps == 50
    with pytest.raises(UserError, match="Did you mean 'schedule.num_updates'"):
        compose(command, ["policy.preset=small", "schedule.num_update=20"])


# ---------------------------------------------------------------------------- a real policy checkpoint


@pytest.fixture(scope="module")
def policy_checkpoint(tmp_path_factory):
    from dreamrt.episodes import create_store, open_store
    from dreamrt.episodes.normalize import Normalizer
    from dreamrt.policies.diffusion_policy import (
        DiffusionPolicyConfig,
        build_diffusion_policy,
        save_diffusion_policy,
    )
    from dreamrt.policies.encoders import ObsEncoderConfig

    root = tmp_path_factory.mktemp("bac_policy")
    store_path = root / "demos.zarr"
    features = {
        "observation.state": {"dtype": "float32", "shape": [3]},
        "action": {"dtype": "float32", "shape": [2]},
    }
    rng = np.random.default_rng(0)
    with create_store(store_path, features, fps=10) as writer:
        for _ in range(3):
            for _ in range(20):
                writer.add_frame(
                    {
                        "observation.state": rng.normal(size=3).astype(np.float32),
                        "action": rng.normal(size=2),
                    },
                    task="push",
                )
            writer.end_episode()
    store = open_store(store_path)
    encoder = ObsEncoderConfig(lowdim_keys=["observation.state"], lowdim_dims=[3])
    config = DiffusionPolicyConfig(
        encoder=encoder,
        model=preset("tiny", action_dim=2, obs_dim=encoder.obs_feature_dim),
        n_action_steps=4,
    )
    normalizer = Normalizer.from_stats(store.stats, {"observation.state": "min_max", "action": "min_max"})
    torch.manual_seed(0)
    policy = build_diffusion_policy(config, normalizer)
    return save_diffusion_policy(policy, root / "ckpt"), store_path


def test_calibrate_job_with_a_policy_checkpoint(tmp_path, policy_checkpoint):
    from dreamrt.policies.diffusion_policy import load_diffusion_policy
    from dreamrt.policies.schedulers import SamplerConfig

    ckpt, store = policy_checkpoint
    cfg = CalibrateConfig(
        policy=PolicySection(path=str(ckpt)),
        observations=ObservationsSection(dataset=str(store), num=5),
        schedule=ScheduleSection(num_updates=10),
        copy_to_checkpoint=True,
        latency_repeats=0,
        progress=False,
    )
    s = run(cfg, tmp_path / "run").summary
    assert s["checkpoint_schedule"] == str(ckpt / SCHEDULE_FILE) and s["num_blocks"] == 6
    assert (ckpt / SCHEDULE_FILE).read_bytes() == (tmp_path / "run" / SCHEDULE_FILE).read_bytes()
    with pytest.raises(UserError, match="already exists; pass overwrite=true"):
        run(cfg, tmp_path / "again")
    run(CalibrateConfig(**{**cfg.__dict__, "overwrite": True}), tmp_path / "again")

    # The checkpoint still loads, and its schedule drives the policy's own model and sampler.
    policy = load_diffusion_policy(ckpt, sampler=SamplerConfig(name="ddpm", num_steps=None))
    schedule = load_schedule(ckpt)
    assert schedule.settings["checkpoint"] == str(ckpt) and schedule.settings["num_observations"] == 5
    obs = {"observation.state": torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(3))}
    with torch.inference_mode():
        features = policy.encode_observations(obs)
    full = CachedDenoiser(policy.model, full_schedule(policy.model, policy.sampler), policy.sampler)
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(2, 8, 2, generator=g)
    with torch.inference_mode():
        normalised = policy.sampler.sample(full(features), x_t, generator=g)
    expected = policy.predict_actions(obs, generator=torch.Generator().manual_seed(7))  # unnormalised
    got = policy.normalizer.unnormalize("action", normalised.numpy())
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    cached = CachedDenoiser(policy.model, schedule, policy.sampler)
    with torch.inference_mode():
        out = policy.sampler.sample(cached(features), x_t, generator=torch.Generator().manual_seed(8))
    assert out.shape == (2, 8, 2) and torch.isfinite(out).all()
    ddim = load_diffusion_policy(ckpt)  # the checkpoint's own sampler: DDIM-10
    with pytest.raises(UserError, match="calibrated for a 100-step ddpm"):
        CachedDenoiser(ddim.model, schedule, ddim.sampler)
