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
    words = torch.randn(12, 384, generator=g)  # a view that says nothing of the task
    grounder = InstructionGrounder(table, labels, words)
    queries = F.normalize(table[[1, 6, 11]] + 0.02 * torch.randn(3, 384, generator=g), dim=-1)
    got = grounder(queries, words[[1, 6, 11]])
    assert [r.row for r in got] == [1, 6, 11]
    assert [r.task for r in got] == [7, 2, 9]
    assert all(0.5 < r.confidence <= 1.0 for r in got)
    with torch.inference_mode():  # as when a policy first meets a new wording while acting
        again = InstructionGrounder(table.clone(), labels, words.clone())
        assert [r.row for r in again(queries, words[[1, 6, 11]])] == [1, 6, 11]
    assert torch.equal(again.weight, grounder.weight) and torch.equal(again.bias, grounder.bias)  # from zeros


def test_labels_and_word_features_must_match_the_table():
    table = F.normalize(torch.randn(4, 384), dim=-1)
    with pytest.raises(UserError, match="one task label per table row"):
        InstructionGrounder(table, [0, 0, 1], torch.randn(4, 384))
    with pytest.raises(UserError, match="non-empty"):
        InstructionGrounder(torch.zeros(0, 384), [], torch.zeros(0, 384))
    with pytest.raises(UserError, match="word features of each table row"):
        InstructionGrounder(table, [0, 0, 1, 1], torch.randn(3, 384))


def test_grounding_reads_the_task_where_the_nearest_paraphrase_is_the_other_task():
    # MiniLM weighs "left" and "right" lightly: the nearest paraphrase of this wording is "head
    # right"; a classifier fitted on the six paraphrases reads it as the left task.
    paraphrases = ["go left", "move to the left", "head left", "go right", "move to the right", "head right"]
    encoder = SentenceEncoder()
    table = encoder.encode(paraphrases)
    query = encoder.encode(["head towards the left side"])
    assert paraphrases[int((query @ table.T).argmax())] == "head right"
    grounder = InstructionGrounder(table, [0, 0, 0, 1, 1, 1], encoder.word_features(paraphrases))
    (grounding,) = grounder(query, encoder.word_features(["head towards the left side"]))
    assert grounding.task == 0 and paraphrases[grounding.row] in paraphrases[:3]


def test_the_word_view_reads_a_left_rotation_that_the_sentence_embedding_reads_as_right():
    # CALVIN's held-out wording of the left rotation: MiniLM's sentence embedding puts it nearer
    # the right rotation's paraphrases, and a classifier on that embedding alone (the word view
    # made uninformative here) follows it; the words themselves say "left".
    from dreamrt.sim.language import eval_instruction, train_instructions

    tasks = ["rotate_red_block_right", "rotate_red_block_left", "push_red_block_right", "push_red_block_left"]
    paraphrases = [p for t in tasks for p in train_instructions(t)]
    labels = [i for i, t in enumerate(tasks) for _ in train_instructions(t)]
    encoder = SentenceEncoder()
    table, words = encoder.encode(paraphrases), encoder.word_features(paraphrases)
    query = [eval_instruction("rotate_red_block_left")]
    (with_words,) = InstructionGrounder(table, labels, words)(
        encoder.encode(query), encoder.word_features(query)
    )
    assert tasks[with_words.task] == "rotate_red_block_left"
    assert paraphrases[with_words.row] in train_instructions("rotate_red_block_left")
    blank = torch.zeros_like(words)
    (sentence_only,) = InstructionGrounder(table, labels, blank)(encoder.encode(query), blank[:1])
    assert tasks[sentence_only.task] == "rotate_red_block_right"


def test_word_features_are_the_mean_of_the_token_embeddings_before_attention():
    encoder = SentenceEncoder()
    words = encoder.word_features(["go left", "go  left ", "go right"])
    assert words.shape == (3, 384)
    assert torch.equal(words[0], words[1])  # whitespace does not change the tokens
    assert not torch.allclose(words[0], words[2])
    with pytest.raises(UserError, match="list of strings"):
        encoder.word_features("go left")
