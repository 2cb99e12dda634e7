"""Paraphrase mixing (language_augment): which rows mix, what a mix is, and `dreamrt train` with it on."""

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
from toy_reaching import DT, GOALS, expert_actions, toy_config

from dreamrt.episodes import create_store
from dreamrt.errors import UserError
from dreamrt.policies.diffusion_policy import load_diffusion_policy
from dreamrt.policies.language import SentenceEncoder
from dreamrt.training.language_augment import LanguageAugmentConfig, ParaphraseMixer, paraphrase_groups
from dreamrt.training.train_policy import train

PARAPHRASES = {
    "go left": ["go left", "move to the left", "head left"],
    "go right": ["go right", "move to the right", "head right"],
}


def test_groups_follow_the_task_column_and_never_join_an_ambiguous_or_unused_row():
    task_index = np.array([0, 0, 1, 2, 2, 3, 3])
    task_ids = np.array([7, 7, 7, 5, 5, 5, 6])  # row 3 carries two tasks; row 4 has no frames
    groups = paraphrase_groups(task_index, task_ids, num_rows=5)
    assert groups[0] == groups[1] == 7 and groups[2] == 5
    assert groups[3] < 0 and groups[4] < 0 and groups[3] != groups[4]
    with pytest.raises(UserError, match="frames"):
        paraphrase_groups(task_index, task_ids[:-1], num_rows=5)


def test_a_mix_stays_in_its_tasks_span_and_on_the_unit_sphere():
    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(6, 384, generator=g), dim=-1)
    groups = np.array([0, 0, 0, 1, 1, 2])  # row 5 is alone
    mixer = ParaphraseMixer(groups, LanguageAugmentConfig(mix=True, extrapolate=0.5))
    torch.manual_seed(1)
    rows = torch.tensor([0, 1, 2, 3, 4, 5] * 50)
    out = mixer(table, rows)
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(rows)), atol=1e-5)
    for group in (0, 1):
        members = torch.from_numpy(np.flatnonzero(groups == group))
        basis = torch.linalg.qr(table[members].T).Q  # (384, k): the span of the task's rows
        mine = out[torch.isin(rows, members)]
        residual = mine - (mine @ basis) @ basis.T
        assert residual.abs().max() < 1e-5  # no other task's direction leaks in
        assert not torch.allclose(mine, table[rows[torch.isin(rows, members)]])  # and it does mix
    assert torch.allclose(out[rows == 5], table[5].expand(50, -1), atol=1e-6)  # nothing to mix with
    noisy = ParaphraseMixer(groups, LanguageAugmentConfig(mix=True, extrapolate=0.0, noise=0.05))(table, rows)
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(len(rows)), atol=1e-5)
    assert (noisy[rows == 5] - table[5]).abs().max() > 0.01


def paraphrase_store(path, episodes=24, length=20, seed=0, with_task_id=True, first_goal=0):
    """The toy reaching store, each episode's goal named by one of three paraphrases, and
    ``observation.task_id`` naming the goal; goals alternate from ``first_goal`` (which decides
    the order of the store's instruction table)."""
    rng = np.random.default_rng(seed)
    features = {
        "observation.state": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [2]},
    }
    if with_task_id:
        features["observation.task_id"] = {"dtype": "int64", "shape": []}
    with create_store(path, features, fps=30) as writer:
        for e in range(episodes):
            goal = (e + first_goal) % 2
            goal_name = list(GOALS)[goal]
            task = PARAPHRASES[goal_name][(e // 2) % 3]
            p = rng.uniform(-1.0, 1.0, 2)
            for a in expert_actions(p, GOALS[goal_name], length):
                frame = {"observation.state": p.astype(np.float32), "action": a}
                if with_task_id:
                    frame["observation.task_id"] = np.int64(goal)
                writer.add_frame(frame, task=task)
                p = p + DT * a
            writer.end_episode()
    return path


def test_train_mixes_only_in_training_and_saves_the_plain_table(tmp_path):
    store = paraphrase_store(tmp_path / "para.zarr")
    cfg = toy_config(store, language=True, p_drop=0.0, steps=6, val_every=3, save_every=6)
    cfg.language_augment = LanguageAugmentConfig(mix=True, extrapolate=0.25)
    result = train(cfg, tmp_path / "run")
    policy = result.model
    assert isinstance(policy.instruction_augment, ParaphraseMixer)
    # The six paraphrases fall into the two goals' groups.
    by_text = dict(zip(policy.config.instructions, policy.instruction_augment.group_of_row.tolist()))
    assert len({by_text[t] for t in PARAPHRASES["go left"]}) == 1
    assert len({by_text[t] for t in PARAPHRASES["go right"]}) == 1
    assert by_text["go left"] != by_text["go right"]

    # In training mode the loss reads mixed embeddings; in eval mode the table's rows.
    from dreamrt.policies.diffusion_policy import TASK_INDEX_KEY

    batch = {
        "observation.state": torch.zeros(4, 2, 2),
        TASK_INDEX_KEY: torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]]),
        "action": torch.zeros(4, 8, 2),
    }
    mixer = policy.instruction_augment
    losses = {}
    for mode in ("train", "eval"):
        for augment in (mixer, None):
            getattr(policy, mode)()
            policy.instruction_augment = augment
            torch.manual_seed(0)
            with torch.no_grad():
                losses[mode, augment is None] = float(policy.compute_loss(batch))
    assert losses["train", False] != losses["train", True]
    assert losses["eval", False] == losses["eval", True] == losses["train", True]  # no dropout here

    saved = load_diffusion_policy(tmp_path / "run")
    assert saved.instruction_augment is None
    expected = SentenceEncoder().encode(saved.config.instructions)
    assert torch.allclose(saved.instruction_embeddings, expected, atol=1e-5)


def test_mixing_needs_language_and_a_task_column(tmp_path):
    bare = paraphrase_store(tmp_path / "bare.zarr", episodes=4, length=8, with_task_id=False)
    cfg = toy_config(bare, language=True, steps=1)
    cfg.language_augment = LanguageAugmentConfig(mix=True)
    with pytest.raises(UserError, match="group_key='observation.task_id' is not a column"):
        train(cfg, tmp_path / "a")
    store = paraphrase_store(tmp_path / "ok.zarr", episodes=4, length=8)
    cfg = toy_config(store, language=True, steps=1)
    cfg.policy_model.encoder = replace(cfg.policy_model.encoder, use_language=False)
    cfg.language_augment = LanguageAugmentConfig(mix=True)
    with pytest.raises(UserError, match="reads no language"):
        train(cfg, tmp_path / "b")
    noise_only = toy_config(bare, language=True, steps=1, batch_size=4, save_every=0, val_every=0)
    noise_only.language_augment = LanguageAugmentConfig(noise=0.05)  # needs no task column
    assert isinstance(train(noise_only, tmp_path / "c").model.instruction_augment, ParaphraseMixer)
    with pytest.raises(UserError, match="extrapolate"):
        LanguageAugmentConfig(mix=True, extrapolate=-1.0)


def test_distill_mixes_the_same_embeddings_for_teacher_and_student(tmp_path):
    from dreamrt.training.distill import DistillConfig, distill
    from dreamrt.training.train_policy import DataConfig
    from dreamrt.training.trainer import TrainerConfig

    store = paraphrase_store(tmp_path / "para.zarr")
    train(toy_config(store, language=True, steps=4, val_every=0, save_every=4), tmp_path / "teacher")
    trainer = TrainerConfig(
        batch_size=16,
        lr=1e-3,
        warmup_steps=1,
        log_every=1,
        val_every=0,
        save_every=3,
        device="cpu",
        threads=1,
        progress=False,
    )
    cfg = DistillConfig(
        teacher=str(tmp_path / "teacher"),
        dataset=DataConfig(path=str(store), val_ratio=0.0),
        steps=3,
        eval_windows=16,
        trainer=trainer,
        language_augment=LanguageAugmentConfig(mix=True),
    )
    result, _ = distill(cfg, tmp_path / "student")
    objective = result.model
    mixer = objective.student.instruction_augment
    assert isinstance(mixer, ParaphraseMixer)
    assert len(set(mixer.group_of_row.tolist())) == 2  # the two goals

    from dreamrt.policies.diffusion_policy import TASK_INDEX_KEY
    from dreamrt.policies.encoders import TASK_EMBEDDING_KEY

    seen = {}
    for name in ("teacher", "student"):
        policy = getattr(objective, name)
        policy.encode_observations = functools.partial(
            lambda encode, name, batch: seen.setdefault(name, batch) and encode(batch),
            policy.encode_observations,
            name,
        )
    rows = torch.tensor([0, 1, 2, 3, 4, 5] * 4)
    batch = {
        "observation.state": torch.zeros(len(rows), 2, 2),
        TASK_INDEX_KEY: rows[:, None].expand(-1, 2),
        "action": torch.zeros(len(rows), 8, 2),
    }
    objective.train()
    objective(batch)
    mixed = seen["student"][TASK_EMBEDDING_KEY]
    assert torch.equal(seen["teacher"][TASK_EMBEDDING_KEY], mixed)  # one target for one input
    assert not torch.allclose(mixed, objective.student.instruction_embeddings[rows])

    saved = load_diffusion_policy(tmp_path / "student")
    assert saved.instruction_augment is None
