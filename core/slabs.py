"""SlabLedger: the bookkeeping of a fragmentation-free expert slab pool.

The expert budget is carved once, at start-up, into slab classes: ``count`` slabs of
``slab_bytes`` for each precision in the plan. A slab holds one expert at one precision and
moves FREE → LOADING → READY → FREE. Allocation is deterministic (the lowest free slab id of
the class) and never splits or merges anything, so there is no fragmentation and the resident
bytes can never exceed the pool, which is at most the budget. A READY slab that a running
kernel has pinned is not freed by an eviction: it turns DRAINING and frees on the last unpin.

The simulator's pool and the runtime's device pool both keep their books here; the runtime
adds the tensor storage behind each slab id. Policies read a ledger through its query methods
(the residency view) and never mutate it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import IntEnum

from core.keys import ExpertKey


class SlabState(IntEnum):
    """Life cycle of one slab."""

    FREE = 0
    LOADING = 1
    READY = 2
    DRAINING = 3


class Refusal(IntEnum):
    """Why the pool refused an action (the engine reports it back to the policy)."""

    NO_FREE_SLAB = 1
    ALREADY_PRESENT = 2
    NOT_PRESENT = 3
    IN_FLIGHT = 4
    UNKNOWN_PRECISION = 5


class PoolError(ValueError):
    """The slab plan cannot be honoured (e.g. it does not fit the budget)."""


@dataclass(frozen=True, slots=True)
class SlabClass:
    """``count`` slabs of ``slab_bytes`` each, holding experts in ``precision``."""

    precision: str
    slab_bytes: int
    count: int

    def __post_init__(self) -> None:
        if self.slab_bytes <= 0 or self.count < 0:
            raise PoolError(
                f'slab class {self.precision!r} needs "slab_bytes" > 0 and "count" >= 0, '
                f"got {self.slab_bytes} and {self.count}"
            )


class SlabLedger:
    """Which expert copy lives in which slab, and in which state; see the module docstring."""

    def __init__(self, classes: list[SlabClass], budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise PoolError(f'"budget_bytes" must be > 0, got {budget_bytes}.')
        names = [c.precision for c in classes]
        if len(set(names)) != len(names):
            raise PoolError(f"slab plan names a precision twice: {names}")
        total = sum(c.slab_bytes * c.count for c in classes)
        if total > budget_bytes:
            raise PoolError(
                f"slab plan needs {total / 1e9:.3f} GB but the budget is {budget_bytes / 1e9:.3f} GB"
            )
        self.budget_bytes = budget_bytes
        self.pool_bytes = total
        self.classes: dict[str, SlabClass] = {c.precision: c for c in classes}
        self._class_of: list[str] = []
        self._free: dict[str, list[int]] = {}
        for c in classes:
            first = len(self._class_of)
            self._class_of.extend([c.precision] * c.count)
            self._free[c.precision] = list(range(first, first + c.count))  # already a heap
        n = len(self._class_of)
        self._state = [SlabState.FREE] * n
        self._owner: list[ExpertKey | None] = [None] * n
        self._pins = [0] * n
        self._slot: dict[tuple[ExpertKey, str], int] = {}
        self.used_bytes = 0

    # ---- residency view (read-only queries) ----
    def precisions(self) -> list[str]:
        """Precisions the pool has slab classes for, in plan order."""
        return list(self.classes)

    def state(self, key: ExpertKey, precision: str) -> SlabState:
        """State of ``key``'s copy in ``precision`` (FREE when there is none)."""
        slab = self._slot.get((key, precision))
        return SlabState.FREE if slab is None else self._state[slab]

    def is_ready(self, key: ExpertKey, precision: str) -> bool:
        slab = self._slot.get((key, precision))
        return slab is not None and self._state[slab] == SlabState.READY

    def is_loading(self, key: ExpertKey, precision: str) -> bool:
        slab = self._slot.get((key, precision))
        return slab is not None and self._state[slab] == SlabState.LOADING

    def has_copy(self, key: ExpertKey, precision: str) -> bool:
        """A READY or LOADING copy exists (DRAINING ones are on their way out)."""
        slab = self._slot.get((key, precision))
        return slab is not None and self._state[slab] in (SlabState.READY, SlabState.LOADING)

    def free_slabs(self, precision: str) -> int:
        free = self._free.get(precision)
        return 0 if free is None else len(free)

    def slab_of(self, key: ExpertKey, precision: str) -> int | None:
        return self._slot.get((key, precision))

    def copies(self) -> list[tuple[ExpertKey, str, SlabState]]:
        """Every copy in the pool, sorted, for tests and snapshots."""
        return sorted((k, p, self._state[s]) for (k, p), s in self._slot.items())

    # ---- mechanism (engines only) ----
    def begin_load(self, key: ExpertKey, precision: str) -> int | Refusal:
        """Reserve a slab for a copy about to be written; the slab id, or why not."""
        free = self._free.get(precision)
        if free is None:
            return Refusal.UNKNOWN_PRECISION
        if (key, precision) in self._slot:
            slab = self._slot[(key, precision)]
            return Refusal.IN_FLIGHT if self._state[slab] == SlabState.LOADING else Refusal.ALREADY_PRESENT
        if not free:
            return Refusal.NO_FREE_SLAB
        slab = heapq.heappop(free)
        self._state[slab] = SlabState.LOADING
        self._owner[slab] = key
        self._slot[(key, precision)] = slab
        self.used_bytes += self.classes[precision].slab_bytes
        return slab

    def finish_load(self, slab: int) -> None:
        """The copy into ``slab`` is complete: it may be served from now on."""
        self._check_id(slab)
        if self._state[slab] != SlabState.LOADING:
            raise PoolError(f"finish_load on slab {slab} in state {self._state[slab].name}")
        self._state[slab] = SlabState.READY

    def evict(self, key: ExpertKey, precision: str) -> int | Refusal:
        """Drop ``key``'s copy in ``precision``; a pinned slab drains and frees on its last unpin."""
        slab = self._slot.get((key, precision))
        if slab is None or self._state[slab] == SlabState.DRAINING:
            return Refusal.NOT_PRESENT
        if self._state[slab] == SlabState.LOADING:
            return Refusal.IN_FLIGHT
        del self._slot[(key, precision)]
        if self._pins[slab]:
            self._state[slab] = SlabState.DRAINING
        else:
            self._release(slab)
        return slab

    def pin(self, slab: int) -> None:
        """A kernel starts reading ``slab`` (it must be READY)."""
        self._check_id(slab)
        if self._state[slab] != SlabState.READY:
            raise PoolError(f"pin of slab {slab} in state {self._state[slab].name}: only READY copies are served")
        self._pins[slab] += 1

    def unpin(self, slab: int) -> None:
        """A kernel finished reading ``slab``; a draining slab frees on its last unpin."""
        self._check_id(slab)
        if self._pins[slab] <= 0:
            raise PoolError(f"unpin of slab {slab} that is not pinned")
        self._pins[slab] -= 1
        if self._pins[slab] == 0 and self._state[slab] == SlabState.DRAINING:
            self._release(slab)

    def _check_id(self, slab: int) -> None:
        """Reject a Refusal (an IntEnum, so also an int) or an id outside the pool."""
        if isinstance(slab, Refusal) or not 0 <= slab < len(self._state):
            raise PoolError(f"{slab!r} is not a slab id of this pool (0..{len(self._state) - 1})")

    def _release(self, slab: int) -> None:
        precision = self._class_of[slab]
        self._state[slab] = SlabState.FREE
        self._owner[slab] = None
        self.used_bytes -= self.classes[precision].slab_bytes
        heapq.heappush(self._free[precision], slab)
