"""Backward coherence: pick, of several sampled action chunks, the one that continues the last plan.

A diffusion policy re-plans every Ta steps from fresh noise, so two consecutive chunks may
come from different modes of the action distribution (approach the block from the left, then
from the right) and the executed trajectory dithers between them. Bidirectional Decoding
(Liu, Hamid et al., 2024) samples K chunks per call and scores each against the previous
chunk's not yet executed actions; the closest one continues the commitment made a chunk ago
while still being a sample of the current observation's distribution. This module is that
backward-coherence criterion alone (BID's forward contrast needs a second, weaker policy).

Indices: a chunk is the policy's full prediction of H steps. The previous chunk was sampled
``shift`` control steps ago, so its step ``j + shift`` and the new chunk's step ``j`` are the
same control step. Only the steps the new chunk will execute (from ``first`` = To - 1) that the
previous chunk also predicted are compared, weighted ``decay ** (j - first)``: the nearest
steps matter most, since they are the ones executed next.

Dimensions: K candidates, H horizon, A action dim. Actions are compared normalised, so that
every action dimension counts alike whatever its units.
"""

from __future__ import annotations

import torch
from torch import Tensor

COHERENCE_DECAY = 0.5  # BID's weight decay per step of the overlap


def coherence_costs(
    candidates: Tensor, previous: Tensor, shift: int, first: int, decay: float = COHERENCE_DECAY
) -> Tensor | None:
    """(K,) weighted distances of ``candidates`` (K, H, A) to ``previous`` (H, A) shifted by ``shift`` steps.

    None when the two chunks share no step the new one executes (``shift`` >= H - first): there
    is nothing to be coherent with.
    """
    k, h, a = candidates.shape
    if previous.shape != (h, a):
        raise ValueError(f"previous chunk has shape {tuple(previous.shape)}; expected {(h, a)}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    steps = torch.arange(first, h - shift, device=candidates.device)
    if len(steps) == 0:
        return None
    weights = decay ** (steps - first).to(candidates.dtype)  # (S,)
    gaps = (candidates[:, steps] - previous[steps + shift]).norm(dim=-1)  # (K, S)
    return (gaps * weights).sum(dim=-1)


def pick_coherent(candidates: Tensor, previous: Tensor | None, shift: int, first: int) -> int:
    """Index of the candidate to execute: the most coherent with ``previous``, else the first (a plain sample)."""
    if previous is None:
        return 0
    costs = coherence_costs(candidates, previous, shift, first)
    return 0 if costs is None else int(torch.argmin(costs))
