"""`dreamrt bench sim`: a tiny run gives one row per measurement with a plausible rate."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported

import pytest  # noqa: E402

from dreamrt.errors import UserError  # noqa: E402
from dreamrt.policies.factory import PolicyConfig  # noqa: E402
from dreamrt.sim.bench import BenchSimConfig, run  # noqa: E402


def test_bench_sim_tiny_run(capsys):
    result = run(BenchSimConfig(steps=30, chains=1, policy=PolicyConfig(name="random"), num_workers=0))
    rows = result.summary["rows"]
    names = [r["name"] for r in rows]
    assert len(rows) == 5 and "step, no cameras" in names and names[-1].startswith("eval 1 chains")
    for row in rows:
        assert row["steps_per_s"] > 0 and row["ms_per_step"] == pytest.approx(1000 / row["steps_per_s"])
    assert rows[-1]["env_steps"] >= 360  # the random chain's failing subtask runs the full 360 steps
    assert rows[-1]["wall_time_s"] > 0 and rows[-1]["processes"] == 0
    out = capsys.readouterr().out
    assert "steps/s" in out and "step, no cameras" in out


def test_bench_sim_config_checks():
    with pytest.raises(UserError, match="chains"):
        BenchSimConfig(chains=-1)
    with pytest.raises(UserError, match="steps"):
        BenchSimConfig(steps=0)
