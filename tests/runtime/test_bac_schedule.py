"""BAC's Adaptive Caching Scheduler (against brute force) and Bubbling Union (a worked example)."""

import itertools

import numpy as np
import pytest

from dreamrt.errors import UserError
from dreamrt.runtime.bac_schedule import (
    SchedulerConfig,
    adaptive_schedule,
    bubbling_union,
    schedule_block,
    schedule_cost,
    segment_costs,
    uniform_update_steps,
    volatility,
)


def _brute_force(error: np.ndarray, m: int, last: bool) -> float:
    k = error.shape[0]
    costs = []
    for rest in itertools.combinations(range(1, k), m - 1):
        steps = (0, *rest)
        if last and k > 1 and steps[-1] != k - 1:
            continue
        costs.append(schedule_cost(error, steps))
    return min(costs)


def _cosine_errors(features: np.ndarray) -> np.ndarray:
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    return 1.0 - unit @ unit.T


@pytest.mark.parametrize("last", [False, True])
def test_scheduler_matches_brute_force(last):
    rng = np.random.default_rng(0)
    checked = 0
    for k in range(1, 11):
        for m in range(1, k + 1):
            if last and k > 1 and m < 2:
                continue
            for trial in range(3):
                if trial == 0:  # a realistic matrix: cosine errors of a random walk of features
                    error = _cosine_errors(np.cumsum(rng.normal(size=(k, 6)), axis=0) + 3.0)
                else:  # arbitrary non-negative, asymmetric errors
                    error = rng.random((k, k)) * (rng.random((k, k)) < 0.7)
                steps = schedule_block(error, m, always_update_last=last)
                assert len(steps) == m and steps[0] == 0 and list(steps) == sorted(set(steps))
                if last and k > 1:
                    assert steps[-1] == k - 1
                assert schedule_cost(error, steps) == pytest.approx(_brute_force(error, m, last), abs=1e-12)
                checked += 1
    assert checked >= 130  # every (K, M) pair for K <= 10, three matrices each


def test_scheduler_finds_the_change_points():
    # A block whose output is constant on [0, 3), [3, 7), [7, 10): three updates at the change
    # points serve every step exactly; any other three cost something.
    levels = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 4 + [[1.0, 1.0]] * 3)
    error = _cosine_errors(levels)
    assert schedule_block(error, 3, always_update_last=False) == (0, 3, 7)
    assert schedule_cost(error, (0, 3, 7)) == pytest.approx(0.0, abs=1e-12)
    assert schedule_block(error, 4, always_update_last=True)[-1] == 9
    assert set(schedule_block(error, 4, always_update_last=True)) == {0, 3, 7, 9}


def test_segment_costs():
    error = np.arange(16.0).reshape(4, 4)
    costs = segment_costs(error)
    assert costs[1, 3] == error[1, 1] + error[1, 2] + error[1, 3]
    assert costs[2, 2] == error[2, 2]
    assert np.isinf(costs[3, 0]) and np.isinf(costs[2, 1])


def test_bubbling_union_worked_example():
    # Execution order: L0 self, L0 cross, L0 ffn, L1 self, L1 cross, L1 ffn.
    steps = [(0, 5), (0, 3), (0, 2, 7), (0, 4), (0, 1), (0, 6, 8)]
    ffn = [False, False, True, False, False, True]
    scores = [0.9, 0.1, 0.5, 0.95, 0.2, 0.3]  # picks block 3 (L1 self) then 0 (L0 self)
    result, picked = bubbling_union(steps, ffn, scores, top_n=2)
    assert picked == [3, 0]
    assert result == [
        (0, 2, 5, 6, 7, 8),  # L0 self + L0 ffn + L1 ffn
        (0, 3),
        (0, 2, 7),
        (0, 4, 6, 8),  # L1 self + L1 ffn
        (0, 1),
        (0, 6, 8),
    ]
    # An FFN picked itself takes only the FFNs after it; the last FFN has none.
    result, picked = bubbling_union(steps, ffn, [0, 0, 1.0, 0, 0, 0.9], top_n=2)
    assert picked == [2, 5]
    assert result[2] == (0, 2, 6, 7, 8) and result[5] == (0, 6, 8)
    assert bubbling_union(steps, ffn, scores, top_n=0)[0] == [tuple(s) for s in steps]
    with pytest.raises(UserError, match="one entry per block"):
        bubbling_union(steps, ffn[:-1], scores, top_n=1)


def test_volatility_is_the_mean_pairwise_l1():
    feats = np.array([[0.0, 0.0], [1.0, 3.0], [2.0, 2.0]])  # one block, three steps
    l1 = np.abs(feats[:, None] - feats[None]).mean(-1)[None]  # (1, 3, 3)
    assert volatility(l1)[0] == pytest.approx(l1.sum() / 9)


def test_adaptive_schedule_end_to_end():
    rng = np.random.default_rng(1)
    k, names = 12, ["a0", "c0", "f0", "a1", "c1", "f1"]
    feats = np.cumsum(rng.normal(size=(len(names), k, 8)), axis=1) + 2.0  # (N, K, F)
    feats[3] *= 10.0  # the most volatile block
    errors = np.stack([_cosine_errors(f) for f in feats])
    l1 = np.abs(feats[:, :, None] - feats[:, None]).mean(-1)
    ffn = [n.startswith("f") for n in names]
    config = SchedulerConfig(num_updates=4, bubble_top_n=1)
    steps, picked = adaptive_schedule(errors, l1, ffn, config)
    plain = [schedule_block(e, 4) for e in errors]
    assert picked == [3]
    assert steps[3] == tuple(sorted(set(plain[3]) | set(plain[5])))
    assert [s for i, s in enumerate(steps) if i != 3] == [s for i, s in enumerate(plain) if i != 3]
    steps, picked = adaptive_schedule(errors, l1, ffn, SchedulerConfig(num_updates=4, bubble_top_n=0))
    assert steps == plain and picked == []


def test_config_and_budget_errors():
    with pytest.raises(UserError, match="Did you mean 'cosine'"):
        SchedulerConfig(metric="cosin")
    with pytest.raises(UserError, match="positive integer"):
        SchedulerConfig(num_updates=0)
    with pytest.raises(UserError, match="bubble_top_n"):
        SchedulerConfig(bubble_top_n=-1)
    with pytest.raises(UserError, match=r"does not fit a 10-step sampler.*\[2, 10\]"):
        schedule_block(np.zeros((10, 10)), 1, always_update_last=True)
    with pytest.raises(UserError, match=r"\[1, 10\]"):
        schedule_block(np.zeros((10, 10)), 11, always_update_last=False)
    with pytest.raises(UserError, match="square"):
        schedule_block(np.zeros((3, 4)), 2)
    assert schedule_block(np.zeros((1, 1)), 1) == (0,)


def test_uniform_steps():
    assert uniform_update_steps(10, 3) == (0, 3, 6, 9)
    assert uniform_update_steps(100, 10) == tuple(range(0, 100, 10))
    assert uniform_update_steps(5, 1) == (0, 1, 2, 3, 4)
    with pytest.raises(UserError, match="every >= 1"):
        uniform_update_steps(10, 0)
