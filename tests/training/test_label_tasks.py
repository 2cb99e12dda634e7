"""Task labels for instruction grounding: recorded by `dreamrt train`, added by `dreamrt label-tasks`,
and read by a policy acting on a wording it was never trained on."""

import json
import shutil

import pytest
import torch
from test_language_augment import PARAPHRASES, paraphrase_store
from toy_reaching import toy_config

from dreamrt.cli.main import main
from dreamrt.errors import UserError
from dreamrt.policies.diffusion_policy import load_diffusion_policy
from dreamrt.policies.factory import PolicyConfig, load_policy
from dreamrt.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dreamrt.training.label_tasks import LabelTasksConfig, run
from dreamrt.training.train_policy import train

UNSEEN_LEFT = "head towards the left side"  # nearest paraphrase: "head right" (MiniLM)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    store = paraphrase_store(root / "para.zarr", episodes=12, length=10)
    train(toy_config(store, language=True, steps=2, val_every=0, save_every=2), root / "run")
    return store, latest_checkpoint(root / "run")


def test_train_records_each_instructions_task_and_grounding_reads_an_unseen_wording(trained):
    _, ckpt = trained
    policy = load_diffusion_policy(ckpt)
    task_of = dict(zip(policy.config.instructions, policy.config.instruction_tasks))
    assert {task_of[t] for t in PARAPHRASES["go left"]} == {0}  # the store's task_id of the left goal
    assert {task_of[t] for t in PARAPHRASES["go right"]} == {1}
    assert policy.config.instruction_grounding == "task"  # on by default where the labels are known

    raw = load_policy(str(ckpt), PolicyConfig(path=str(ckpt), grounding="none")).embed_instructions(
        [UNSEEN_LEFT]
    )
    assert not any(torch.allclose(raw[0], row) for row in policy.instruction_embeddings)
    grounded = load_policy(str(ckpt), PolicyConfig(path=str(ckpt)))
    embedding = grounded.embed_instructions([UNSEEN_LEFT])
    left_rows = [i for i, t in enumerate(grounded.config.instructions) if t in PARAPHRASES["go left"]]
    assert grounded.groundings[UNSEEN_LEFT].row in left_rows
    assert torch.equal(embedding[0], grounded.instruction_embeddings[grounded.groundings[UNSEEN_LEFT].row])
    chunk = grounded.act({"observation.state": [0.0, 0.0], "task": UNSEEN_LEFT})
    assert chunk.actions.shape == (4, 2)
    assert (
        chunk.info["instruction_grounded_as"]
        == grounded.config.instructions[grounded.groundings[UNSEEN_LEFT].row]
    )


def test_label_tasks_writes_a_labelled_copy_and_relabels_in_place_keeping_files_beside(trained, tmp_path):
    store, ckpt = trained
    run_copy = tmp_path / "run_checkpoint"
    shutil.copytree(ckpt, run_copy)
    with pytest.raises(UserError, match="training state"):  # a run's checkpoint is never rewritten in place
        run(LabelTasksConfig(checkpoint=str(run_copy), dataset=str(store)), None)

    saved = load_checkpoint(ckpt)  # as trained before labels existed: none, grounding off
    unlabelled = tmp_path / "unlabelled"
    config = {**saved.config, "instruction_tasks": [], "instruction_grounding": "none"}
    save_checkpoint(
        unlabelled,
        model_state=saved.model_state,
        config=config,
        normalizer=saved.normalizer,
        step=saved.step,
        kind=saved.kind,
    )
    out = tmp_path / "labelled"
    assert main(["label-tasks", f"checkpoint={unlabelled}", f"dataset={store}", f"out={out}"]) == 0
    assert load_diffusion_policy(unlabelled).config.instruction_tasks == []  # the source is left alone
    labelled = load_diffusion_policy(out)
    assert labelled.config.instruction_grounding == "task"
    assert labelled.config.instruction_tasks == load_diffusion_policy(ckpt).config.instruction_tasks
    assert torch.equal(labelled.model.out.weight, load_diffusion_policy(ckpt).model.out.weight)

    (out / "bac_schedule.json").write_text(json.dumps({"kept": True}))
    assert main(["label-tasks", f"checkpoint={out}", f"dataset={store}", "grounding=none"]) == 0
    assert load_diffusion_policy(out).config.instruction_grounding == "none"
    assert json.loads((out / "bac_schedule.json").read_text()) == {"kept": True}


def test_label_tasks_refuses_what_it_cannot_label(trained, tmp_path):
    _, ckpt = trained
    other = paraphrase_store(tmp_path / "other.zarr", episodes=2, length=4)  # only two of the six paraphrases
    with pytest.raises(UserError, match="never occur in it"):
        run(LabelTasksConfig(checkpoint=str(ckpt), dataset=str(other), out=str(tmp_path / "x")), None)
    with pytest.raises(UserError, match="not CALVIN training paraphrases"):
        run(LabelTasksConfig(checkpoint=str(ckpt), source="calvin", out=str(tmp_path / "y")), None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_shipped_teacher_labels_from_the_sims_paraphrases(tmp_path):
    from dreamrt.policies.shipped import shipped_checkpoint

    out = tmp_path / "teacher"
    run(
        LabelTasksConfig(checkpoint=str(shipped_checkpoint("dpt_state")), source="calvin", out=str(out)), None
    )
    config = load_diffusion_policy(out).config
    assert sorted(set(config.instruction_tasks)) == list(range(34))
    assert (out / "bac_schedule.json").is_file()  # calibrated for the same weights: carried along


def test_a_temperature_per_task_applies_to_the_task_an_instruction_names(trained, tmp_path):
    from dreamrt.policies.diffusion_policy import save_diffusion_policy
    from dreamrt.sim.tasks import task_names

    _, ckpt = trained
    left_task, right_task = task_names()[:2]  # the store's task ids 0 and 1 ("go left", "go right")
    path = str(ckpt)
    policy = load_policy(path, PolicyConfig(path=path, task_noise_scale={left_task: 0.0}))
    seen_left, seen_right = PARAPHRASES["go left"][0], PARAPHRASES["go right"][0]

    def chunk(instruction, seed):
        policy.reset(seed)
        return policy.act({"observation.state": [0.1, -0.2], "task": instruction}).actions

    # DDIM with eta 0 from x_T = 0 is deterministic: the left task's chunks no longer depend on
    # the seed, whether it is named by a training paraphrase or by a wording grounded to it.
    for left in (seen_left, UNSEEN_LEFT):
        assert (chunk(left, 1) == chunk(left, 2)).all()
        assert policy.instruction_noise_scale(left) == 0.0
    assert not (chunk(seen_right, 1) == chunk(seen_right, 2)).all()
    assert policy.instruction_noise_scale(seen_right) == 1.0
    # Without grounding an unseen wording names no task, and keeps the base temperature.
    raw = load_policy(path, PolicyConfig(path=path, grounding="none", task_noise_scale={left_task: 0.0}))
    raw.embed_instructions([UNSEEN_LEFT])
    assert raw.instruction_noise_scale(UNSEEN_LEFT) == 1.0

    # Saved with the checkpoint; the option lays its entries over the saved ones.
    saved = save_diffusion_policy(policy, tmp_path / "tempered")
    both = load_policy(str(saved), PolicyConfig(path=str(saved), task_noise_scale={right_task: 0.5}))
    assert both.sampler_config.task_noise_scale == {left_task: 0.0, right_task: 0.5}
    assert both.instruction_noise_scale(seen_right) == 0.5
    undone = load_policy(str(saved), PolicyConfig(path=str(saved), task_noise_scale={left_task: 1.0}))
    assert undone.instruction_noise_scale(seen_left) == 1.0
    assert (
        load_policy(str(saved), PolicyConfig(path=str(saved), sampler="ddpm")).instruction_noise_scale(
            seen_left
        )
        == 0.0
    )  # kept across a change of sampler

    with pytest.raises(UserError, match="Did you mean 'rotate_red_block_right'"):
        load_policy(path, PolicyConfig(path=path, task_noise_scale={"rotate_red_block_rigth": 0.5}))
    with pytest.raises(UserError, match=r"temperatures in \[0, 1\]"):
        PolicyConfig(path=path, task_noise_scale={left_task: 1.5})
    with pytest.raises(UserError, match="maps task names to temperatures"):
        PolicyConfig(path=path, task_noise_scale=0.5)
    unlabelled = tmp_path / "unlabelled"
    saved_ckpt = load_checkpoint(ckpt)
    save_checkpoint(
        unlabelled,
        model_state=saved_ckpt.model_state,
        config={**saved_ckpt.config, "instruction_tasks": [], "instruction_grounding": "none"},
        normalizer=saved_ckpt.normalizer,
        step=saved_ckpt.step,
        kind=saved_ckpt.kind,
    )
    with pytest.raises(UserError, match="needs the task of each instruction row"):
        load_policy(str(unlabelled), PolicyConfig(path=str(unlabelled), task_noise_scale={left_task: 0.5}))
