"""Instruction grounding: an unseen wording read as one of the table's tasks."""

import pytest
import torch
import torch.nn.functional as F

from dreamrt.errors import UserError
from dreamrt.policies.grounding import InstructionGrounder
from dreamrt.policies.language import SentenceEncoder


def test_a_query_grounds_to_its_task_and_that_tasks_nearest_row():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 384, generator=g), dim=-1)
    table = F.normalize(centres.repeat_interleave(4, 0) + 0.05 * torch.randn(12, 384, generator=g), dim=-1)
    labels = [7, 7, 7, 7, 2, 2, 2, 2, 9, 9, 9, 9]  # any ints name the tasks
    grounder = InstructionGrounder(table, labels)
    queries = F.normalize(table[[1, 6, 11]] + 0.02 * torch.randn(3, 384, generator=g), dim=-1)
    got = grounder(queries)
    assert [r.row for r in got] == [1, 6, 11]
    assert [r.task for r in got] == [7, 2, 9]
    assert all(0.5 < r.confidence <= 1.0 for r in got)
    with torch.inference_mode():  # as when a policy first meets a new wording while acting
        again = InstructionGrounder(table.clone(), labels)
        assert [r.row for r in again(queries)] == [1, 6, 11]
    assert torch.equal(again.weight, grounder.weight) and torch.equal(again.bias, grounder.bias)  # from zeros


def test_labels_must_match_the_table():
    table = F.normalize(torch.randn(4, 384), dim=-1)
    with pytest.raises(UserError, match="one task label per table row"):
        InstructionGrounder(table, [0, 0, 1])
    with pytest.raises(UserError, match="non-empty"):
        InstructionGrounder(torch.zeros(0, 384), [])


def test_grounding_reads_the_task_where_the_nearest_paraphrase_is_the_other_task():
    # MiniLM weighs "left" and "right" lightly: the nearest paraphrase of this wording is "head
    # right"; a classifier fitted on the six paraphrases reads it as the left task.
    paraphrases = ["go left", "move to the left", "head left", "go right", "move to the right", "head right"]
    encoder = SentenceEncoder()
    table = encoder.encode(paraphrases)
    query = encoder.encode(["head towards the left side"])
    assert paraphrases[int((query @ table.T).argmax())] == "head right"
    (grounding,) = InstructionGrounder(table, [0, 0, 0, 1, 1, 1])(query)
    assert grounding.task == 0 and paraphrases[grounding.row] in paraphrases[:3]
