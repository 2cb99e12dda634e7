"""Instruction grounding: read an unseen wording as one of the tasks the policy was trained on.

A language policy's instruction table holds a few sentence-encoder embeddings per task (the
paraphrases its training store was annotated with), and the network has learnt those points,
not the space around them. Told a wording it has never seen, it acts on an embedding it was
never trained at. MiniLM's mean-pooled embedding also weighs the words that tell tasks apart
least: "take the red block and rotate it to the left" is nearer "rotate the red block to the
right" (cosine 0.96) than "... to the left" (0.95), so the nearest paraphrase is often another
task's (7 of CALVIN's 34 held-out instructions).

Grounding instead fits a linear classifier from embedding to task on the table's own rows
(each row labelled with its task, ``DiffusionPolicyConfig.instruction_tasks``), which learns
which directions of the space separate the tasks, then hands the network the embedding of the
predicted task's nearest paraphrase: a point it was trained at. Only the table is used to fit
it, so a held-out instruction stays held out. Fitting is full-batch and starts from zeros, so
the same table always gives the same classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dreamrt.errors import UserError

GROUNDING_MODES = ("none", "task")

# Chosen by leave-one-paraphrase-out cross-validation on the CALVIN table (204 rows, 34 tasks,
# six paraphrases each; each paraphrase slot held out in turn): weight decay 0, 1e-3 and 1e-2
# classified 175, 180 and 183 of the 204 held-out paraphrases. The evaluation instructions took
# no part in the choice.
_LOGIT_SCALE = 10.0  # unit-norm embeddings: cosines in [-1, 1] need a gain for confident logits
_WEIGHT_DECAY = 1e-2
_STEPS = 500
_LR = 1e-2


@dataclass(frozen=True)
class Grounding:
    """What one instruction was read as: the table ``row`` handed to the network, its ``task``
    label and the classifier's ``confidence`` in that task (softmax probability)."""

    row: int
    task: int
    confidence: float


class InstructionGrounder:
    """``grounder(embeddings (B, 384)) -> list[Grounding]`` over an instruction table."""

    def __init__(self, table: Tensor, tasks: list[int] | np.ndarray):
        table = F.normalize(torch.as_tensor(table, dtype=torch.float32).detach().cpu(), dim=-1)
        labels = np.asarray(tasks, dtype=np.int64).reshape(-1)
        if table.ndim != 2 or len(labels) != table.shape[0]:
            raise UserError(
                f"Instruction grounding needs one task label per table row; got {len(labels)} labels for a table "
                f"of shape {tuple(table.shape)}."
            )
        if len(labels) == 0:
            raise UserError("Instruction grounding needs a non-empty instruction table.")
        self.table = table
        self.task_ids, dense = np.unique(labels, return_inverse=True)
        self.row_class = torch.as_tensor(dense)  # (N,) class index of each row
        self.weight, self.bias = _fit_linear_classifier(table, self.row_class, len(self.task_ids))

    def __call__(self, embeddings: Tensor) -> list[Grounding]:
        queries = F.normalize(torch.as_tensor(embeddings, dtype=torch.float32).detach().cpu(), dim=-1)
        probs = torch.softmax(_LOGIT_SCALE * queries @ self.weight + self.bias, dim=-1)  # (B, C)
        confidence, cls = probs.max(dim=-1)
        similarity = queries @ self.table.T  # (B, N)
        out_of_class = self.row_class[None, :] != cls[:, None]
        rows = similarity.masked_fill(out_of_class, -2.0).argmax(dim=-1)  # nearest paraphrase of that task
        return [
            Grounding(row=int(r), task=int(self.task_ids[c]), confidence=float(p))
            for r, c, p in zip(rows, cls, confidence)
        ]


def _fit_linear_classifier(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, full batch, zero start: deterministic for a given table."""
    # Built lazily while the policy acts, i.e. under inference_mode, whose tensors autograd
    # refuses: the fit runs outside it on copies.
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.clone()
        weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=_LR, weight_decay=_WEIGHT_DECAY)
        for _ in range(_STEPS):
            loss = F.cross_entropy(_LOGIT_SCALE * x @ weight + bias, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return weight.detach(), bias.detach()
