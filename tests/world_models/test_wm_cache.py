"""KV cache bookkeeping, cached generation against the uncached reference, speculation and rollback."""

import pytest
import torch

from dreamrt.errors import UserError
from dreamrt.world_models.dynamics import FrameCond, NextFrameDiT, frame_conditions, preset
from dreamrt.world_models.kv_cache import KVCache, KVCacheConfig
from dreamrt.world_models.sampling import (
    FrameSamplerConfig,
    Rollout,
    context_frames,
    generate_uncached,
    sampling_times,
)

B = 2


def _model(**overrides) -> NextFrameDiT:
    torch.manual_seed(0)
    model = NextFrameDiT(preset("tiny", action_dim=3, state_dim=2, **overrides)).eval()
    with torch.no_grad():  # leave adaLN-Zero's identity start, so every path carries signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _context(model: NextFrameDiT, frames: int = 3, seed: int = 0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, frames, c.latent_channels, c.latent_size, c.latent_size, generator=g)
    return (
        latents,
        torch.randn(B, frames, c.action_dim, generator=g),
        torch.randn(B, frames, c.state_dim, generator=g),
    )


def _cond(action: torch.Tensor, state: torch.Tensor, k: int = 1) -> FrameCond:
    return FrameCond(
        action[:, None].expand(-1, k, -1),
        state[:, None].expand(-1, k, -1),
        torch.ones(B, k, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------- the cache itself


def test_cache_append_accept_evicts_outside_the_window():
    cache = KVCache.allocate(KVCacheConfig(n_layer=1, n_head=1, head_dim=2, tokens_per_frame=2, window=3))
    assert cache.config.slots == 3 and cache.k.shape == (1, 1, 1, 6, 2)
    for frame in range(5):
        slots = cache.append(1)
        cache.k[:, :, :, slots * 2 : slots * 2 + 2] = float(frame + 1)
        cache.accept()
        # The next frame sees the window-1 = 2 previous frames; nothing older is kept.
        assert cache.frames() == list(range(max(0, frame - 1), frame + 1))
    # Evicted slots are zeroed: only the two kept frames' values remain.
    assert sorted(set(cache.k.flatten().tolist())) == [0.0, 4.0, 5.0]
    with pytest.raises(UserError, match="max_pending=1"):
        cache.append(2)
    with pytest.raises(UserError, match="only tentative frames"):
        cache.rollback(3)


def test_cache_sinks_stay():
    cache = KVCache.allocate(
        KVCacheConfig(n_layer=1, n_head=1, head_dim=2, tokens_per_frame=1, window=2, sink=1)
    )
    for _ in range(6):
        cache.append(1)
        cache.accept()
    assert cache.frames() == [0, 5]


def test_cache_rollback_and_snapshot_are_exact():
    cache = KVCache.allocate(
        KVCacheConfig(n_layer=2, n_head=1, head_dim=2, tokens_per_frame=2, window=3, max_pending=3)
    )
    for _ in range(4):
        slots = cache.append(1)
        cache.k[:, :, :, slots * 2 : slots * 2 + 2] = torch.randn(2, 1, 1, 2, 2)
        cache.accept()
    before = cache.snapshot()
    for s in cache.append(3).tolist():  # what the model does: fill the tentative slots
        cache.k[:, :, :, s * 2 : s * 2 + 2] += 1.0
        cache.v[:, :, :, s * 2 : s * 2 + 2] -= 1.0
    assert cache.pending == 3 and cache.length == 7
    cache.rollback(5)
    assert cache.length == 5 and cache.pending == 1
    cache.accept(0)
    assert cache.length == 4
    assert torch.equal(cache.k, before.k) and torch.equal(cache.v, before.v)
    assert torch.equal(cache.slot_frame, before.slot_frame) and cache.accepted == before.accepted
    # A snapshot restores accepted frames too.
    cache.append(1)
    cache.accept()
    cache.restore(before)
    assert torch.equal(cache.k, before.k) and cache.length == 4 and cache.frames() == [2, 3]


# ---------------------------------------------------------------------------- cached == uncached


@pytest.mark.parametrize(
    "sampler",
    [
        FrameSamplerConfig(steps=3, kv_write="fused", context_noise=0.05, temperature=1.0),
        FrameSamplerConfig(steps=3, kv_write="clean_pass", context_noise=0.05, temperature=1.0),
        FrameSamplerConfig(
            solver="x0", timesteps=[1.0, 0.5], kv_write="fused", context_noise=0.1, seed=3, temperature=1.0
        ),
    ],
    ids=["euler-fused", "euler-clean-pass", "x0-2-step-fused"],
)
@pytest.mark.parametrize("source", ["noise", "last_frame"])
def test_cached_generation_matches_uncached(sampler, source):
    model = _model(source=source)  # tiny: window 4, so the cache rolls within the 7 generated frames
    latents, actions, states = _context(model)
    rollout = Rollout(model, sampler, batch_size=B, max_speculation=3)
    rollout.prefill(latents, actions, states)
    reference = context_frames(latents, frame_conditions(actions, states), sampler)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        action, state = torch.randn(B, 3, generator=g), torch.randn(B, 2, generator=g)
        cached = rollout.step(action, state)
        expected, new = generate_uncached(model, reference, _cond(action, state), sampler)
        reference += new
        torch.testing.assert_close(cached, expected[:, 0], rtol=0, atol=1e-5)
    assert rollout.cache.frames()[0] > 0  # the window rolled

    # Speculation: 3 frames in one parallel run, the same as the reference generating them jointly.
    action, state = torch.randn(B, 3, generator=g), torch.randn(B, 2, generator=g)
    speculated = rollout.speculate(3, action, state)
    expected, new = generate_uncached(model, reference, _cond(action, state, 3), sampler)
    torch.testing.assert_close(speculated, expected, rtol=0, atol=1e-5)
    # Keep 2; the next frame must follow from exactly those.
    rollout.accept(2)
    reference += new[:2]
    action = torch.randn(B, 3, generator=g)
    expected, _ = generate_uncached(model, reference, _cond(action, state), sampler)
    torch.testing.assert_close(rollout.step(action, state), expected[:, 0], rtol=0, atol=1e-5)


def test_rejected_speculation_restores_the_cache_exactly():
    model = _model()
    latents, actions, states = _context(model)
    rollout = Rollout(
        model,
        FrameSamplerConfig(steps=2, kv_write="clean_pass", temperature=1.0),
        batch_size=B,
        max_speculation=3,
    )
    rollout.prefill(latents, actions, states)
    action, state = torch.randn(B, 3), torch.randn(B, 2)
    rollout.step(action, state)
    before = rollout.cache.snapshot()
    rollout.speculate(3, action, state)
    assert rollout.cache.pending == 3 and not torch.equal(rollout.cache.k, before.k)
    rollout.accept(0)
    cache = rollout.cache
    assert torch.equal(cache.k, before.k) and torch.equal(cache.v, before.v)
    assert torch.equal(cache.slot_frame, before.slot_frame)
    assert (cache.length, cache.accepted) == (before.length, before.accepted)


def test_fused_rejected_speculation_leaves_generation_unchanged():
    # In fused mode the speculation pass also writes the last frame's final keys/values (owed
    # anyway), so compare what matters: the frames generated afterwards.
    model = _model()
    latents, actions, states = _context(model)
    sampler = FrameSamplerConfig(steps=2, kv_write="fused", context_noise=0.05, temperature=1.0)
    plain = Rollout(model, sampler, batch_size=B, max_speculation=2)
    speculative = Rollout(model, sampler, batch_size=B, max_speculation=2)
    for rollout in (plain, speculative):
        rollout.prefill(latents, actions, states)
    a1, a2, state = torch.randn(B, 3), torch.randn(B, 3), torch.randn(B, 2)
    speculative.speculate(2, a1, state)
    speculative.accept(0)
    for action in (a2, a1, a2):
        torch.testing.assert_close(
            speculative.step(action, state), plain.step(action, state), rtol=0, atol=1e-5
        )


def test_rollout_snapshot_restore_replays():
    model = _model()
    latents, actions, states = _context(model)
    rollout = Rollout(model, FrameSamplerConfig(steps=2, temperature=1.0), batch_size=B)
    rollout.prefill(latents, actions, states)
    action, state = torch.randn(B, 3), torch.randn(B, 2)
    snap = rollout.snapshot()
    first = [rollout.step(action, state) for _ in range(5)]
    rollout.restore(snap)
    again = [rollout.step(action, state) for _ in range(5)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_rollout_errors():
    model = _model()
    latents, actions, states = _context(model)
    rollout = Rollout(model, FrameSamplerConfig(steps=1), batch_size=B, max_speculation=2)
    with pytest.raises(UserError, match="prefill"):
        rollout.step(torch.zeros(B, 3), torch.zeros(B, 2))
    rollout.prefill(latents, actions, states)
    with pytest.raises(UserError, match=r"action must have shape \(2, 3\)"):
        rollout.step(torch.zeros(B, 4), torch.zeros(B, 2))
    with pytest.raises(UserError, match="robot state"):
        rollout.step(torch.zeros(B, 3))
    with pytest.raises(UserError, match="max_speculation"):
        rollout.speculate(3, torch.zeros(B, 3), torch.zeros(B, 2))
    rollout.speculate(2, torch.zeros(B, 3), torch.zeros(B, 2))
    with pytest.raises(UserError, match="accept"):
        rollout.step(torch.zeros(B, 3), torch.zeros(B, 2))


def test_sampler_config():
    assert sampling_times(FrameSamplerConfig(steps=4)) == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = sampling_times(FrameSamplerConfig(steps=4, shift=3.0))
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] > 0.5
    assert sampling_times(FrameSamplerConfig(timesteps=[1.0, 0.4])) == [1.0, 0.4, 0.0]
    with pytest.raises(UserError, match="strictly decreasing"):
        FrameSamplerConfig(timesteps=[0.5, 0.9])
    with pytest.raises(UserError, match="Did you mean 'euler'"):
        FrameSamplerConfig(solver="eular")


def test_last_frame_source_starts_the_flow_at_the_last_clean_frame():
    # adaLN-Zero: a fresh model predicts zero velocity, so a frame ends where its flow starts.
    model = NextFrameDiT(
        preset("tiny", action_dim=3, state_dim=2, source="last_frame", source_sigma=0.25)
    ).eval()
    latents, actions, states = _context(model)
    rollout = Rollout(model, FrameSamplerConfig(steps=2, context_noise=0.1, temperature=1.0), batch_size=B)
    rollout.prefill(latents, actions, states)
    frame = rollout.step(torch.zeros(B, 3), torch.zeros(B, 2))
    offset = frame - latents[:, -1]  # the clean latent, not its noised context form
    assert abs(float(offset.std()) - 0.25) < 0.05 and abs(float(offset.mean())) < 0.05
    # The next frame starts from the generated one.
    following = rollout.step(torch.zeros(B, 3), torch.zeros(B, 2))
    assert abs(float((following - frame).std()) - 0.25) < 0.05


def test_temperature_zero_starts_at_the_source_mean():
    model = NextFrameDiT(
        preset("tiny", action_dim=3, state_dim=2, source="last_frame")
    ).eval()  # zero velocity
    latents, actions, states = _context(model)
    rollout = Rollout(model, FrameSamplerConfig(steps=2, temperature=0.0), batch_size=B)
    rollout.prefill(latents, actions, states)
    assert torch.equal(rollout.step(torch.zeros(B, 3), torch.zeros(B, 2)), latents[:, -1])
    assert FrameSamplerConfig().temperature == 0.0  # the default every tool samples at
    with pytest.raises(UserError, match="temperature"):
        FrameSamplerConfig(temperature=1.5)
