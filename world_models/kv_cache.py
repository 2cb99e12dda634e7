"""A typed, preallocated KV cache for next-frame generation with a rolling window.

Keys and values of every layer live in two tensors allocated once, ``k`` and ``v`` of shape
(L, B, H, slots*N, Dh): a slot holds one frame's N tokens. ``slot_frame`` (slots,) names the
absolute frame index stored in each slot (-1: free). The model attends over all slots and
masks by frame index (``dynamics.frame_visibility``), so slots need no order: a ring without
copies.

Frames come in two states:
- **tentative**: appended with :meth:`KVCache.append` (the frames being denoised, or the k
  frames of a speculation). The model writes their keys/values into their slots on every pass.
- **accepted**: kept. :meth:`KVCache.accept` keeps the first n tentative frames and releases
  the rest; :meth:`KVCache.rollback` releases tentative frames from a given index on.

Only ``accept`` evicts: accepted frames that no later frame can see (older than the window,
not a sink) are released. Because nothing accepted is touched while frames are tentative, a
rejected speculation leaves the cache exactly as it was (released slots are zeroed, and free
slots are always zero, so even the raw tensors compare equal). Rolling back *accepted* frames
is refused: their window may already be evicted; take a :meth:`snapshot` instead (a copy).

Capacity: ``sink + (window - 1) + requery + max_pending`` slots, where ``window`` counts the
query frame itself, ``max_pending`` is the most tentative frames at once (1 for plain
generation, k for speculating k frames) and ``requery`` the accepted frames that may be run as
queries again (the fused K/V write of ``sampling.py`` re-runs the last generated frames in the
next pass, and their own windows reach ``requery`` frames further back). Memory: 2 * L * B * H * slots * N * Dh floats, e.g. keys and values x 4 layers x 128 wide x
64 tokens x 9 slots (window 8, fused writes) x 4 bytes = 2.4 MB.

Dimensions: L layers, B batch, H heads, N tokens per frame, Dh head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dreamrt.errors import UserError

if TYPE_CHECKING:
    from dreamrt.world_models.dynamics import DynamicsConfig


@dataclass(frozen=True)
class KVCacheConfig:
    n_layer: int
    n_head: int
    head_dim: int
    tokens_per_frame: int  # N
    window: int  # frames a query sees, itself included
    sink: int = 0
    max_pending: int = 1  # tentative frames at once (speculation depth)
    # Accepted frames at the end of the sequence that may be passed as queries again (the fused
    # kv_write rewrites the last generated frames in the next pass): their windows are kept too.
    requery: int = 0
    batch_size: int = 1

    def __post_init__(self) -> None:
        for name in (
            "n_layer",
            "n_head",
            "head_dim",
            "tokens_per_frame",
            "window",
            "max_pending",
            "batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"KVCacheConfig.{name} must be a positive integer, got {value!r}.")
        if self.sink < 0 or self.requery < 0:
            raise UserError(f"KVCacheConfig.sink and requery must be >= 0, got {self.sink}, {self.requery}.")

    @property
    def slots(self) -> int:
        return self.sink + self.window - 1 + self.requery + self.max_pending

    @staticmethod
    def for_model(
        config: DynamicsConfig, batch_size: int = 1, max_pending: int = 1, requery: int = 0
    ) -> KVCacheConfig:
        return KVCacheConfig(
            n_layer=config.n_layer,
            n_head=config.n_head,
            head_dim=config.head_dim,
            tokens_per_frame=config.tokens_per_frame,
            window=config.window,
            sink=config.sink,
            max_pending=max_pending,
            requery=requery,
            batch_size=batch_size,
        )


@dataclass
class KVCacheSnapshot:
    """A copy of a cache's full state (see :meth:`KVCache.snapshot`)."""

    k: Tensor
    v: Tensor
    slot_frame: Tensor
    length: int
    accepted: int


@dataclass
class KVCache:
    """See the module docstring. Build with :meth:`KVCache.allocate`."""

    config: KVCacheConfig
    k: Tensor  # (L, B, H, slots*N, Dh)
    v: Tensor  # (L, B, H, slots*N, Dh)
    slot_frame: Tensor  # (slots,) int64 absolute frame index per slot, -1 free
    length: int = 0  # frames in the sequence so far, tentative ones included
    accepted: int = 0  # frames < accepted are kept; [accepted, length) are tentative

    @staticmethod
    def allocate(
        config: KVCacheConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> KVCache:
        c = config
        shape = (c.n_layer, c.batch_size, c.n_head, c.slots * c.tokens_per_frame, c.head_dim)
        return KVCache(
            config=c,
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            slot_frame=torch.full((c.slots,), -1, dtype=torch.int64, device=device),
        )

    # ---------------------------------------------------------------- queries

    @property
    def pending(self) -> int:
        """Tentative frames."""
        return self.length - self.accepted

    def frames(self) -> list[int]:
        """Absolute indices of the frames held, in increasing order."""
        return sorted(int(f) for f in self.slot_frame.tolist() if f >= 0)

    def slots_of(self, frames: list[int] | Tensor) -> Tensor:
        """(F,) slot of each frame in ``frames``; UserError for a frame not held."""
        lookup = {int(f): i for i, f in enumerate(self.slot_frame.tolist()) if f >= 0}
        frames = frames.tolist() if isinstance(frames, Tensor) else list(frames)
        missing = [f for f in frames if f not in lookup]
        if missing:
            raise UserError(
                f"Frames {missing} are not in the KV cache, which holds frames {self.frames()}. Frames older "
                f"than the window are evicted when later frames are accepted."
            )
        return torch.tensor([lookup[f] for f in frames], dtype=torch.int64, device=self.slot_frame.device)

    # ---------------------------------------------------------------- changes

    def append(self, count: int = 1) -> Tensor:
        """Add ``count`` tentative frames (indices length .. length+count-1); return their slots (count,).

        The model fills the slots (``NextFrameDiT.forward_cached``); ``accept`` keeps them."""
        free = (self.slot_frame < 0).nonzero().flatten()
        if count < 1 or self.pending + count > self.config.max_pending or len(free) < count:
            raise UserError(
                f"Cannot append {count} tentative frame(s) to the KV cache: {self.pending} are already tentative "
                f"and it was allocated for max_pending={self.config.max_pending}. Accept or roll back the "
                f"tentative frames first, or allocate with a larger max_pending (the speculation depth)."
            )
        slots = free[:count]
        self.slot_frame[slots] = torch.arange(self.length, self.length + count, device=self.slot_frame.device)
        self.length += count
        return slots

    def accept(self, n: int | None = None) -> None:
        """Keep the first ``n`` tentative frames (all when None), release the others, then evict the
        accepted frames no later frame can see."""
        n = self.pending if n is None else n
        if not 0 <= n <= self.pending:
            raise UserError(
                f"accept(n) takes 0 <= n <= {self.pending} (the tentative frames of the cache), got {n}."
            )
        self._release_from(self.accepted + n)
        self.accepted = self.length
        c = self.config
        # The next frame to come is `length`; it sees frames > length - window, and the sinks. The
        # `requery` frames before it may be queried again, so keep their windows as well.
        stale = (self.slot_frame >= c.sink) & (self.slot_frame <= self.length - c.window - c.requery)
        self._free(stale.nonzero().flatten())

    def rollback(self, frame: int) -> None:
        """Drop the tentative frames from index ``frame`` on (``accepted <= frame <= length``)."""
        if not self.accepted <= frame <= self.length:
            raise UserError(
                f"rollback({frame}): only tentative frames [{self.accepted}, {self.length}) can be rolled back; "
                f"frames < {self.accepted} are accepted and their window may be evicted. Take snapshot() "
                f"before frames you may need to return to, and restore() it."
            )
        self._release_from(frame)

    def reset(self) -> None:
        """Empty the cache (all slots free and zeroed)."""
        self.k.zero_()
        self.v.zero_()
        self.slot_frame.fill_(-1)
        self.length = self.accepted = 0

    def snapshot(self) -> KVCacheSnapshot:
        """A full copy (2 * L * B * H * slots * N * Dh floats) to :meth:`restore` later."""
        return KVCacheSnapshot(
            self.k.clone(), self.v.clone(), self.slot_frame.clone(), self.length, self.accepted
        )

    def restore(self, snapshot: KVCacheSnapshot) -> None:
        """Return to a snapshot of this cache, in place (the tensors stay the same objects)."""
        if snapshot.k.shape != self.k.shape:
            raise UserError(
                f"The snapshot's keys have shape {tuple(snapshot.k.shape)} but this cache's have "
                f"{tuple(self.k.shape)}: restore a snapshot of the same cache."
            )
        self.k.copy_(snapshot.k)
        self.v.copy_(snapshot.v)
        self.slot_frame.copy_(snapshot.slot_frame)
        self.length, self.accepted = snapshot.length, snapshot.accepted

    def _release_from(self, frame: int) -> None:
        self._free((self.slot_frame >= frame).nonzero().flatten())
        self.length = frame

    def _free(self, slots: Tensor) -> None:
        n = self.config.tokens_per_frame
        for s in slots.tolist():
            self.k[:, :, :, s * n : (s + 1) * n].zero_()
            self.v[:, :, :, s * n : (s + 1) * n].zero_()
        self.slot_frame[slots] = -1
