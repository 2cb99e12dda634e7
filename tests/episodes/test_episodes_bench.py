"""`dreamrt bench episodes` at a tiny size: every row is measured and the table printed."""

import pytest

from dreamrt.episodes.bench import BenchEpisodesConfig, run
from dreamrt.errors import UserError


def test_bench_runs_and_reports_rows(tmp_path, capsys):
    cfg = BenchEpisodesConfig(
        episodes=2, frames_per_episode=24, image_size=16, batch_size=8, batches=2, workers=0
    )
    result = run(cfg, tmp_path)
    rows = result.summary["rows"]
    cases = [(r["case"], r["source"]) for r in rows]
    assert cases[0] == ("write (2 cams 16px + state)", "zarr")
    assert ("read windows: low-dim obs", "numpy in memory") in cases
    assert ("read windows: obs with images", "zarr") in cases
    assert len(rows) == 6
    assert rows[0]["items"] == 48 and rows[0]["x_real_time"] > 0
    for r in rows[1:]:
        assert r["items"] == 16 and r["per_s"] > 0 and r["vs_memory"] > 0
    assert [r["vs_memory"] for r in rows if r["source"] == "numpy in memory"] == [1.0, 1.0]
    out = capsys.readouterr().out
    assert "items/s" in out and "vs memory" in out
    assert not (tmp_path / "bench.zarr").exists()  # removed unless keep_store


def test_bench_config_validation():
    with pytest.raises(UserError):
        BenchEpisodesConfig(episodes=0)
