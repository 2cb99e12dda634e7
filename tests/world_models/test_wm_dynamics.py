"""Next-frame DiT: the block-causal mask, causality of the model itself, config checks,
FLOP accounting, save/load, and a tiny model overfitting a synthetic clip."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dreamrt.errors import UserError
from dreamrt.world_models.dynamics import (
    DynamicsConfig,
    FlowMatchingConfig,
    FrameCond,
    NextFrameDiT,
    block_causal_mask,
    flops_per_pass,
    flow_matching_loss,
    frame_conditions,
    frame_visibility,
    load_dynamics,
    preset,
    save_dynamics,
)
from dreamrt.world_models.sampling import FrameSamplerConfig, Rollout, own_rollout_context
from dreamrt.world_models.synthetic import MovingSquareConfig, moving_square_episode


def _model(**overrides) -> NextFrameDiT:
    torch.manual_seed(0)
    model = NextFrameDiT(preset("tiny", action_dim=3, state_dim=2, **overrides)).eval()
    with torch.no_grad():  # leave adaLN-Zero's identity start, so every path carries signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(model: NextFrameDiT, b: int = 2, t: int = 5, seed: int = 0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c.latent_channels, c.latent_size, c.latent_size, generator=g)
    times = torch.rand(b, t, generator=g)
    cond = frame_conditions(
        torch.randn(b, t, c.action_dim, generator=g), torch.randn(b, t, c.state_dim, generator=g)
    )
    return x, times, cond


def test_block_causal_mask():
    n = 3
    mask = block_causal_mask(4, n)
    assert mask.shape == (12, 12) and mask.dtype == torch.bool
    frame = torch.arange(12) // n
    # A token sees exactly the tokens of its own and earlier frames: itself fully, nothing later.
    assert torch.equal(mask, frame[:, None] >= frame[None, :])
    assert mask[3:6, 3:6].all() and not mask[3:6, 6:].any()
    # Window 2: frame 3 sees frames 2 and 3 only; with a sink, frame 0 too.
    w = block_causal_mask(4, n, window=2)
    assert torch.equal(w[9:12].view(3, 4, n).any(dim=(0, 2)), torch.tensor([False, False, True, True]))
    s = block_causal_mask(4, n, window=2, sink=1)
    assert torch.equal(s[9:12].view(3, 4, n).any(dim=(0, 2)), torch.tensor([True, False, True, True]))
    # Empty cache slots (-1) are never visible; a query frame sees itself.
    vis = frame_visibility(torch.tensor([5]), torch.tensor([-1, 3, 4, 5, 6]), window=3)
    assert vis.tolist() == [[False, True, True, True, False]]


def test_model_is_block_causal():
    model = _model()
    x, t, cond = _inputs(model)
    out = model(x, t, cond)
    assert out.shape == x.shape
    changed = x.clone()
    changed[:, 2] += 1.0  # frame 2's input, at one token only
    changed_token = x.clone()
    changed_token[:, 2, :, 0, 0] += 1.0
    for other in (changed, changed_token):
        diff = (model(other, t, cond) - out).abs().amax(dim=(0, 2, 3, 4))  # per frame
        assert torch.equal(diff[:2], torch.zeros(2))  # earlier frames untouched, exactly
        assert (diff[2:] > 1e-5).all()  # the frame itself (all its tokens) and later frames change
    # Conditions and noise levels act per frame, through the same mask.
    t2 = t.clone()
    t2[:, 3] = 0.9
    diff = (model(x, t2, cond) - out).abs().amax(dim=(0, 2, 3, 4))
    assert torch.equal(diff[:3], torch.zeros(3)) and (diff[3:] > 1e-5).all()


def test_window_limits_attention():
    model = _model()  # tiny: window 4
    x, t, cond = _inputs(model, t=6)
    changed = x.clone()
    changed[:, 0] += 1.0
    diff = (model(changed, t, cond) - model(x, t, cond)).abs().amax(dim=(0, 2, 3, 4))
    # Layer by layer, information moves up to (window - 1) frames per layer: 2 layers reach frame 6.
    assert (diff[:4] > 1e-5).all()
    sink_free = _model(n_layer=1)
    diff = (sink_free(changed, t, cond) - sink_free(x, t, cond)).abs().amax(dim=(0, 2, 3, 4))
    assert (diff[:4] > 1e-5).all() and torch.equal(diff[4:], torch.zeros(2))  # frame 4 no longer sees frame 0
    sink = _model(n_layer=1, sink=1)
    diff = (sink(changed, t, cond) - sink(x, t, cond)).abs().amax(dim=(0, 2, 3, 4))
    assert (diff > 1e-5).all()


def test_null_condition_and_frame_conditions():
    actions = torch.arange(6.0).view(1, 3, 2)
    cond = frame_conditions(actions, None)
    assert cond.valid.tolist() == [[False, True, True]]
    assert torch.equal(cond.actions[0, 1:], actions[0, :2]) and cond.states.shape == (1, 3, 0)
    model = _model()
    x, t, cond = _inputs(model)
    # An invalid frame ignores its action entirely.
    other = FrameCond(cond.actions.clone(), cond.states, cond.valid)
    other.actions[:, 0] += 5.0
    assert torch.equal(model(x, t, cond), model(x, t, other))
    other.actions[:, 1] += 5.0
    assert not torch.allclose(model(x, t, cond)[:, 1], model(x, t, other)[:, 1])


def test_config_validation_and_presets():
    with pytest.raises(UserError, match="even head width"):
        DynamicsConfig(n_emb=30, n_head=4)
    with pytest.raises(UserError, match="window must be >= 2"):
        DynamicsConfig(window=1)
    with pytest.raises(UserError, match="divisible by patch_size"):
        DynamicsConfig(latent_size=8, patch_size=3)
    with pytest.raises(UserError, match="Did you mean 'small'"):
        preset("smal", action_dim=7, state_dim=15)
    with pytest.raises(UserError, match="Did you mean 'n_layer'"):
        preset("small", action_dim=7, state_dim=15, n_layers=2)
    small = preset("small", action_dim=7, state_dim=15)
    assert small == DynamicsConfig() and small.tokens_per_frame == 64
    assert preset("medium", action_dim=7, state_dim=15).n_emb == 192
    model = _model()
    x, t, cond = _inputs(model)
    with pytest.raises(UserError, match="latents must have shape"):
        model(x[:, :, :2], t, cond)
    with pytest.raises(UserError, match="conditions must be"):
        model(x, t, FrameCond(cond.actions[..., :1], cond.states, cond.valid))


def _explicit_attention(q, k, v, attn_mask=None):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(dim=-1) @ v


def test_flops_per_pass_matches_counter(monkeypatch):
    # The counter does not see inside torch's CPU attention kernels: count an explicit version.
    config = preset("tiny", action_dim=3, state_dim=2)
    model = NextFrameDiT(config).eval()
    x, t, cond = _inputs(model, b=1, t=3)
    with torch.no_grad():
        reference = model(x, t, cond)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _explicit_attention)
        with FlopCounterMode(display=False) as counter:
            out = model(x, t, cond)
    torch.testing.assert_close(out, reference)
    analytic = flops_per_pass(config, query_frames=3, key_frames=3)
    assert abs(counter.get_total_flops() - analytic) / analytic < 0.02


def test_save_load_round_trip(tmp_path):
    model = _model()
    path = save_dynamics(model, tmp_path / "ckpt", normalizer={"action": {"mode": "identity"}}, step=7)
    loaded, normalizer = load_dynamics(path)
    assert loaded.config == model.config and normalizer == {"action": {"mode": "identity"}}
    x, t, cond = _inputs(model)
    assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_loss_ignores_context_frames():
    model = _model(source="noise")  # diffusion forcing: context frames drawn per frame
    x, _, cond = _inputs(model, t=4)
    all_context = FlowMatchingConfig(context_prob=0.999999, context_loss_weight=0.0)
    loss, info = flow_matching_loss(model, x, cond, all_context, torch.Generator().manual_seed(0))
    assert float(loss.detach()) == 0.0 and info["context_frames"] == 1.0
    loss, _ = flow_matching_loss(model, x, cond, FlowMatchingConfig(), torch.Generator().manual_seed(0))
    assert float(loss.detach()) > 0.0


@pytest.mark.parametrize("source", ["noise", "last_frame"])
def test_tiny_model_overfits_a_synthetic_clip(source):
    # Latent-space toy: a one-cell square on a 4x4 grid moves by the action (in {-1, 0, 1}^2).
    square = MovingSquareConfig(
        image_size=4, square=1, speed=1, discrete=True, hold=1, action_dim=2, state_dim=2
    )
    ep = moving_square_episode(10, square, np.random.default_rng(1))
    frames = torch.from_numpy(ep["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (10, 3, 4, 4)
    clips = torch.arange(7)[:, None] + torch.arange(4)  # all 4-frame clips
    x, a, s = frames[clips], torch.from_numpy(ep["actions"])[clips], torch.from_numpy(ep["states"])[clips]
    assert (x[:, -1] != x[:, -2]).any(), "the square must move in some clip"

    torch.manual_seed(0)
    model = NextFrameDiT(preset("tiny", action_dim=2, state_dim=2, latent_channels=3, source=source))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    flow = FlowMatchingConfig(p_uncond=0.0, max_targets=2)
    cond = frame_conditions(a.repeat(2, 1, 1), s.repeat(2, 1, 1))
    losses = []
    for _ in range(250):
        loss, info = flow_matching_loss(model, x.repeat(2, 1, 1, 1, 1), cond, flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(info["loss"])
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:10])

    rollout = Rollout(model.eval(), FrameSamplerConfig(steps=8), batch_size=len(x))
    rollout.prefill(x[:, :-1], a[:, :-1], s[:, :-1])
    pred = rollout.step(a[:, -2], s[:, -2])
    mse = (pred - x[:, -1]).pow(2).mean()
    copy_last = (x[:, -2] - x[:, -1]).pow(2).mean()
    assert mse < 0.75 * copy_last, (float(mse), float(copy_last))


def test_last_frame_models_train_in_the_generation_layout():
    model = _model(source="last_frame")
    x, _, cond = _inputs(model, b=64, t=5)
    _, info = flow_matching_loss(
        model, x, cond, FlowMatchingConfig(max_targets=1), torch.Generator().manual_seed(0)
    )
    assert info["context_frames"] == pytest.approx(4 / 5)  # exactly one target per clip: the last frame
    _, info = flow_matching_loss(
        model, x, cond, FlowMatchingConfig(max_targets=4), torch.Generator().manual_seed(0)
    )
    assert 1 / 5 <= info["context_frames"] <= 4 / 5
    with pytest.raises(UserError, match="max_targets"):
        flow_matching_loss(model, x, cond, FlowMatchingConfig(max_targets=5))


def test_own_rollout_context_is_the_models_cached_rollout():
    model = _model(source="last_frame").train()
    x, _, _ = _inputs(model, b=3, t=6)
    g = torch.Generator().manual_seed(1)
    actions, states = torch.randn(3, 6, 3, generator=g), torch.randn(3, 6, 2, generator=g)
    sampler = FrameSamplerConfig(steps=2, temperature=0.0)
    shown = own_rollout_context(model, x, actions, states, 2, sampler)
    assert model.training  # the mode the training loop set is kept
    assert torch.equal(shown[:, :2], x[:, :2]) and torch.equal(shown[:, -1], x[:, -1])

    rollout = Rollout(model.eval(), sampler, batch_size=3)
    rollout.prefill(x[:, :2], actions[:, :2], states[:, :2])
    expected = torch.stack([rollout.step(actions[:, i - 1], states[:, i - 1]) for i in (2, 3, 4)], 1)
    torch.testing.assert_close(shown[:, 2:5], expected)
    assert not torch.equal(shown[:, 2:5], x[:, 2:5])

    # It feeds a training loss that backpropagates (no inference tensors leak into the graph).
    model.train()
    loss, _ = flow_matching_loss(
        model, x, frame_conditions(actions, states), FlowMatchingConfig(max_targets=2), context_latents=shown
    )
    loss.backward()
    with pytest.raises(UserError, match="first must be in"):
        own_rollout_context(model, x, actions, states, 5, sampler)


def test_loss_reads_context_and_anchor_from_context_latents_and_targets_from_latents():
    model = _model(source="last_frame")
    x, _, cond = _inputs(model, b=4, t=5)
    flow = FlowMatchingConfig(max_targets=1)  # the last frame is the only target; frame 3 the anchor

    def loss(context_latents=None) -> float:
        value, _ = flow_matching_loss(
            model, x, cond, flow, torch.Generator().manual_seed(0), context_latents=context_latents
        )
        return float(value.detach())

    base = loss()
    assert loss(x.clone()) == base
    other_target = x.clone()
    other_target[:, -1] += 1.0
    assert loss(other_target) == base  # what a target frame should become is always the real frame
    other_anchor = x.clone()
    other_anchor[:, -2] += 1.0
    assert loss(other_anchor) != base  # the target's flow starts from the shown anchor
    other_early = x.clone()
    other_early[:, 0] += 1.0
    assert loss(other_early) != base  # earlier context is attended to
