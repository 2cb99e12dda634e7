"""Checkpoint format: round trips, bit-exact resume, and refusal of damaged or mismatched input."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dreamrt
from dreamrt.episodes.normalize import Normalizer
from dreamrt.errors import UserError
from dreamrt.training.checkpoint import (
    FORMAT_VERSION,
    MODEL_FILE,
    TRAINING_TENSORS_FILE,
    capture_training_state,
    config_from_dict,
    latest_checkpoint,
    load_checkpoint,
    load_into,
    load_training_state,
    read_meta,
    restore_training_state,
    save_checkpoint,
    write_run_checkpoint,
)
from dreamrt.training.rng import capture_rng_state, restore_rng_state, seed_everything


def tiny_mlp(hidden: int = 8, depth: int = 2) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.2)]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, 2))
    return nn.Sequential(*layers)


def save_tiny(path: Path, model: nn.Module | None = None, **kwargs) -> Path:
    model = model or tiny_mlp()
    args = dict(
        model_state=model.state_dict(),
        config={"hidden": 8, "depth": 2},
        normalizer={},
        step=3,
        kind="test/mlp",
    )
    args.update(kwargs)
    return save_checkpoint(path, **args)


@dataclasses.dataclass
class Cfg:
    hidden: int = 8
    scales: tuple[float, ...] = (1.0, 2.0)


@dataclasses.dataclass
class Inner:
    width: int = 4
    sizes: tuple[int, ...] = (1, 2)


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner = dataclasses.field(default_factory=Inner)
    extra: Inner | None = None


def flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- round trip


def test_round_trip_keeps_weights_config_normalizer_and_meta(tmp_path):
    torch.manual_seed(0)
    model = tiny_mlp()
    config = {"hidden": 8, "depth": 2, "lr": 1e-5, "betas": (0.9, 0.999), "name": "yes", "none": None}
    normalizer = {"observation.state": {"mean": [0.5, -1.25], "std": [2.0, 1e-7]}}
    path = save_tiny(tmp_path / "ckpt", model, config=config, normalizer=normalizer, step=17)

    ckpt = load_checkpoint(path, kind="test/mlp")
    assert ckpt.step == 17 and ckpt.kind == "test/mlp"
    assert ckpt.config == {**config, "betas": [0.9, 0.999]}  # tuples come back as lists
    assert ckpt.normalizer == normalizer
    assert ckpt.model_state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model_state[key], value)

    fresh = tiny_mlp()
    load_into(fresh, ckpt)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name

    meta = ckpt.meta
    assert meta.format_version == FORMAT_VERSION
    assert meta.dreamrt_version == dreamrt.__version__
    assert meta.torch_version == torch.__version__
    assert meta.git_revision is None or len(meta.git_revision) == 40
    assert datetime.datetime.fromisoformat(meta.created_at).tzinfo is not None
    assert not meta.has_training_state
    assert set(meta.files) == {"config.yaml", "model.safetensors", "normalizer.json"}
    for name, digest in meta.files.items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest
    assert read_meta(path) == meta
    # No leftovers from the atomic write.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_episode_normalizer_round_trips_exactly(tmp_path):
    stats = {
        "observation.state": {"min": [0.1, -3.0], "max": [0.7, 2.0], "mean": [0.3, 0.0], "std": [0.2, 1.0]}
    }
    normalizer = Normalizer.from_stats(stats)
    path = save_tiny(tmp_path / "c", normalizer=normalizer.to_dict())
    restored = Normalizer.from_dict(load_checkpoint(path).normalizer)
    x = np.array([[0.25, 1.5]])
    assert np.array_equal(
        restored.normalize("observation.state", x), normalizer.normalize("observation.state", x)
    )


def test_config_dataclass_and_tied_weights_are_saved(tmp_path):
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied: safetensors refuses aliased tensors unless they are copied apart
    state = {"emb.weight": emb.weight, "head.weight": head.weight}
    path = save_checkpoint(tmp_path / "c", model_state=state, config=Cfg(), normalizer={}, step=0, kind="k")
    ckpt = load_checkpoint(path)
    assert ckpt.config == {"hidden": 8, "scales": [1.0, 2.0]}
    assert torch.equal(ckpt.model_state["emb.weight"], ckpt.model_state["head.weight"])
    assert config_from_dict(Cfg, ckpt.config) == Cfg()


# ---------------------------------------------------------------- exact resume


def lr_lambda(step: int, warmup: int = 3, total: int = 12) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_training(seed: int):
    torch.manual_seed(seed)
    model = tiny_mlp(hidden=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, opt, sched, ema


def train(model, opt, sched, ema, steps: int) -> None:
    """Every step draws from Python, NumPy and torch RNGs (dropout too), so each must be restored."""
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 4) + float(np.random.standard_normal()) + random.random()
        y = x[:, :2].sin()
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(0.9).add_(v, alpha=0.1)


def resume_and_train(run_dir: Path, steps: int, *, restore_rng: bool = True):
    seed_everything(12345)  # a different stream and init than the original run
    model, opt, sched, _ = make_training(seed=999)
    ckpt = load_checkpoint(run_dir, kind="test/mlp")
    load_into(model, ckpt)
    state = load_training_state(run_dir)
    if not restore_rng:
        state = dataclasses.replace(state, rng=None)
    restore_training_state(state, opt, sched)
    ema = state.ema
    train(model, opt, sched, ema, steps)
    return model, opt, sched, ema, state


def test_resume_continues_bit_identically(tmp_path):
    seed_everything(0)
    model, opt, sched, ema = make_training(seed=0)
    train(model, opt, sched, ema, 5)
    counters = {"epoch": 1, "best_loss": math.inf, "samples": 40}
    write_run_checkpoint(
        tmp_path,
        model_state=model.state_dict(),
        config={"hidden": 16},
        normalizer={},
        step=5,
        kind="test/mlp",
        training_state=capture_training_state(opt, sched, ema=ema, counters=counters),
    )
    train(model, opt, sched, ema, 6)

    resumed, r_opt, r_sched, r_ema, state = resume_and_train(tmp_path, 6)
    assert state.counters == counters
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
    for k in ema:
        assert torch.equal(ema[k], r_ema[k]), f"EMA {k} differs after resume"
    assert sched.get_last_lr() == r_sched.get_last_lr()
    original_state, resumed_state = opt.state_dict(), r_opt.state_dict()
    assert original_state["param_groups"] == resumed_state["param_groups"]
    for pid, slots in original_state["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, resumed_state["state"][pid][slot]), f"optimizer state.{pid}.{slot}"


def test_resume_without_rng_state_diverges(tmp_path):
    """The control for the test above: it can fail, because dropout and inputs depend on the RNGs."""
    seed_everything(0)
    model, opt, sched, ema = make_training(seed=0)
    train(model, opt, sched, ema, 3)
    state = capture_training_state(opt, sched, ema=ema)
    write_run_checkpoint(
        tmp_path,
        model_state=model.state_dict(),
        config={},
        normalizer={},
        step=3,
        kind="test/mlp",
        training_state=state,
    )
    train(model, opt, sched, ema, 3)
    resumed, *_ = resume_and_train(tmp_path, 3, restore_rng=False)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_training_state_keeps_optimizer_structure_without_pickle(tmp_path):
    model, opt, sched, ema = make_training(seed=0)
    train(model, opt, sched, ema, 2)
    path = save_tiny(
        tmp_path / "c",
        model,
        training_state=capture_training_state(opt, sched, ema=ema),
        step=2,
        kind="test/mlp",
    )
    doc = json.loads((path / "training_state" / "state.json").read_text())
    assert doc["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}
    from safetensors.torch import load_file

    keys = load_file(path / TRAINING_TENSORS_FILE).keys()
    assert {
        "optimizer.state.0.exp_avg",
        "optimizer.state.0.exp_avg_sq",
        "optimizer.state.0.step",
        "rng.torch",
    } <= keys
    loaded = load_training_state(path)
    assert loaded.optimizer["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(loaded.optimizer["state"]) == set(opt.state_dict()["state"])  # int ids, not strings
    assert loaded.scheduler == sched.state_dict()
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.rglob("*"))


def test_restore_refuses_another_optimizer_class(tmp_path):
    model, opt, sched, ema = make_training(seed=0)
    train(model, opt, sched, ema, 1)
    path = save_tiny(tmp_path / "c", model, training_state=capture_training_state(opt, sched))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="saved from a AdamW, but a SGD"):
        restore_training_state(load_training_state(path), sgd)


def test_rng_state_round_trip_reproduces_draws():
    seed_everything(3)
    state = capture_rng_state()
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.randn(3).tolist())
    seed_everything(4)
    restore_rng_state(state)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.randn(3).tolist()) == first


# ---------------------------------------------------------------- refusals


def test_corrupted_model_file_is_refused_naming_it(tmp_path):
    path = save_tiny(tmp_path / "c")
    flip_byte(path / MODEL_FILE)
    with pytest.raises(UserError, match=r"model\.safetensors in checkpoint .* is corrupted: its sha256"):
        load_checkpoint(path)


def test_corrupted_training_state_is_refused_naming_it(tmp_path):
    model, opt, sched, ema = make_training(seed=0)
    train(model, opt, sched, ema, 1)
    path = save_tiny(tmp_path / "c", model, training_state=capture_training_state(opt, sched))
    load_checkpoint(path)  # the inference files are intact
    flip_byte(path / TRAINING_TENSORS_FILE, offset_from_end=17)
    with pytest.raises(UserError, match=r"training_state/tensors\.safetensors .* is corrupted"):
        load_training_state(path)


def test_missing_file_is_refused_naming_it(tmp_path):
    path = save_tiny(tmp_path / "c")
    (path / "normalizer.json").unlink()
    with pytest.raises(UserError, match=r"incomplete: normalizer\.json missing"):
        load_checkpoint(path)


def test_checkpoint_without_training_state_cannot_resume(tmp_path):
    path = save_tiny(tmp_path / "c")
    with pytest.raises(UserError, match="no training state"):
        load_training_state(path)


def test_wrong_shapes_missing_and_unexpected_keys_are_listed(tmp_path):
    ckpt = load_checkpoint(save_tiny(tmp_path / "c", tiny_mlp(hidden=8, depth=2)))
    with pytest.raises(UserError) as err:
        load_into(tiny_mlp(hidden=16, depth=2), ckpt)
    message = str(err.value)
    assert "shape mismatches (5, checkpoint vs model)" in message
    assert "0.weight [8, 4] vs [16, 4]" in message

    with pytest.raises(
        UserError, match=r"missing from the checkpoint \(2\): 7\.weight \[2, 8\]; 7\.bias \[2\]"
    ):
        load_into(tiny_mlp(hidden=8, depth=3), ckpt)
    with pytest.raises(
        UserError, match=r"unexpected in the checkpoint \(2\): 5\.bias \[2\]; 5\.weight \[2, 8\]"
    ):
        load_into(tiny_mlp(hidden=8, depth=1), ckpt)


def test_kind_mismatch_is_refused(tmp_path):
    path = save_tiny(tmp_path / "c", kind="world_model/dit")
    with pytest.raises(
        UserError, match="holds a 'world_model/dit' model, but a 'policy/diffusion' was expected"
    ):
        load_checkpoint(path, kind="policy/diffusion")


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        ({"format_version": FORMAT_VERSION + 1}, "uses format version 2.*Upgrade dreamrt"),
        ({"format_version": "1"}, "unknown format_version '1'"),
        ({"format_version": 0}, "unknown format_version 0"),
        ({"format": "something-else"}, "not dreamrt checkpoint metadata"),
    ],
)
def test_unknown_format_version_is_refused(tmp_path, edit, pattern):
    path = save_tiny(tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    meta.update(edit)
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=pattern):
        load_checkpoint(path)


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="is not a dreamrt checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="has no complete checkpoint yet"):
        load_checkpoint(tmp_path)


def test_save_refuses_values_that_do_not_round_trip(tmp_path):
    with pytest.raises(UserError, match=r"config\.out is a PosixPath"):
        save_tiny(tmp_path / "a", config={"out": tmp_path})
    with pytest.raises(UserError, match=r"normalizer\.std\[1\] is nan.*strict JSON"):
        save_tiny(tmp_path / "b", normalizer={"std": [1.0, float("nan")]})
    with pytest.raises(UserError, match=r"model_state\['w'\] is a list"):
        save_tiny(tmp_path / "c", model_state={"w": [1.0]})
    with pytest.raises(UserError, match="step must be a non-negative int"):
        save_tiny(tmp_path / "d", step=-1)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_failed_write_leaves_no_temp_dir_and_keeps_last(tmp_path):
    first = write_step(tmp_path, 1)
    bad_state = capture_training_state(counters={"when": datetime.date(2025, 1, 1)})
    with pytest.raises(UserError, match=r"counters\.when is a date"):
        write_step(tmp_path, 2, training_state=bad_state)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.txt", "step_000001"]
    assert latest_checkpoint(tmp_path) == first


def test_save_does_not_clobber(tmp_path):
    path = save_tiny(tmp_path / "c", step=1)
    with pytest.raises(UserError, match="already exists"):
        save_tiny(path, step=2)
    save_tiny(path, step=2, overwrite=True)
    assert read_meta(path).step == 2
    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not a dreamrt checkpoint directory"):
        save_tiny(other, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "data"]


def test_config_from_dict_checks_keys_and_builds_nested_dataclasses():
    built = config_from_dict(Outer, {"name": "x", "inner": {"width": 8, "sizes": [3]}, "extra": {"width": 2}})
    assert built == Outer("x", Inner(8, (3,)), Inner(2))
    with pytest.raises(
        UserError, match=r"config\.inner has unknown key 'widht' for Inner\. Did you mean 'width'\?"
    ):
        config_from_dict(Outer, {"name": "x", "inner": {"widht": 8}})
    with pytest.raises(UserError, match="lacks required key.*name"):
        config_from_dict(Outer, {})


# ---------------------------------------------------------------- run directories


def write_step(run_dir: Path, step: int, **kwargs) -> Path:
    return write_run_checkpoint(
        run_dir, model_state=tiny_mlp().state_dict(), config={}, normalizer={}, step=step, kind="k", **kwargs
    )


def test_last_points_at_the_newest_write(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    write_step(tmp_path, 10)
    newest = write_step(tmp_path, 20)
    assert newest == tmp_path / "checkpoints" / "step_000020"
    assert (tmp_path / "checkpoints" / "last.txt").read_text() == "step_000020\n"
    assert latest_checkpoint(tmp_path) == newest
    assert load_checkpoint(tmp_path).path == newest  # a run directory resolves to its newest
    # A run resumed from step 10 rewrites step 20: the newest write wins, not the highest step.
    write_step(tmp_path, 30)
    rewritten = write_step(tmp_path, 20)
    assert latest_checkpoint(tmp_path) == rewritten
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.txt",
        "step_000010",
        "step_000020",
        "step_000030",
    ]


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        write_step(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.txt",
        "step_000003",
        "step_000004",
    ]


def test_stale_pointer_and_leftovers_do_not_break_latest(tmp_path):
    write_step(tmp_path, 10)
    write_step(tmp_path, 20)
    checkpoints = tmp_path / "checkpoints"
    # Leftovers of a crash: a temp dir with partial files and a step dir that never got meta.json.
    stray = checkpoints / ".tmp-step_000030-deadbeef"
    stray.mkdir()
    (stray / MODEL_FILE).write_bytes(b"partial")
    (checkpoints / "step_000040").mkdir()
    assert latest_checkpoint(tmp_path) == checkpoints / "step_000020"
    # A pointer to a deleted checkpoint falls back to the highest complete step.
    (checkpoints / "last.txt").write_text("step_000099\n")
    assert latest_checkpoint(tmp_path) == checkpoints / "step_000020"
    (checkpoints / "last.txt").unlink()
    assert latest_checkpoint(tmp_path) == checkpoints / "step_000020"
    write_step(tmp_path, 50)
    assert latest_checkpoint(tmp_path) == checkpoints / "step_000050"


def test_process_killed_mid_write_leaves_previous_checkpoint_as_last(tmp_path):
    write_step(tmp_path, 10)
    # A real crash: the writer process dies (no cleanup, no exception handlers) just before meta.json.
    script = textwrap.dedent(
        f"""
        import os, torch
        import dreamrt.training.checkpoint as ck
        real = ck._write_json
        def dying(root, name, data, **kw):
            if name == ck.META_FILE:
                os._exit(7)
            return real(root, name, data, **kw)
        ck._write_json = dying
        ck.write_run_checkpoint({str(tmp_path)!r}, model_state={{"w": torch.ones(3)}}, config={{}},
                                normalizer={{}}, step=20, kind="k")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=120, env=os.environ.copy()
    )
    assert result.returncode == 7, result.stderr.decode()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0].startswith(".tmp-step_000020-") and names[1:] == ["last.txt", "step_000010"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000010"
    assert load_checkpoint(tmp_path).step == 10
    assert write_step(tmp_path, 20) == latest_checkpoint(tmp_path)
