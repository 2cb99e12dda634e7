"""Capture, restore and seed the global random number generators a training step touches.

Exact resume needs every stream that decides what a step does: Python's ``random``
(augmentations, sampling helpers), NumPy's legacy global generator, torch's CPU generator
(dropout, noise, ``DataLoader`` shuffling seeds) and one generator per CUDA device.
``RngState`` keeps Python and NumPy state as JSON-able values and torch state as uint8
tensors, so a checkpoint stores it with JSON + safetensors and never with pickle.

Generators a job creates itself (``torch.Generator``, ``np.random.default_rng``) are not
global and are not captured here; a job that uses them saves their state with its own
counters.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dreamrt.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass
class RngState:
    """The state of the global generators at one moment.

    ``python`` and ``numpy`` hold JSON-able values; ``torch`` and ``cuda`` hold the uint8
    state tensors torch hands out (``cuda`` is empty when CUDA was unavailable).
    """

    # {"version": int, "internal": list[int] (625 values), "gauss_next": float | None}
    python: dict[str, Any]
    # np.random.get_state(legacy=False) with the MT19937 key as a list[int] (624 values).
    numpy: dict[str, Any]
    torch: torch.Tensor
    cuda: list[torch.Tensor] = field(default_factory=list)


def capture_rng_state() -> RngState:
    """Snapshot Python, NumPy, torch and (when available) CUDA global generators."""
    import torch

    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    numpy_json = {
        "bit_generator": np_state["bit_generator"],
        "state": {"key": [int(v) for v in np_state["state"]["key"]], "pos": int(np_state["state"]["pos"])},
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    }
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return RngState(
        python={"version": version, "internal": list(internal), "gauss_next": gauss_next},
        numpy=numpy_json,
        torch=torch.get_rng_state().clone(),
        cuda=cuda,
    )


def restore_rng_state(state: RngState) -> None:
    """Put the global generators back to ``state``.

    CUDA states are restored device by device; when this machine has fewer CUDA devices
    than the one that saved them (or none), the extra states are skipped with a warning,
    because resuming a GPU run on a CPU machine is legitimate but not bit-exact.
    """
    import torch

    py = state.python
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]))
    np_state = {
        "bit_generator": state.numpy["bit_generator"],
        "state": {
            "key": np.asarray(state.numpy["state"]["key"], dtype=np.uint32),
            "pos": int(state.numpy["state"]["pos"]),
        },
        "has_gauss": int(state.numpy["has_gauss"]),
        "gauss": float(state.numpy["gauss"]),
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state.torch.to(device="cpu", dtype=torch.uint8))
    if not state.cuda:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < len(state.cuda):
        warnings.warn(
            f"The checkpoint holds CUDA RNG states for {len(state.cuda)} device(s) but this machine has "
            f"{available}; restoring {min(available, len(state.cuda))} of them, so GPU randomness will not "
            "continue exactly as in the saved run.",
            stacklevel=2,
        )
    for index, cuda_state in enumerate(state.cuda[:available]):
        torch.cuda.set_rng_state(cuda_state.to(device="cpu", dtype=torch.uint8), device=index)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and all CUDA generators from one integer."""
    import torch

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"The seed must be a non-negative int, got {seed!r}. Pass e.g. seed=0.")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seeding only takes 32 bits.
    torch.manual_seed(seed)  # also seeds every CUDA device
