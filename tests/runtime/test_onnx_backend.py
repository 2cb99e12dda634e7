"""ONNX export and the onnxruntime backend of DiffusionPolicy, against torch, on real tiny models."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreamrt.episodes.normalize import Normalizer
from dreamrt.errors import UserError
from dreamrt.policies import schedulers
from dreamrt.policies.diffusion_policy import (
    DiffusionPolicy,
    DiffusionPolicyConfig,
    load_diffusion_policy,
    save_diffusion_policy,
)
from dreamrt.policies.dpt import example_inputs as denoiser_inputs
from dreamrt.policies.dpt import preset
from dreamrt.policies.encoders import CameraConfig, ObsEncoderConfig
from dreamrt.policies.encoders import example_inputs as encoder_inputs
from dreamrt.policies.schedulers import SamplerConfig
from dreamrt.runtime import onnx_backend as ob
from dreamrt.runtime.bac import CachedDenoiser, full_schedule, make_schedule, uniform_schedule
from dreamrt.training.checkpoint import MODEL_FILE, read_meta

STATE, ENV, ACTION = 15, 24, 7  # the CALVIN-style env's widths
INSTRUCTIONS = ["open the drawer", "turn on the light bulb"]
TOLERANCE = 1e-4  # the parity the export promises (float32 graphs agree to ~1e-6)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_normalizer() -> Normalizer:
    def stats(lo, hi):
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        return {"min": lo.tolist(), "max": hi.tolist(), "mean": ((lo + hi) / 2).tolist(), "std": np.ones_like(lo).tolist()}  # fmt: skip

    g = np.random.default_rng(0)
    return Normalizer.from_stats(
        {
            "observation.state": stats(-g.uniform(1, 2, STATE), g.uniform(1, 2, STATE)),
            "observation.environment_state": stats(-g.uniform(1, 2, ENV), g.uniform(1, 2, ENV)),
            "action": stats(-g.uniform(0.5, 1, ACTION), g.uniform(0.5, 1, ACTION)),
        }
    )


# Derived inputs: the Euler angles of the env's robot state (tcp roll, pitch, yaw) and scene
# state (each block's), and each block's position relative to the tcp.
ANGLES = [[3, 4, 5], [9, 10, 11, 15, 16, 17, 21, 22, 23]]
RELATIVE = ["observation.state:0", *(f"observation.environment_state:{i}" for i in (6, 12, 18))]


def make_policy(
    *, language=True, camera=False, derived=False, seed=0, sampler=None, p_drop=0.1
) -> DiffusionPolicy:
    """A random tiny DP-T with the env's inputs. Dropout is on (eval mode must switch it off in
    the export: a leak would show as a parity error)."""
    enc = ObsEncoderConfig(
        lowdim_angles=ANGLES if derived else [],
        lowdim_relative=RELATIVE if derived else [],
        use_language=language,
        language_dim=8,
        cameras=[CameraConfig(name="static", height=16, width=16, crop_height=14, crop_width=14)]
        if camera
        else [],
        cnn_width=16,
        cnn_blocks=[1],
        keypoints=4,
        image_feature_dim=8,
    )
    cfg = DiffusionPolicyConfig(
        encoder=enc,
        model=preset("tiny", action_dim=ACTION, obs_dim=enc.obs_feature_dim, p_drop_attn=p_drop),
        sampler=sampler or SamplerConfig(name="ddim", num_steps=5),
        n_action_steps=4,
        instructions=INSTRUCTIONS if language else [],
    )
    torch.manual_seed(seed)
    table = F.normalize(torch.randn(len(INSTRUCTIONS), 384), dim=-1) if language else None
    policy = DiffusionPolicy(cfg, make_normalizer(), instruction_embeddings=table).eval()
    with torch.no_grad():  # DP-T's init (std 0.02) barely reacts to its inputs; make every input matter
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return policy


def observation(i: int, camera=False) -> dict:
    g = np.random.default_rng(i)
    obs = {
        "observation.state": g.uniform(-1, 1, STATE).astype(np.float32),
        "observation.environment_state": g.uniform(-1, 1, ENV).astype(np.float32),
        "task": INSTRUCTIONS[i % 2],
    }
    if camera:
        obs["observation.images.static"] = g.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # HWC as the env
    return obs


def window(policy: DiffusionPolicy, *frames: dict) -> dict:
    """A batch of one (1, To, ...) window from To consecutive observations."""
    keys = [*policy.config.lowdim_keys, *policy.config.image_keys]
    batch = {k: torch.from_numpy(np.stack([f[k] for f in frames])[None]) for k in keys}
    batch["task"] = [frames[-1]["task"]]
    return batch


def checkpoint(tmp_path, name="ckpt", **kwargs):
    policy = make_policy(**kwargs)
    return policy, save_diffusion_policy(policy, tmp_path / name)


# ---------------------------------------------------------------------------- export


def test_export_writes_graphs_normaliser_and_a_manifest_with_measured_parity(tmp_path):
    policy, ckpt = checkpoint(tmp_path, camera=True)
    onnx_dir = ckpt / ob.ONNX_DIR
    manifest = ob.export_policy(policy, onnx_dir, checkpoint=ckpt)
    assert policy.training is False and not policy.encoder.training  # export left the modes alone
    n = len(policy.model.sub_blocks)
    for f in [ob.ENCODER_FILE, ob.DENOISER_FILE, ob.CONDITION_FILE, ob.HEAD_FILE, ob.REUSE_FILE]:
        assert (onnx_dir / f).is_file(), f
    assert [ob.block_file(j) for j in range(n)] == [b["file"] for b in manifest["blocks"]["sub_blocks"]]
    assert json.loads((onnx_dir / ob.MANIFEST_FILE).read_text()) == manifest == ob.read_manifest(onnx_dir)
    assert json.loads((onnx_dir / "normalizer.json").read_text()) == json.loads(
        (ckpt / "normalizer.json").read_text()
    )
    assert manifest["opset"] == 17 and manifest["versions"]["torch"] == torch.__version__
    assert manifest["model_sha256"] == read_meta(ckpt).files[MODEL_FILE]
    h, a, to, o = policy.config.horizon, ACTION, 2, policy.config.encoder.obs_feature_dim
    den = manifest["graphs"]["denoiser"]
    assert den["inputs"] == [
        {"name": "noisy_actions", "shape": ["batch", h, a], "dtype": "float32"},
        {"name": "timesteps", "shape": ["timestep_batch"], "dtype": "int64"},
        {"name": "obs_features", "shape": ["batch", to, o], "dtype": "float32"},
    ]
    assert den["outputs"] == [{"name": "model_output", "shape": ["batch", h, a], "dtype": "float32"}]
    enc = manifest["graphs"]["encoder"]
    assert [i["name"] for i in enc["inputs"]] == policy.config.encoder.input_keys
    assert enc["inputs"][2]["shape"] == ["batch", to, 3, 16, 16]  # the camera, float CHW
    for graph in [enc, den, manifest["blocks"]]:
        assert 0 <= graph["max_abs_error"] < TOLERANCE
    assert manifest["max_abs_error"] < TOLERANCE
    action = policy.normalizer.params("action")
    np.testing.assert_allclose(manifest["preprocessing"]["action"]["scale"], action.scale)
    assert manifest["preprocessing"]["task_embedding"]["scale"] == pytest.approx(
        policy.config.instruction_scale
    )
    assert not list(tmp_path.glob(".onnx*")) and not list(
        ckpt.glob(".onnx*")
    )  # no temporary directories left


def test_graphs_match_torch_at_several_batch_sizes(tmp_path):
    policy = make_policy(camera=True)
    ob.export_policy(policy, tmp_path / "onnx")
    model, encoder = policy.model, policy.encoder
    enc = ob.make_session(tmp_path / "onnx" / ob.ENCODER_FILE, 1)
    den = ob.make_session(tmp_path / "onnx" / ob.DENOISER_FILE, 1)
    blocks = ob.OrtBlocks.load(tmp_path / "onnx", [n for n, _ in model.sub_blocks], 1, None)
    with torch.no_grad():
        for b in (1, 2, 5):
            inputs = encoder_inputs(encoder.config, b, 2, seed=100 + b)
            out = enc.run(None, {k: x.numpy() for k, x in zip(encoder.config.input_keys, inputs)})[0]
            ref = encoder.forward_tensors(*inputs)
            assert out.shape == tuple(ref.shape) and np.abs(out - ref.numpy()).max() < TOLERANCE
            noisy, t, features = denoiser_inputs(model.config, b, seed=200 + b)
            for timesteps in (t, t[:1]):
                ref = model(noisy, timesteps, features).numpy()
                feeds = {"noisy_actions": noisy.numpy(), "timesteps": timesteps.numpy(), "obs_features": features.numpy()}  # fmt: skip
                assert np.abs(den.run(None, feeds)[0] - ref).max() < TOLERANCE
                composed = blocks.full_step(noisy.numpy(), timesteps.numpy(), features.numpy())
                assert np.abs(composed - ref).max() < TOLERANCE
            # A different timestep changes the output: the graph really reads it.
            other = den.run(None, {**feeds, "timesteps": (timesteps + 7).numpy()})[0]
            assert np.abs(other - ref).max() > 1e-3


# ---------------------------------------------------------------------------- the backend in a policy


@pytest.mark.parametrize("derived", [False, True], ids=["raw", "angles_and_relative"])
def test_ddim_chunks_on_onnxruntime_match_torch_with_the_same_noise(tmp_path, derived):
    torch_policy = make_policy(camera=True, derived=derived)
    ort_policy = make_policy(camera=True, derived=derived)
    ob.export_policy(torch_policy, tmp_path / "onnx")
    runtime = ob.attach_onnxruntime(ort_policy, tmp_path / "onnx", threads=1)
    assert isinstance(ort_policy.encoder, ob.OrtObservationEncoder)
    assert isinstance(ort_policy.denoiser_factory, ob.OrtDenoiser)
    assert runtime.providers[0] in (ob.CPU_PROVIDER, ob.CUDA_PROVIDER)
    frames = [observation(i, camera=True) for i in range(2)]
    a = torch_policy.predict_actions(
        window(torch_policy, *frames), generator=torch.Generator().manual_seed(3)
    )
    b = ort_policy.predict_actions(window(ort_policy, *frames), generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, torch_policy.config.horizon, ACTION)
    assert (a - b).abs().max() < TOLERANCE
    c = ort_policy.predict_actions(window(ort_policy, *frames), generator=torch.Generator().manual_seed(4))
    assert (a - c).abs().max() > 1e-2  # other noise, another chunk: the comparison can tell them apart
    # Through act(): the observation history, the uint8 HWC image and the instruction lookup.
    torch_policy.reset(5)
    ort_policy.reset(5)
    for obs in [observation(i, camera=True) for i in range(4)]:
        x, y = torch_policy.act(obs), ort_policy.act(obs)
        np.testing.assert_allclose(x.actions, y.actions, atol=TOLERANCE)


def test_attached_policy_keeps_its_state_dict_and_saves_the_same_checkpoint(tmp_path):
    policy = make_policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ob.export_policy(policy, tmp_path / "onnx", blocks=False)
    ob.attach_onnxruntime(policy, tmp_path / "onnx")
    after = policy.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = load_diffusion_policy(save_diffusion_policy(policy, tmp_path / "again"))
    reference = make_policy()
    frames = [observation(0), observation(1)]
    x = saved.predict_actions(window(saved, *frames), generator=torch.Generator().manual_seed(0))
    y = reference.predict_actions(window(reference, *frames), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)
    with pytest.raises(UserError, match="already runs on onnxruntime"):
        ob.attach_onnxruntime(policy, tmp_path / "onnx")
    with pytest.raises(UserError, match="blocks"):
        ob.attach_onnxruntime(
            make_policy(), tmp_path / "onnx", schedule=full_schedule(policy.model, policy.sampler)
        )


def _staggered_schedule(policy: DiffusionPolicy):
    """Block j recomputed every (1 + j % 3)-th step: steps where some, all or no blocks update."""
    k, n = len(policy.sampler.timesteps), len(policy.model.sub_blocks)
    return make_schedule(policy.model, policy.sampler, [tuple(range(0, k, 1 + j % 3)) for j in range(n)])


@pytest.mark.parametrize("which", ["staggered", "uniform", "full"])
def test_bac_on_onnxruntime_matches_torch_bac(tmp_path, which):
    sampler = SamplerConfig(name="ddpm", num_steps=12)
    torch_policy, ort_policy = make_policy(sampler=sampler), make_policy(sampler=sampler)
    schedule = {
        "staggered": _staggered_schedule,
        "uniform": lambda p: uniform_schedule(p.model, p.sampler, every=4),
        "full": lambda p: full_schedule(p.model, p.sampler),
    }[which](torch_policy)
    ob.export_policy(torch_policy, tmp_path / "onnx")
    ob.attach_onnxruntime(ort_policy, tmp_path / "onnx", schedule=schedule)
    assert isinstance(ort_policy.denoiser_factory, ob.OrtCachedDenoiser)
    plain = make_policy(sampler=sampler)
    torch_policy.denoiser_factory = CachedDenoiser(torch_policy.model, schedule, torch_policy.sampler)
    frames = [observation(2), observation(3)]
    results = [
        p.predict_actions(window(p, *frames), generator=torch.Generator().manual_seed(1))
        for p in (torch_policy, ort_policy, plain)
    ]
    assert (results[0] - results[1]).abs().max() < TOLERANCE
    if which == "full":
        assert (results[1] - results[2]).abs().max() < TOLERANCE
    else:  # caching changes the chunk a little, and the same way in both backends
        assert (results[0] - results[2]).abs().max() > 10 * TOLERANCE


def test_cached_denoiser_refuses_steps_outside_its_schedule(tmp_path):
    policy = make_policy(sampler=SamplerConfig(name="ddim", num_steps=4))
    ob.export_policy(policy, tmp_path / "onnx")
    runtime = ob.attach_onnxruntime(
        policy, tmp_path / "onnx", schedule=full_schedule(policy.model, policy.sampler)
    )
    features = torch.zeros(1, 2, policy.config.encoder.obs_feature_dim)
    x = torch.zeros(1, policy.config.horizon, ACTION)
    denoise = runtime.denoiser(features)
    with pytest.raises(UserError, match="timestep 3"):
        denoise(x, 3)  # the schedule's first step is 75
    denoise = runtime.denoiser(features)
    for t in policy.sampler.timesteps:
        denoise(x, t)
    with pytest.raises(UserError, match="5th denoiser call"):
        denoise(x, 0)


def test_encoder_reports_bad_inputs_as_user_errors(tmp_path):
    policy = make_policy(camera=True)
    ob.export_policy(policy, tmp_path / "onnx", blocks=False)
    ob.attach_onnxruntime(policy, tmp_path / "onnx")
    batch = window(policy, observation(0, True), observation(1, True))
    with pytest.raises(UserError, match="encoder.onnx rejected"):
        policy.encoder({**batch, "observation.state": torch.zeros(1, 2, STATE + 1), "task_embedding": torch.zeros(1, 384)})  # fmt: skip
    with pytest.raises(UserError, match="observation.images.static"):
        policy.encoder({**batch, "observation.images.static": torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8)})
    with pytest.raises(UserError, match="lacks"):
        policy.encoder({"task_embedding": torch.zeros(1, 384)})


def test_ensure_export_follows_the_checkpoint_weights(tmp_path):
    policy, ckpt = checkpoint(tmp_path)
    onnx_dir = ckpt / ob.ONNX_DIR
    with pytest.raises(UserError, match="No ONNX export"):
        ob.read_manifest(onnx_dir)
    assert not ob.export_is_current(onnx_dir, ckpt)
    assert ob.ensure_export(policy, ckpt) == onnx_dir
    assert ob.export_is_current(onnx_dir, ckpt, blocks=True)  # a new export carries the block graphs
    first = ob.read_manifest(onnx_dir)["created_at"], (onnx_dir / ob.DENOISER_FILE).stat().st_mtime_ns
    ob.ensure_export(policy, ckpt)  # current: nothing written
    assert (onnx_dir / ob.DENOISER_FILE).stat().st_mtime_ns == first[1]
    other = make_policy(seed=1)
    save_diffusion_policy(other, ckpt, overwrite=True)  # new weights in the same directory
    assert not ob.export_is_current(onnx_dir, ckpt)
    ob.ensure_export(other, ckpt)
    assert ob.read_manifest(onnx_dir)["model_sha256"] == read_meta(ckpt).files[MODEL_FILE]
    fresh = make_policy(seed=1)
    ob.attach_onnxruntime(fresh, onnx_dir)
    frames = [observation(0), observation(1)]
    x = fresh.predict_actions(window(fresh, *frames), generator=torch.Generator().manual_seed(2))
    y = other.predict_actions(window(other, *frames), generator=torch.Generator().manual_seed(2))
    assert (x - y).abs().max() < TOLERANCE
    # An export of another architecture is refused, not run.
    with pytest.raises(UserError, match="another model|of a model"):
        ob.attach_onnxruntime(make_policy(language=False), onnx_dir)


@pytest.mark.skipif(
    "consistency" not in schedulers.SAMPLERS, reason="SamplerConfig does not know the consistency sampler yet"
)
def test_consistency_student_on_onnxruntime_matches_torch(tmp_path):
    from dreamrt.training.distill import build_student

    student = build_student(make_policy(), 1).eval().requires_grad_(False)
    ckpt = save_diffusion_policy(student, tmp_path / "student")
    torch_policy = load_diffusion_policy(ckpt, sampler=SamplerConfig(name="consistency", num_steps=3))
    ort_policy = load_diffusion_policy(ckpt, sampler=SamplerConfig(name="consistency", num_steps=3))
    ob.attach_onnxruntime(ort_policy, ob.ensure_export(torch_policy, ckpt))
    frames = [observation(0), observation(1)]
    x = torch_policy.predict_actions(
        window(torch_policy, *frames), generator=torch.Generator().manual_seed(0)
    )
    y = ort_policy.predict_actions(window(ort_policy, *frames), generator=torch.Generator().manual_seed(0))
    assert (x - y).abs().max() < TOLERANCE


# ---------------------------------------------------------------------------- `dreamrt export onnx`


def test_export_job_writes_the_export_and_reports_parity(tmp_path, capsys):
    from dreamrt.runtime.export_job import ExportConfig, ExportPolicySection, run

    _, ckpt = checkpoint(tmp_path)
    result = run(ExportConfig(policy=ExportPolicySection(path=str(ckpt))), tmp_path / "run")
    s = result.summary
    assert result.exit_code == 0 and s["within_tolerance"] and s["onnx_dir"] == str(ckpt / ob.ONNX_DIR)
    assert {"encoder.onnx", "denoiser.onnx", "normalizer.json", "manifest.json", "blocks/reuse.onnx"} <= set(
        s["files"]
    )
    assert set(s["max_abs_error_per_graph"]) == {"encoder", "denoiser", "blocks"}
    assert s["max_abs_error"] == ob.read_manifest(ckpt / ob.ONNX_DIR)["max_abs_error"] < TOLERANCE
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == s
    assert "max abs error vs torch" in capsys.readouterr().out
    # Elsewhere, without blocks, and a tolerance no float32 graph meets: written, but exit 1.
    strict = run(ExportConfig(policy=ExportPolicySection(path=str(ckpt)), out=str(tmp_path / "x"), blocks=False, tolerance=1e-12))  # fmt: skip
    assert strict.exit_code == 1 and not strict.summary["within_tolerance"]
    assert (tmp_path / "x" / "denoiser.onnx").is_file() and not (tmp_path / "x" / "blocks").exists()
    with pytest.raises(UserError, match="policy.path"):
        ExportConfig()
    with pytest.raises(UserError, match="opset"):
        ExportConfig(policy=ExportPolicySection(path=str(ckpt)), opset=9)


def test_export_config_composes_from_its_yaml(tmp_path):
    from dreamrt.cli.commands import by_name
    from dreamrt.cli.main import compose

    command = by_name()["export onnx"]
    cfg, _ = compose(command, ["policy.path=/ckpt", "blocks=false"])
    assert (cfg.policy.path, cfg.blocks, cfg.opset, cfg.out) == ("/ckpt", False, 17, None)
    with pytest.raises(UserError, match="policy.path"):
        compose(command, [])
