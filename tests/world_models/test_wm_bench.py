"""The world-model latency benchmark job runs end to end on tiny sizes and reports what it promises."""

import pytest

from dreamrt.errors import UserError
from dreamrt.world_models.bench import BenchWorldModelConfig, frame_flops, run
from dreamrt.world_models.dynamics import flops_per_pass, preset


def test_bench_job_tiny(capsys):
    cfg = BenchWorldModelConfig(
        preset="tiny", tokenizer_preset="tiny", steps=[1, 2], frames=2, warmup=1, speculate=2
    )
    summary = run(cfg).summary
    assert [r["steps"] for r in summary["rows"]] == [1, 2]
    for row in summary["rows"]:
        assert row["frame_ms"] >= row["dynamics_ms"] > 0 and row["speculate_ms_per_frame"] > 0
    assert summary["rows"][1]["dynamics_gflop"] > summary["rows"][0]["dynamics_gflop"]
    assert summary["reference_gflops"] > 0
    assert "world model 'tiny'" in capsys.readouterr().out


def test_frame_flops():
    c = preset("small", action_dim=7, state_dim=15)
    one = flops_per_pass(c, 1, c.window)
    assert frame_flops(c, 4, "clean_pass") == 5 * one
    # Fused: the previous frame rides along in the first pass; same matmul work as a separate pass.
    assert abs(frame_flops(c, 4, "fused") - 5 * one) / one < 0.1
    with pytest.raises(UserError, match="steps >= 1"):
        BenchWorldModelConfig(steps=[0])
