"""`dreamrt bench network` and the reference-style baseline it measures against (tiny sizes, few passes)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dreamrt.errors import UserError
from dreamrt.policies.dpt import DPT, example_inputs, preset
from dreamrt.policies.dpt_baseline import ReferenceDPT, load_dpt_weights
from dreamrt.runtime.bench_network import (
    BASELINE,
    DREAMRT,
    STATE_ACTION_DIM,
    STATE_OBS_DIM,
    BenchNetworkConfig,
    matmul_flops,
    run,
)

ROW_KEYS = {
    "model",
    "backend",
    "threads",
    "params",
    "ms_per_pass_p50",
    "ms_per_pass_p99",
    "ms_per_pass_mean",
    "passes",
    "speedup_vs_baseline",
    "gflop_per_pass",
    "gflops_achieved",
    "max_abs_diff",
}


def tiny_config(**overrides):
    return preset("tiny", action_dim=5, obs_dim=11, **overrides)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from the small init, so that outputs depend visibly on every part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_parameter_counts_match_at_the_same_config():
    for config in (tiny_config(), preset("dp_reference", STATE_ACTION_DIM, STATE_OBS_DIM)):
        ours, baseline = DPT(config).num_parameters(), ReferenceDPT(config).num_parameters()
        assert abs(ours - baseline) <= 0.15 * baseline
    # dp_reference is diffusion_policy's size: its DP-T has 9.0M parameters.
    assert 8.5e6 < baseline < 9.5e6


def test_baseline_computes_the_dpt_function_with_its_weights():
    config = tiny_config()
    dpt = randomised(DPT(config))
    baseline = load_dpt_weights(ReferenceDPT(config), dpt).eval()
    noisy, t, obs = example_inputs(config, batch_size=3, seed=1)
    with torch.inference_mode():
        ours = dpt(noisy, t, obs)
        theirs = baseline(noisy, t, obs)
        assert theirs.shape == (3, config.horizon, config.action_dim)
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.allclose(dpt(noisy, t[:1], obs), baseline(noisy, t[:1], obs), atol=1e-5)
        baseline.decoder.layers[1].multihead_attn.in_proj_weight[-1, 0] += (
            1.0  # a value weight of the cross-attn
        )
        assert (baseline(noisy, t, obs) - ours).abs().max() > 1e-3


def test_load_dpt_weights_refuses_another_shape():
    with pytest.raises(UserError, match="same shape"):
        load_dpt_weights(ReferenceDPT(tiny_config()), DPT(tiny_config(n_emb=16)))


def test_baseline_causal_self_attention_and_memory_mask():
    config = tiny_config(p_drop_attn=0.0)
    baseline = randomised(ReferenceDPT(config))
    noisy, t, obs = example_inputs(config, batch_size=2, seed=2)
    k = 4
    later = noisy.clone()
    later[:, k] += 5.0  # change action token k only
    with torch.inference_mode():
        before, after = baseline(noisy, t, obs), baseline(later, t, obs)
        assert torch.equal(before[:, :k], after[:, :k])  # earlier positions cannot see token k
        assert (before[:, k:] - after[:, k:]).abs().amax(dim=(0, 2)).min() > 1e-4
        # Memory mask: action token 0 sees the timestep token and observation step 0 only.
        other_obs = obs.clone()
        other_obs[:, 1] += 5.0
        changed = baseline(noisy, t, other_obs)
        assert torch.equal(before[:, 0], changed[:, 0])
        assert (before[:, 1] - changed[:, 1]).abs().max() > 1e-4
    unmasked = load_dpt_weights(ReferenceDPT(tiny_config(causal_attn=False)), DPT(tiny_config()))
    assert unmasked.mask is None and baseline.mask.shape == (config.horizon, config.horizon)


@pytest.mark.parametrize("model_cls", [DPT, ReferenceDPT])
def test_matmul_flops_match_torchs_flop_counter(model_cls):
    # torch's counter sees the linear layers (addmm / bmm) but not the fused attention kernel.
    config = tiny_config()
    noisy, t, obs = example_inputs(config, batch_size=2)
    model = model_cls(config).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(noisy, t, obs)
    flops = matmul_flops(config, batch_size=2)
    assert counter.get_total_flops() == flops["total"] - flops["attention"]
    assert flops["attention"] > 0


def test_run_rows_and_speedups_from_the_same_run(tmp_path):
    cfg = BenchNetworkConfig(
        preset="tiny", action_dim=5, obs_dim=11, threads=[1], passes=6, warmup=1, rounds=2, progress=False
    )
    summary = run(cfg, tmp_path).summary
    rows = summary["rows"]
    assert [(r["model"], r["backend"]) for r in rows] == [
        (BASELINE, "torch"),
        (BASELINE, "onnxruntime"),
        (DREAMRT, "torch"),
        (DREAMRT, "onnxruntime"),
    ]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    base = rows[0]["ms_per_pass_p50"]
    flops = matmul_flops(cfg.model_config())["total"]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["passes"] == 6 and r["threads"] == 1
        assert r["params"] == rows[0]["params"]
        assert r["ms_per_pass_p99"] >= r["ms_per_pass_p50"] > 0
        assert r["speedup_vs_baseline"] == pytest.approx(base / r["ms_per_pass_p50"], rel=1e-3)
        assert r["gflop_per_pass"] == pytest.approx(flops / 1e9, rel=1e-6)
        assert r["gflops_achieved"] == pytest.approx(flops / r["ms_per_pass_p50"] / 1e6, rel=1e-2)
        assert r["max_abs_diff"] < 1e-4  # every row computes the same function
    assert rows[0]["speedup_vs_baseline"] == 1.0
    assert summary["flops_per_pass"]["total"] == flops
    assert summary["model_config"]["memory_tokens"] == 3


def test_speedups_per_thread_count():
    cfg = BenchNetworkConfig(
        preset="tiny", backends=["torch"], threads=[1, 2], passes=2, warmup=0, rounds=1, progress=False
    )
    rows = run(cfg, None).summary["rows"]
    assert [(r["model"], r["threads"]) for r in rows] == [
        (BASELINE, 1),
        (BASELINE, 2),
        (DREAMRT, 1),
        (DREAMRT, 2),
    ]
    for r in rows:
        same = next(b for b in rows if b["model"] == BASELINE and b["threads"] == r["threads"])
        assert r["speedup_vs_baseline"] == pytest.approx(
            same["ms_per_pass_p50"] / r["ms_per_pass_p50"], rel=1e-3
        )
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(models=["baseline_nn_transformers"]), "Did you mean 'baseline_nn_transformer'"),
        (dict(models=[DREAMRT]), "must list"),
        (dict(backends=["onnxruntime"]), "must list"),
        (dict(backends=["torch", "tensorrt"]), "backend"),
        (dict(threads=[0]), "threads"),
        (dict(threads=[]), "at least one"),
        (dict(rounds=10, passes=5), "rounds"),
        (dict(preset="huge"), "preset"),
        (dict(models=[BASELINE, BASELINE]), "twice"),
        (dict(opset=9), "opset"),
    ],
)
def test_bad_config_is_a_user_error(overrides, message):
    with pytest.raises(UserError, match=message):
        BenchNetworkConfig(**overrides)


def test_config_composes_from_its_yaml():
    from dreamrt.cli.commands import by_name
    from dreamrt.cli.main import compose

    command = by_name()["bench network"]
    cfg, _ = compose(command, ["threads=[1]", "passes=50", "backends=[torch]"])
    assert (cfg.threads, cfg.passes, cfg.backends) == ([1], 50, ["torch"])
    assert cfg.preset == "dp_reference" and cfg.models == [BASELINE, DREAMRT]
    assert cfg.obs_dim == STATE_OBS_DIM
