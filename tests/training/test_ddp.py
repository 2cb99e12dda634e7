"""Two-process DistributedDataParallel training (gloo on CPU) launched with torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from toy_reaching import make_store

from dreamrt.training.checkpoint import load_checkpoint

CHILD = Path(__file__).with_name("ddp_policy_child.py")


def test_two_processes_keep_identical_replicas(tmp_path):
    store = make_store(tmp_path / "toy.zarr", episodes=12, length=20)
    run_dir = tmp_path / "run"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(CHILD),
        str(store),
        str(run_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0: step 6" in proc.stdout and "rank 1: step 6" in proc.stdout

    for name in ("raw", "ema"):
        r0, r1 = (load_file(str(run_dir / f"rank{r}_{name}.safetensors")) for r in (0, 1))
        assert r0.keys() == r1.keys()
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (name, k)  # gradients were averaged: ranks saw different data
    # Rank 0 alone wrote the checkpoints (EMA weights) and the log.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000003", "step_000006"]
    ckpt = load_checkpoint(run_dir)
    ema0 = load_file(str(run_dir / "rank0_ema.safetensors"))
    assert all(torch.equal(ckpt.model_state[k], ema0[k]) for k in ema0)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and [r.split(",")[0] for r in rows[1:]] == ["2", "3", "4", "6"]
