"""Which sampler steps recompute which sub-block: BAC's Adaptive Caching Scheduler and Bubbling Union.

BAC (Block-wise Adaptive Caching, Ji et al. 2025) caches the residual of every transformer
sub-block (self-attention, cross-attention, FFN) across the steps of a diffusion sampler and
recomputes a block only at its *update steps*; in between, ``x = x + cache[block]``. This
module chooses the update steps offline from calibration statistics. It is numpy only:
:mod:`dreamrt.runtime.bac_calibrate` records the statistics, :mod:`dreamrt.runtime.bac`
applies the result.

Dimensions: K sampler steps (step 0 is the first, noisiest one), N sub-blocks, M update
steps per block (the budget).

Adaptive Caching Scheduler (per block). ``error[a, t]`` is the error of standing in for the
block's output at step t with the output cached at step a (``1 - cosine`` similarity by
default). Update steps u_1 = 0 < u_2 < ... < u_M cut the steps into M runs; run m serves
steps u_m .. u_{m+1} - 1 from the cache filled at u_m, so a schedule costs

    cost(U) = sum_m sum_{t = u_m}^{u_{m+1} - 1} error[u_m, t]

and a dynamic program over (runs used, last step covered) finds the cheapest M-subset
exactly in O(M K^2):

    C[a, b] = sum_{t=a..b} error[a, t]                       (one run from a to b)
    dp[1, i] = C[0, i];   dp[m, i] = min_j dp[m-1, j] + C[j+1, i]

with the answer at dp[M, K-1]. With a similarity S this is the paper's maximisation of
sum S (error = 1 - S and the runs cover every step once). ``always_update_last`` keeps the
final step, the one that produces the clean sample, an update step inside the same budget
(the last run is then that single step).

Bubbling Union. A stale upstream residual enters every later block, and the FFNs pass it on
unnormalised. The top-n blocks by volatility (mean L1 distance between their outputs over
all step pairs) are refreshed whenever any FFN after them in execution order refreshes:
their update steps become the union of their own and those FFNs'. Applied once, on the
scheduler's output, so selected blocks end up with more than M updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dreamrt.errors import UserError, choose

# What error[a, t] measures between the block outputs at steps a and t (flattened):
# "cosine": 1 - cosine similarity (the paper's default); "l1": mean absolute difference;
# "l2": root-mean-square difference.
METRICS = ("cosine", "l1", "l2")


@dataclass(frozen=True)
class SchedulerConfig:
    num_updates: int = 10  # M: update steps per block before Bubbling Union, step 0 included
    metric: str = "cosine"  # one of METRICS
    bubble_top_n: int = 3  # blocks Bubbling Union refreshes with downstream FFNs (0: off)
    always_update_last: bool = True  # the final step, which yields the clean sample, is an update step

    def __post_init__(self) -> None:
        if (
            not isinstance(self.num_updates, int)
            or isinstance(self.num_updates, bool)
            or self.num_updates < 1
        ):
            raise UserError(
                f"The BAC budget num_updates must be a positive integer (update steps per block, step 0 "
                f"included), got {self.num_updates!r}. The paper uses 5-20 out of 100 DDPM steps."
            )
        choose("BAC metric", self.metric, METRICS)
        if (
            not isinstance(self.bubble_top_n, int)
            or isinstance(self.bubble_top_n, bool)
            or self.bubble_top_n < 0
        ):
            raise UserError(
                f"bubble_top_n must be an integer >= 0 (0 turns Bubbling Union off), got {self.bubble_top_n!r}."
            )

    def check_steps(self, num_steps: int) -> None:
        """Raise a UserError when the budget does not fit a sampler of ``num_steps`` steps."""
        least = 2 if self.always_update_last and num_steps > 1 else 1
        if not least <= self.num_updates <= num_steps:
            raise UserError(
                f"num_updates={self.num_updates} does not fit a {num_steps}-step sampler: it must lie in "
                f"[{least}, {num_steps}]"
                + (" (step 0 and the last step are both update steps)" if least == 2 else "")
                + ". Lower num_updates or calibrate for a sampler with more steps."
            )


# ---------------------------------------------------------------------------- scheduler


def segment_costs(error: np.ndarray) -> np.ndarray:
    """(K, K) error -> (K, K) C with C[a, b] = sum_{t=a..b} error[a, t] for b >= a, +inf below the diagonal."""
    error = np.asarray(error, dtype=np.float64)
    k = error.shape[0]
    costs = np.cumsum(np.triu(error), axis=1)  # row a sums error[a, a..b]; entries t < a are zero
    costs[np.tril_indices(k, -1)] = np.inf
    return costs


def schedule_cost(error: np.ndarray, update_steps: Sequence[int]) -> float:
    """The scheduler's objective for ``update_steps``: total error of every step against its cache."""
    error = np.asarray(error, dtype=np.float64)
    k = error.shape[0]
    bounds = [*sorted(update_steps), k]
    return float(sum(error[a, a:b].sum() for a, b in zip(bounds, bounds[1:])))


def _cheapest_runs(costs: np.ndarray, num_runs: int) -> list[int]:
    """Starts of the ``num_runs`` runs (the first at 0) covering steps 0..K-1 at least total cost."""
    k = costs.shape[0]
    best = costs[0].copy()  # (K,): one run, covering 0..i
    parents = []
    for _ in range(num_runs - 1):
        candidates = best[:-1, None] + costs[1:, :]  # (K-1, K): runs up to j, then a run j+1..i
        j = candidates.argmin(axis=0)  # (K,) ties: the earliest j
        best = candidates[j, np.arange(k)]
        parents.append(j)
    assert np.isfinite(best[-1]), (num_runs, k)
    starts, i = [], k - 1
    for j in reversed(parents):
        prev_end = int(j[i])
        starts.append(prev_end + 1)
        i = prev_end
    starts.append(0)
    return starts[::-1]


def schedule_block(error: np.ndarray, num_updates: int, always_update_last: bool = True) -> tuple[int, ...]:
    """The cheapest ``num_updates`` update steps (step 0 included) for one block's (K, K) error matrix."""
    error = np.asarray(error, dtype=np.float64)
    if error.ndim != 2 or error.shape[0] != error.shape[1] or error.shape[0] < 1:
        raise UserError(f"A block's error matrix must be square (K, K) with K >= 1, got shape {error.shape}.")
    k = error.shape[0]
    SchedulerConfig(num_updates=num_updates, always_update_last=always_update_last).check_steps(k)
    if always_update_last and k > 1:
        head = _cheapest_runs(segment_costs(error[: k - 1, : k - 1]), num_updates - 1)
        return (*head, k - 1)
    return tuple(_cheapest_runs(segment_costs(error), num_updates))


# ---------------------------------------------------------------------------- Bubbling Union


def volatility(l1_distances: np.ndarray) -> np.ndarray:
    """(N, K, K) mean-absolute distances between a block's outputs at two steps -> (N,) mean over all pairs."""
    d = np.asarray(l1_distances, dtype=np.float64)
    return d.reshape(d.shape[0], -1).mean(axis=1)


def bubbling_union(
    update_steps: Sequence[Sequence[int]],
    is_ffn: Sequence[bool],
    scores: Sequence[float],
    top_n: int,
) -> tuple[list[tuple[int, ...]], list[int]]:
    """Refresh the ``top_n`` highest-scoring blocks whenever a later FFN refreshes.

    ``update_steps[i]``, ``is_ffn[i]`` and ``scores[i]`` (volatility) describe block i in
    execution order. Returns the new update steps per block and the selected block indices
    (highest score first; ties to the earlier block). The union uses the FFNs' own steps,
    so the result does not depend on the order the selected blocks are processed in.
    """
    n = len(update_steps)
    if not (len(is_ffn) == len(scores) == n):
        raise UserError(
            f"bubbling_union needs one entry per block: got {n} schedules, {len(is_ffn)} FFN flags, "
            f"{len(scores)} scores."
        )
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    selected = order[: max(0, min(int(top_n), n))]
    result = [tuple(sorted(set(steps))) for steps in update_steps]
    for u in selected:
        merged = set(update_steps[u])
        for d in range(u + 1, n):
            if is_ffn[d]:
                merged.update(update_steps[d])
        result[u] = tuple(sorted(merged))
    return result, selected


# ---------------------------------------------------------------------------- whole models


def adaptive_schedule(
    errors: np.ndarray, l1_distances: np.ndarray, is_ffn: Sequence[bool], config: SchedulerConfig
) -> tuple[list[tuple[int, ...]], list[int]]:
    """BAC for every block: (N, K, K) ``errors`` (config.metric) and ``l1_distances`` -> update steps, BU picks."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 3 or errors.shape[1] != errors.shape[2] or errors.shape[0] != len(is_ffn):
        raise UserError(
            f"adaptive_schedule needs (N, K, K) error matrices for the {len(is_ffn)} blocks, got shape "
            f"{errors.shape}."
        )
    config.check_steps(errors.shape[1])
    steps = [schedule_block(e, config.num_updates, config.always_update_last) for e in errors]
    if config.bubble_top_n == 0:
        return steps, []
    return bubbling_union(steps, is_ffn, volatility(l1_distances), config.bubble_top_n)


def uniform_update_steps(num_steps: int, every: int) -> tuple[int, ...]:
    """Uniform caching, the baseline: steps 0, every, 2*every, ... (ceil(K / every) updates)."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise UserError(f"Uniform caching needs an integer interval every >= 1, got {every!r}.")
    return tuple(range(0, num_steps, every))
