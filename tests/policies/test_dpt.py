"""DP-T denoiser: shapes, masks, the sub-block residual contract, ONNX export, a short training run."""

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamrt.errors import UserError
from dreamrt.policies.dpt import DPT, DPTConfig, example_inputs, preset
from dreamrt.policies.schedulers import DDIMSampler, NoiseSchedule, NoiseScheduleConfig


def _model(**overrides) -> DPT:
    torch.manual_seed(0)
    return DPT(preset("tiny", action_dim=3, obs_dim=5, **overrides)).eval()


def test_shapes_and_timestep_forms():
    model = _model()
    noisy, t, obs = example_inputs(model.config, batch_size=4)
    out = model(noisy, t, obs)
    assert out.shape == (4, 8, 3) and out.dtype == torch.float32
    torch.testing.assert_close(model(noisy, t.float(), obs), out)  # int or float timesteps
    scalar = model(noisy, torch.tensor(7), obs)  # one timestep for the whole batch
    torch.testing.assert_close(scalar, model(noisy, torch.full((4,), 7), obs))
    assert not torch.allclose(model(noisy, t + 1, obs), out)


@pytest.mark.parametrize("mem_mask", [True, False])
def test_causal_self_attention(mem_mask):
    # Memory tokens never depend on actions, so action token t's output depends only on
    # noisy actions 0..t, whatever the memory mask.
    model = _model(memory_mask=mem_mask)
    noisy, t, obs = example_inputs(model.config, batch_size=2)
    changed = noisy.clone()
    changed[:, 5] += 1.0
    a, b = model(noisy, t, obs), model(changed, t, obs)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().amax(dim=(0, 2)).min() > 1e-6
    # Without the causal mask the change reaches earlier tokens.
    full = _model(memory_mask=mem_mask, causal_attn=False)
    assert not torch.allclose(full(noisy, t, obs)[:, :5], full(changed, t, obs)[:, :5])


def test_memory_mask():
    # Action token t sees obs steps 0..t: changing obs step 1 leaves token 0 alone.
    model = _model()
    noisy, t, obs = example_inputs(model.config, batch_size=2)
    changed = obs.clone()
    changed[:, 1] += 1.0
    a, b = model(noisy, t, obs), model(noisy, t, changed)
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0, atol=0)
    assert (a[:, 1:] - b[:, 1:]).abs().amax(dim=(0, 2)).min() > 1e-6
    # Obs step 0 and the timestep reach every token.
    changed0 = obs.clone()
    changed0[:, 0] += 1.0
    assert (a - model(noisy, t, changed0)).abs().amax(dim=(0, 2)).min() > 1e-6
    assert (a - model(noisy, t + 5, obs)).abs().amax(dim=(0, 2)).min() > 1e-6
    # Without the memory mask token 0 sees obs step 1 too.
    open_model = _model(memory_mask=False)
    assert not torch.allclose(open_model(noisy, t, obs)[:, 0], open_model(noisy, t, changed)[:, 0])
    # The mask buffers are built once, not saved with the weights.
    assert not any("mask" in k for k in model.state_dict())


def test_sub_block_residual_contract():
    model = _model()
    names = [name for name, _ in model.sub_blocks]
    assert names == [f"layers.{i}.{k}" for i in range(2) for k in ("self_attn", "cross_attn", "ffn")]
    assert all(model.get_submodule(name) is block for name, block in model.sub_blocks)
    noisy, t, obs = example_inputs(model.config, batch_size=3)
    with torch.inference_mode():
        reference = model(noisy, t, obs)
        # The documented loop, re-implemented from outside.
        memory = model.encode_condition(t, obs)
        x = model.embed_actions(noisy)
        residuals = []
        for _, block in model.sub_blocks:
            residuals.append(block(x, memory))
            x = x + residuals[-1]
        assert torch.equal(model.head(x), reference)

        # The hook sees every block in order and can substitute a (cached) residual.
        seen = []

        def replay(i, block, x, memory):
            seen.append(i)
            return residuals[i]

        assert torch.equal(model(noisy, t, obs, run_block=replay), reference)
        assert seen == list(range(6))
        skip_ffn = model(
            noisy, t, obs, run_block=lambda i, b, x, m: torch.zeros_like(x) if i == 2 else b(x, m)
        )
        assert not torch.allclose(skip_ffn, reference)


def test_dropout_only_in_training():
    model = _model(p_drop_attn=0.3)
    noisy, t, obs = example_inputs(model.config, batch_size=2)
    assert torch.equal(model(noisy, t, obs), model(noisy, t, obs))
    model.train()
    assert not torch.allclose(model(noisy, t, obs), model(noisy, t, obs))


def test_config_and_input_validation():
    with pytest.raises(UserError, match="divisible by n_head"):
        DPTConfig(action_dim=2, obs_dim=3, n_emb=30, n_head=4)
    with pytest.raises(UserError, match="n_emb must be even"):
        DPTConfig(action_dim=2, obs_dim=3, n_emb=9, n_head=3)
    with pytest.raises(UserError, match="horizon must be a positive integer"):
        DPTConfig(action_dim=2, obs_dim=3, horizon=0)
    with pytest.raises(UserError, match="p_drop_attn"):
        DPTConfig(action_dim=2, obs_dim=3, p_drop_attn=1.0)
    with pytest.raises(UserError, match="Did you mean 'small'"):
        preset("smal", action_dim=2, obs_dim=3)
    with pytest.raises(UserError, match="Did you mean 'n_layer'"):
        preset("small", action_dim=2, obs_dim=3, n_layers=2)
    ref = preset("dp_reference", action_dim=2, obs_dim=3)
    assert (ref.n_layer, ref.n_emb, ref.n_head, ref.horizon, ref.n_obs_steps, ref.p_drop_attn) == (
        8,
        256,
        4,
        16,
        2,
        0.3,
    )
    model = _model()
    noisy, t, obs = example_inputs(model.config, batch_size=2)
    with pytest.raises(UserError, match=r"noisy_actions must have shape \(B, 8, 3\)"):
        model(noisy[:, :4], t, obs)
    with pytest.raises(UserError, match=r"obs_features must have shape \(B, 2, 5\)"):
        model(noisy, t, obs[:, :1])
    with pytest.raises(UserError, match="timesteps must be a scalar or a \\(B,\\) tensor with B=2"):
        model(noisy, t[:1].repeat(3), obs)
    with pytest.raises(UserError, match="share the batch size"):
        model(noisy, t, obs[:1])


def test_safetensors_round_trip(tmp_path):
    model = _model()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(123)
    fresh = DPT(model.config).eval()
    inputs = example_inputs(model.config, batch_size=2)
    assert not torch.allclose(fresh(*inputs), model(*inputs))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(fresh(*inputs), model(*inputs))


def test_onnx_export_dynamic_batch_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    names = ["noisy_actions", "timesteps", "obs_features"]
    path = tmp_path / "dpt.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; the dynamo exporter needs onnxscript (not installed).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            example_inputs(model.config, batch_size=2),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["model_output"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "model_output"]},
            opset_version=17,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        inputs = example_inputs(model.config, batch_size=batch, seed=batch)
        (out,) = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
        with torch.inference_mode():
            expected = model(*inputs).numpy()
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_tiny_model_learns_a_conditional_distribution():
    """Toy task: obs c in {-1, +1}; actions are a ramp whose sign follows c. 200 steps, 2-4 s here."""
    torch.manual_seed(0)
    config = preset("tiny", action_dim=1, obs_dim=1)
    model = DPT(config)
    schedule = NoiseSchedule(NoiseScheduleConfig())
    ramp = torch.linspace(0.2, 0.8, config.horizon).reshape(1, -1, 1)  # (1, Ta, 1)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        c = torch.randint(0, 2, (n, 1, 1), generator=g).float() * 2 - 1  # (B, 1, 1)
        x0 = c * ramp + 0.02 * torch.randn(n, config.horizon, 1, generator=g)
        return x0, c.expand(n, config.n_obs_steps, 1)

    def loss_on(x0, obs, noise, t):
        return torch.nn.functional.mse_loss(model(schedule.add_noise(x0, noise, t), t, obs), noise)

    x_eval, obs_eval = batch(512)
    noise_eval = torch.randn(x_eval.shape, generator=g)
    t_eval = schedule.sample_timesteps(512, g)
    model.eval()
    with torch.no_grad():
        before = loss_on(x_eval, obs_eval, noise_eval, t_eval).item()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(200):
        x0, obs = batch(64)
        loss = loss_on(x0, obs, torch.randn(x0.shape, generator=g), schedule.sample_timesteps(64, g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = loss_on(x_eval, obs_eval, noise_eval, t_eval).item()
        # The sampler with the trained network puts each condition's actions on its side.
        obs = torch.tensor([-1.0, 1.0]).reshape(2, 1, 1).expand(2, config.n_obs_steps, 1)
        sampler = DDIMSampler(schedule, num_steps=10)
        actions = sampler.sample(
            lambda x, t: model(x, torch.full((2,), t), obs),
            torch.randn(2, config.horizon, 1, generator=g),
        )
    assert after < 0.3 * before, (before, after)
    means = actions.squeeze(-1).mean(dim=1)  # the ramp averages to +-0.5
    torch.testing.assert_close(means, torch.tensor([-0.5, 0.5]), rtol=0, atol=0.2)
