"""Instruction grounding: read an unseen wording as one of the tasks the policy was trained on.

A language policy's instruction table holds a few sentence-encoder embeddings per task (the
paraphrases its training store was annotated with), and the network has learnt those points,
not the space around them. Told a wording it has never seen, it acts on an embedding it was
never trained at. MiniLM's mean-pooled embedding also weighs the words that tell tasks apart
least: "take the red block and rotate it to the left" is nearer "rotate the red block to the
right" (cosine 0.96) than "... to the left" (0.95), so the nearest paraphrase is often another
task's (7 of CALVIN's 34 held-out instructions).

Grounding instead fits a linear classifier to task on the table's own rows (each row labelled
with its task, ``DiffusionPolicyConfig.instruction_tasks``), which learns which directions
separate the tasks, then hands the network the embedding of the predicted task's nearest
paraphrase: a point it was trained at. The classifier reads two views of each wording, each
centred on the table's mean and scaled to unit length (the word view to 0.75): the sentence
embedding, and the mean of its words' embeddings before attention
(``SentenceEncoder.word_features``), which keeps "left" apart from "right" where the sentence
embedding lets the context outweigh them. Only the table
is used to fit it, so a held-out instruction stays held out. Fitting is full-batch and starts
from zeros, so the same table always gives the same classifier.
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
# six paraphrases each; each paraphrase slot held out in turn), the evaluation instructions taking
# no part. Sentence embedding alone: weight decay 0, 1e-3 and 1e-2 classified 175, 180 and 183 of
# the 204 held-out paraphrases (log-loss 0.64 at 1e-2). With a second view, the mean pool after
# MiniLM's embedding layer or after any of its six layers, weighted 0.5-1.5 against the sentence
# view: 171-185 right, and every weight of the embedding layer's pool (these word features) beat
# every other layer on log-loss, the least at weight 0.75 (0.48, 184 right). Held-out accuracy
# moves by a few of 204 between settings, within noise; the log-loss separates them.
_WORD_VIEW_WEIGHT = 0.75
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
    """``grounder(embeddings (B, 384), words (B, 384)) -> list[Grounding]`` over an instruction table.

    ``table`` holds the rows' sentence embeddings and ``table_words`` their word features
    (:meth:`SentenceEncoder.word_features`), both from the same sentence encoder as the queries'.
    """

    def __init__(self, table: Tensor, tasks: list[int] | np.ndarray, table_words: Tensor):
        table = F.normalize(_as_cpu(table), dim=-1)
        table_words = _as_cpu(table_words)
        labels = np.asarray(tasks, dtype=np.int64).reshape(-1)
        if table.ndim != 2 or len(labels) != table.shape[0]:
            raise UserError(
                f"Instruction grounding needs one task label per table row; got {len(labels)} labels for a table "
                f"of shape {tuple(table.shape)}."
            )
        if len(labels) == 0:
            raise UserError("Instruction grounding needs a non-empty instruction table.")
        if table_words.shape != table.shape:
            raise UserError(
                f"Instruction grounding needs the word features of each table row: got shape "
                f"{tuple(table_words.shape)} for a table of shape {tuple(table.shape)}."
            )
        self.table = table
        # Centred on the table: what all instructions share (MiniLM's embeddings sit in a narrow
        # cone) says nothing about which task one names, and would swamp the view's direction.
        self.centre, self.centre_words = table.mean(0), table_words.mean(0)
        self.task_ids, dense = np.unique(labels, return_inverse=True)
        self.row_class = torch.as_tensor(dense)  # (N,) class index of each row
        features = self._features(table, table_words)
        self.weight, self.bias = _fit_linear_classifier(features, self.row_class, len(self.task_ids))

    def __call__(self, embeddings: Tensor, words: Tensor) -> list[Grounding]:
        queries = F.normalize(_as_cpu(embeddings), dim=-1)
        features = self._features(queries, _as_cpu(words))
        probs = torch.softmax(_LOGIT_SCALE * features @ self.weight + self.bias, dim=-1)  # (B, C)
        confidence, cls = probs.max(dim=-1)
        similarity = queries @ self.table.T  # (B, N)
        out_of_class = self.row_class[None, :] != cls[:, None]
        rows = similarity.masked_fill(out_of_class, -2.0).argmax(dim=-1)  # nearest paraphrase of that task
        return [
            Grounding(row=int(r), task=int(self.task_ids[c]), confidence=float(p))
            for r, c, p in zip(rows, cls, confidence)
        ]

    def _features(self, embeddings: Tensor, words: Tensor) -> Tensor:
        views = (
            F.normalize(embeddings - self.centre, dim=-1),
            _WORD_VIEW_WEIGHT * F.normalize(words - self.centre_words, dim=-1),
        )
        return F.normalize(torch.cat(views, dim=-1), dim=-1)


def _as_cpu(x: Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float32).detach().cpu()


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
