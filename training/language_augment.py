"""Paraphrase mixing: train a language policy on the space between a task's paraphrases.

A store annotates each task with a handful of paraphrases, so the instruction table holds a
few points of the sentence encoder's 384-d space per task, and a policy trained on them
learns those points, not the region around them. CALVIN's protocol evaluates with one
held-out instruction per task, which lands in that region but on none of the points; the
shipped state teacher succeeded in 0.70 of 80 single-task episodes when told a training
paraphrase and in 0.26 of the same episodes when told the evaluation instruction
(docs/shipped_checkpoints.md). The held-out instruction is no farther from its task's
paraphrases (mean cosine 0.80) than they are from one another (0.76), so the region between
them is what the policy has to cover.

Each training window's embedding is therefore replaced by ``lam * e_own + (1 - lam) * e_other``
with ``e_other`` a paraphrase of the same task (drawn uniformly from its rows, itself
included) and ``lam ~ U(-extrapolate, 1 + extrapolate)``, plus optional Gaussian noise, then
L2-normalised as the encoder's own embeddings are. Which rows are paraphrases of one task
comes from a store column that names each frame's task (``group_key``; the sim's recordings
carry ``observation.task_id``), never from the strings. Validation and acting see the
table's rows unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dreamrt.errors import UserError


@dataclass
class LanguageAugmentConfig:
    mix: bool = False  # replace each window's instruction embedding by a mix of its task's paraphrases
    # lam ~ U(-extrapolate, 1 + extrapolate): beyond the segment between two paraphrases, since a
    # new wording is not a convex combination of the old ones.
    extrapolate: float = 0.25
    noise: float = 0.0  # std of Gaussian noise per dimension before normalising (unit-norm rows: ~0.05 RMS)
    group_key: str = "observation.task_id"  # store column naming each frame's task

    @property
    def enabled(self) -> bool:
        return self.mix or self.noise > 0

    def __post_init__(self) -> None:
        if not self.extrapolate >= 0:
            raise UserError(f"language_augment.extrapolate={self.extrapolate!r}; expected >= 0.")
        if not self.noise >= 0:
            raise UserError(f"language_augment.noise={self.noise!r}; expected >= 0.")


def paraphrase_groups(task_index: np.ndarray, task_ids: np.ndarray, num_rows: int) -> np.ndarray:
    """(num_rows,) group per instruction row: the task id its frames carry (rows no frame uses, or
    whose frames disagree, form groups of their own, so they are never mixed with another task)."""
    task_index = np.asarray(task_index, dtype=np.int64).reshape(-1)
    task_ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
    if task_index.shape != task_ids.shape:
        raise UserError(f"task_index has {task_index.size} frames but the group column has {task_ids.size}.")
    pairs = np.unique(np.stack([task_index, task_ids], axis=1), axis=0)
    rows, counts = np.unique(pairs[:, 0], return_counts=True)
    groups = -1 - np.arange(num_rows, dtype=np.int64)  # a group of its own by default (negative ids)
    unambiguous = set(rows[counts == 1].tolist())
    for row, task in pairs:
        if row in unambiguous and 0 <= row < num_rows:
            groups[row] = task
    return groups


class ParaphraseMixer:
    """``mixer(table, rows) -> (B, 384)``: mixed, renormalised embeddings for table rows ``rows`` (B,)."""

    def __init__(self, groups: np.ndarray, cfg: LanguageAugmentConfig):
        self.cfg = cfg
        groups = np.asarray(groups, dtype=np.int64)
        _, dense = np.unique(groups, return_inverse=True)
        num_groups = int(dense.max()) + 1 if dense.size else 0
        members = [np.flatnonzero(dense == g) for g in range(num_groups)]
        width = max((len(m) for m in members), default=1)
        padded = np.zeros((num_groups, width), dtype=np.int64)
        for g, m in enumerate(members):
            padded[g, : len(m)] = m
        self.group_of_row = torch.as_tensor(dense)  # (N,)
        self.members = torch.as_tensor(padded)  # (G, M), each group's rows, zero-padded
        self.group_size = torch.as_tensor([len(m) for m in members])  # (G,)

    def __call__(self, table: Tensor, rows: Tensor) -> Tensor:
        device = table.device
        if self.members.device != device:
            self.group_of_row = self.group_of_row.to(device)
            self.members = self.members.to(device)
            self.group_size = self.group_size.to(device)
        group = self.group_of_row[rows]  # (B,)
        pick = (torch.rand(rows.shape, device=device) * self.group_size[group]).long()
        partner = self.members[group, pick]  # (B,)
        spread = self.cfg.extrapolate
        lam = torch.empty(rows.shape + (1,), device=device).uniform_(-spread, 1.0 + spread)
        mixed = lam * table[rows] + (1.0 - lam) * table[partner]
        if self.cfg.noise > 0:
            mixed = mixed + self.cfg.noise * torch.randn_like(mixed)
        return F.normalize(mixed, dim=-1)


def paraphrase_mixer(
    store: Any,
    cfg: LanguageAugmentConfig,
    num_rows: int,
    use_language: bool,
    task_index_map: np.ndarray | None = None,
) -> ParaphraseMixer:
    """The ParaphraseMixer for a policy's ``num_rows`` instruction rows, grouped by ``store``'s
    ``cfg.group_key`` column. ``task_index_map`` maps the store's task indices to the policy's
    rows when they differ (a student distilled on another recording of the teacher's tasks)."""
    if not use_language:
        raise UserError(
            "language_augment perturbs instruction embeddings, but this policy reads no language "
            "(policy_model.encoder.use_language=false). Drop language_augment or turn language on."
        )
    if not cfg.mix:  # noise alone: every row is a group of its own
        return ParaphraseMixer(-1 - np.arange(num_rows), cfg)
    if cfg.group_key not in store.keys:
        raise UserError(
            f"language_augment.group_key={cfg.group_key!r} is not a column of {store.path}; it must name each "
            f"frame's task so that only paraphrases of one task are mixed. The store has {store.user_keys}."
        )
    rows = np.asarray(store.read("task_index"), dtype=np.int64)
    if task_index_map is not None:
        rows = np.asarray(task_index_map, dtype=np.int64)[rows]
    return ParaphraseMixer(paraphrase_groups(rows, store.read(cfg.group_key), num_rows), cfg)
