"""`dreamrt label-tasks`: tell a language policy which task each of its instructions names.

Instruction grounding (:mod:`dreamrt.policies.grounding`) reads an unseen wording as one of the
policy's tasks, and for that it needs each row of the instruction table labelled with its task.
`dreamrt train` records the labels when its store has a column naming each frame's task (the
sim's recordings carry ``observation.task_id``); this command adds them to a checkpoint trained
before that, from a store annotated with the same instructions (``dataset=STORE``) or, for a
policy trained on the sim's recordings, from the sim's own table of CALVIN paraphrases
(``source=calvin``), and can switch grounding on.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult

DEFAULT_TASK_KEY = "observation.task_id"
LABEL_SOURCES = ("dataset", "calvin")


@dataclass
class LabelTasksConfig:
    checkpoint: str = ""  # the checkpoint to label (a directory, or shipped:<name>)
    source: str = "dataset"  # dataset: from the store `dataset`; calvin: from dreamrt.sim.language
    dataset: str = ""  # an episode store annotated with the policy's instructions
    task_key: str = DEFAULT_TASK_KEY  # the store column naming each frame's task
    grounding: str = "task"  # the instruction_grounding the labelled checkpoint loads with
    out: str | None = None  # where to write the labelled checkpoint; null: in place

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise UserError("label-tasks needs checkpoint=CKPT, the checkpoint to label.")
        choose("source", self.source, LABEL_SOURCES)
        if self.source == "dataset" and not self.dataset:
            raise UserError(
                "label-tasks needs dataset=STORE, a store annotated with the policy's instructions (or "
                "source=calvin for a policy trained on the sim's recordings)."
            )
        from dreamrt.policies.grounding import GROUNDING_MODES

        choose("grounding", self.grounding, GROUNDING_MODES)


def instruction_task_labels(
    store: Any, instructions: list[str], task_key: str = DEFAULT_TASK_KEY
) -> list[int]:
    """The task id of each of ``instructions``, from the frames of ``store`` that carry it.

    Raises when the store lacks ``task_key``, when an instruction never occurs in it, or when
    its frames name more than one task (the store's task list is not the policy's)."""
    from dreamrt.policies.language import normalize_instruction

    if task_key not in store.keys:
        raise UserError(
            f"{store.path} has no column '{task_key}' naming each frame's task; it has {store.user_keys}. "
            "Pass task_key=COLUMN, or label from a store recorded by `dreamrt record`."
        )
    frame_rows = np.asarray(store.read("task_index"), dtype=np.int64).reshape(-1)
    frame_tasks = np.asarray(store.read(task_key), dtype=np.int64).reshape(-1)
    pairs = np.unique(np.stack([frame_rows, frame_tasks], axis=1), axis=0)
    tasks_of_row: dict[str, set[int]] = {}
    for row, task in pairs:
        text = normalize_instruction(store.tasks[int(row)])
        tasks_of_row.setdefault(text, set()).add(int(task))
    labels, missing, ambiguous = [], [], []
    for text in instructions:
        found = tasks_of_row.get(normalize_instruction(text), set())
        if len(found) != 1:
            (missing if not found else ambiguous).append(text)
            continue
        labels.append(next(iter(found)))
    if missing or ambiguous:
        raise UserError(
            f"Cannot label the policy's instructions from {store.path}: "
            + (f"{len(missing)} never occur in it (e.g. {missing[:3]}); " if missing else "")
            + (f"{len(ambiguous)} name several tasks there (e.g. {ambiguous[:3]}); " if ambiguous else "")
            + "label from the store the policy was trained on."
        )
    return labels


def calvin_task_labels(instructions: list[str]) -> list[int]:
    """The task id (index in ``task_names()``, as `dreamrt record` writes ``observation.task_id``)
    of each of ``instructions``, looked up among the sim's training paraphrases."""
    from dreamrt.policies.language import normalize_instruction
    from dreamrt.sim.language import train_instructions
    from dreamrt.sim.tasks import task_names

    task_of = {
        normalize_instruction(text): i
        for i, task in enumerate(task_names())
        for text in train_instructions(task)
    }
    unknown = [t for t in instructions if normalize_instruction(t) not in task_of]
    if unknown:
        raise UserError(
            f"{len(unknown)} of the policy's instructions are not CALVIN training paraphrases of this version of "
            f"dreamrt.sim.language (e.g. {unknown[:3]}); label from the store it was trained on: dataset=STORE."
        )
    return [task_of[normalize_instruction(t)] for t in instructions]


def run(cfg: LabelTasksConfig, out_dir: Path | None) -> JobResult:
    from dreamrt.episodes.reader import open_store
    from dreamrt.policies.diffusion_policy import POLICY_KIND, DiffusionPolicyConfig
    from dreamrt.policies.shipped import resolve_policy_path
    from dreamrt.training.checkpoint import META_FILE, config_from_dict, load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(resolve_policy_path(cfg.checkpoint), kind=POLICY_KIND)
    if not ckpt.config.get("instructions"):
        raise UserError(
            f"{ckpt.path} lists no instructions: it is not a language policy, so there is nothing to label."
        )
    if cfg.source == "calvin":
        labels = calvin_task_labels(ckpt.config["instructions"])
    else:
        labels = instruction_task_labels(open_store(cfg.dataset), ckpt.config["instructions"], cfg.task_key)
    config = {**ckpt.config, "instruction_tasks": labels, "instruction_grounding": cfg.grounding}
    config_from_dict(
        DiffusionPolicyConfig, config, source="the labelled config"
    )  # refuse what would not load

    target = Path(cfg.out) if cfg.out else ckpt.path
    in_place = target.resolve() == ckpt.path.resolve()
    if in_place and (ckpt.path / "training_state").exists():
        raise UserError(
            f"{ckpt.path} holds a training state (it is a run's checkpoint), which a labelled copy does not keep. "
            "Write the labelled policy elsewhere: out=DIR."
        )
    if not in_place and target.exists():
        raise UserError(f"out={target} already exists; choose a new directory.")
    # Files beside the checkpoint's own (bac_schedule.json, an onnx export) depend on the
    # weights, not on the labels: they go with it.
    beside = [p for p in ckpt.path.iterdir() if p.name != META_FILE and p.name not in ckpt.meta.files]
    stash = ckpt.path.parent / f".label-tasks-{uuid.uuid4().hex[:12]}"
    stash.mkdir()
    saved = False
    try:
        for p in beside:
            (shutil.move if in_place else _copy)(str(p), str(stash / p.name))
        save_checkpoint(
            target,
            model_state=ckpt.model_state,
            config=config,
            normalizer=ckpt.normalizer,
            step=ckpt.step,
            kind=POLICY_KIND,
            overwrite=in_place,
        )
        saved = True
    finally:
        # In place, the stashed files return whether or not the save went through (it is atomic:
        # a failed one leaves the old checkpoint); copies go only to a checkpoint that was written.
        if in_place or saved:
            for p in stash.iterdir():
                shutil.move(str(p), str(target / p.name))
        shutil.rmtree(stash, ignore_errors=True)
    summary = {
        "checkpoint": str(target),
        "instructions": len(labels),
        "tasks": len(set(labels)),
        "instruction_grounding": cfg.grounding,
    }
    print(
        f"labelled {len(labels)} instructions of {len(set(labels))} tasks; grounding={cfg.grounding}: {target}"
    )
    return JobResult(summary=summary)


def _copy(src: str, dst: str) -> None:
    (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, dst)
