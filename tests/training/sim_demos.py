"""Expert demonstrations recorded in the CALVIN-style sim, for tests that train on real env data."""

from __future__ import annotations

from pathlib import Path

from dreamrt.sim.env import EnvConfig
from dreamrt.sim.record import RecordConfig
from dreamrt.sim.record import run as record


def record_demos(out: Path, task: str, *, cameras: bool, episodes: int = 2) -> Path:
    """``episodes`` expert episodes of ``task`` (seed 0, in this process) into ``out/<task>.zarr``."""
    store = out / f"{task}.zarr"
    config = RecordConfig(
        out=str(store),
        episodes=episodes,
        tasks=[task],
        num_workers=0,
        progress=False,
        seed=0,
        env=EnvConfig(cameras=cameras),
    )
    record(config, out / "record")
    return store
