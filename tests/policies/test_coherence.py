"""Backward coherence: the weighted distance of candidate chunks to the previous plan, and the pick."""

import pytest
import torch

from dreamrt.policies.coherence import COHERENCE_DECAY, coherence_costs, pick_coherent


def test_costs_compare_the_executed_steps_with_the_previous_plan_shifted_and_decayed():
    h, a = 6, 2
    previous = torch.arange(h * a, dtype=torch.float32).reshape(h, a)
    shift, first = 2, 1
    exact = torch.zeros(h, a)
    exact[: h - shift] = previous[shift:]  # continues the previous plan on every shared step
    off = exact.clone()
    off[first] += torch.tensor([3.0, 4.0])  # 5 away on the first executed step (weight 1)
    late = exact.clone()
    late[first + 2] += torch.tensor([3.0, 4.0])  # the same, two steps later (weight decay^2)
    beyond = exact.clone()
    beyond[h - shift :] += 100.0  # steps the previous plan never predicted do not count
    before = exact.clone()
    before[0] += 100.0  # nor does the step before the executed part (To - 1 = first)
    costs = coherence_costs(torch.stack([exact, off, late, beyond, before]), previous, shift, first)
    torch.testing.assert_close(costs, torch.tensor([0.0, 5.0, 5.0 * COHERENCE_DECAY**2, 0.0, 0.0]))
    assert pick_coherent(torch.stack([off, late, exact]), previous, shift, first) == 2


def test_nothing_to_be_coherent_with_picks_the_first_sample():
    candidates = torch.randn(3, 6, 2)
    assert pick_coherent(candidates, None, 2, 1) == 0
    previous = torch.randn(6, 2)
    assert coherence_costs(candidates, previous, shift=5, first=1) is None  # no shared executed step
    assert pick_coherent(candidates, previous, 5, 1) == 0
    with pytest.raises(ValueError, match="shape"):
        coherence_costs(candidates, torch.randn(5, 2), 1, 1)
