"""`dreamrt bench training`: one trainer step per network, batch size and optimizer (tiny sizes, few steps)."""

import json

import pytest
import torch

from dreamrt.cli.main import main
from dreamrt.errors import UserError
from dreamrt.training.bench import BenchTrainingConfig, parse_network, run
from dreamrt.training.train_policy import PolicyModelConfig

TINY = dict(networks=["2x32", "1x16"], batch_sizes=[4, 8], steps=2, warmup=1, rounds=2)


def test_rows_cover_every_network_batch_and_optimizer_against_the_default_in_the_same_run(tmp_path):
    threads = torch.get_num_threads()
    summary = run(BenchTrainingConfig(**TINY, threads=threads + 1), tmp_path).summary
    rows = summary["rows"]
    assert [(r["network"], r["batch_size"], r["optimizer"]) for r in rows] == [
        (n, b, o) for n in ("2x32", "1x16") for b in (4, 8) for o in ("default", "fused")
    ]
    for r in rows:
        assert r["ms_per_step"] > 0
        assert r["steps_per_s"] == pytest.approx(1e3 / r["ms_per_step"], rel=1e-2)
        assert r["windows_per_s"] == pytest.approx(r["batch_size"] * r["steps_per_s"], rel=1e-2)
        if r["optimizer"] == "default":
            assert r["speedup_vs_default"] == 1.0
    params = {r["network"]: r["params"] for r in rows}
    assert params["2x32"] > params["1x16"] > 0  # the network overrides reach the policy
    assert summary["device"] == "cpu" and summary["policy_model"]["language"] is True
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["threads"] == threads + 1 and torch.get_num_threads() == threads  # restored


def test_the_cli_composes_the_policy_model_group(tmp_path):
    args = ["bench", "training", "policy_model=state_small", "networks=[1x16]", "batch_sizes=[2]",
            "optimizers=[fused]", "steps=1", "rounds=1", "warmup=0", "--json", str(tmp_path / "s.json")]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["policy_model"]["lowdim_keys"] == ["observation.state", "observation.environment_state"]
    assert [r["speedup_vs_default"] for r in summary["rows"]] == [None]  # no baseline asked for


def test_compiled_rows_are_measured_against_the_eager_default():
    cfg = BenchTrainingConfig(
        networks=["1x16"], batch_sizes=[2], compile_modes=["off", "default"], steps=1, warmup=0, rounds=1
    )
    rows = run(cfg).summary["rows"]
    assert [(r["compile"], r["optimizer"]) for r in rows] == [
        ("off", "default"), ("off", "fused"), ("default", "default"), ("default", "fused")
    ]  # fmt: skip
    assert rows[0]["speedup_vs_default"] == 1.0
    assert all(r["speedup_vs_default"] > 0 for r in rows)


def test_bad_settings_are_user_errors():
    assert parse_network("8x256") == (8, 256)
    for bad in ("4", "4x", "x128", "4x-1", "4by128"):
        with pytest.raises(UserError, match="layers"):
            parse_network(bad)
    with pytest.raises(UserError, match="optimizer"):
        BenchTrainingConfig(optimizers=["sgd"])
    with pytest.raises(UserError, match="compile"):
        BenchTrainingConfig(compile_modes=["fast"])
    with pytest.raises(UserError, match="batch sizes"):
        BenchTrainingConfig(batch_sizes=[0])
    pm = PolicyModelConfig()
    pm.encoder.cameras = [object()]
    with pytest.raises(UserError, match="state policies"):
        run(BenchTrainingConfig(policy_model=pm, **TINY))
