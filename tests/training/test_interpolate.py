"""`dreamrt interpolate`: a fine-tune blended back into the model it started from, weight by weight."""

import dataclasses

import numpy as np
import pytest
import torch
from test_language_augment import paraphrase_store
from toy_reaching import toy_config

from dreamrt.cli.main import main
from dreamrt.errors import UserError
from dreamrt.policies.diffusion_policy import load_diffusion_policy
from dreamrt.training.checkpoint import latest_checkpoint, load_checkpoint
from dreamrt.training.interpolate import InterpolateConfig, interpolate_policies
from dreamrt.training.train_policy import train


@pytest.fixture(scope="module")
def base_and_finetune(tmp_path_factory):
    root = tmp_path_factory.mktemp("interpolate")
    store = paraphrase_store(root / "a.zarr", episodes=12, length=10, seed=0)
    train(toy_config(store, language=True, steps=2, val_every=0, save_every=2), root / "base")
    base = latest_checkpoint(root / "base")
    # The fine-tune's store lists its instructions in another order, so its table's rows do too.
    other_store = paraphrase_store(root / "b.zarr", episodes=12, length=10, seed=3, first_goal=1)
    finetune = toy_config(other_store, language=True, steps=3, val_every=0, save_every=3)
    finetune.init_from = str(base)
    train(finetune, root / "ft")
    return base, latest_checkpoint(root / "ft")


def test_interpolate_blends_learnt_weights_and_keeps_the_bases_table_and_config(base_and_finetune, tmp_path):
    base, ft = base_and_finetune
    a, b = load_checkpoint(base), load_checkpoint(ft)
    assert a.config["instructions"] != b.config["instructions"]  # same strings, another order
    assert sorted(a.config["instructions"]) == sorted(b.config["instructions"])

    out = tmp_path / "blend"
    assert main(["interpolate", f"base={base}", f"other={ft}", "alpha=0.25", f"out={out}"]) == 0
    blend = load_checkpoint(out)
    assert blend.config == a.config and blend.normalizer == a.normalizer
    learnt = [k for k in a.model_state if k != "instruction_embeddings"]
    assert learnt and any(not torch.equal(a.model_state[k], b.model_state[k]) for k in learnt)
    for k in learnt:
        assert torch.allclose(
            blend.model_state[k], 0.75 * a.model_state[k] + 0.25 * b.model_state[k], atol=1e-7
        )
    assert torch.equal(blend.model_state["instruction_embeddings"], a.model_state["instruction_embeddings"])

    policy = load_diffusion_policy(out)  # an ordinary checkpoint: it loads and acts
    chunk = policy.act({"observation.state": np.zeros(2, np.float32), "task": a.config["instructions"][0]})
    assert chunk.actions.shape == (4, 2) and np.isfinite(chunk.actions).all()

    same = interpolate_policies(str(base), str(ft), 0.0, tmp_path / "zero")
    assert all(torch.equal(load_checkpoint(same).model_state[k], a.model_state[k]) for k in a.model_state)


def test_interpolate_refuses_what_it_cannot_blend(base_and_finetune, tmp_path, capsys):
    base, ft = base_and_finetune
    with pytest.raises(UserError, match=r"alpha=1.5"):
        InterpolateConfig(base=str(base), other=str(ft), alpha=1.5, out=str(tmp_path / "x"))
    assert main(["interpolate", f"base={base}", f"other={ft}", f"out={tmp_path}"]) != 0
    assert "already exists" in capsys.readouterr().err

    store = paraphrase_store(tmp_path / "c.zarr", episodes=12, length=10, seed=0)
    cfg = toy_config(store, language=True, steps=1, val_every=0, save_every=1)
    cfg.policy_model = dataclasses.replace(cfg.policy_model, horizon=12)  # another network
    train(cfg, tmp_path / "other_net")
    with pytest.raises(UserError, match="different networks"):
        interpolate_policies(str(base), str(tmp_path / "other_net"), 0.5, tmp_path / "y")
    assert not (tmp_path / "y").exists()  # nothing written for a refused blend

    cfg = toy_config(paraphrase_store(tmp_path / "d.zarr", episodes=6, length=30, seed=9), language=True)
    cfg.trainer = dataclasses.replace(cfg.trainer, steps=1, val_every=0, save_every=1)
    train(cfg, tmp_path / "other_scale")  # same network, its own normaliser
    with pytest.raises(UserError, match="normalise"):
        interpolate_policies(str(base), str(tmp_path / "other_scale"), 0.5, tmp_path / "z")
