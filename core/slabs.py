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

from dataclasses import dataclass
from enum import IntEnum
from heapq import heappop, heappush

from moebits.core.keys import ExpertKey


class InfeasibleError(ValueError):
    """The budget cannot hold what the run needs (too few slabs, experts that do not fit).

    A fact about the configuration, not a fault: a sweep records such a run as ``infeasible``
    with this message and does not retry it (:mod:`drive.outcome`)."""


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


# Slab states as plain ints inside the ledger (an IntEnum compare costs ~4x an int compare);
# the public methods hand out SlabState members.
_FREE, _LOADING, _READY, _DRAINING = 0, 1, 2, 3
_STATES = tuple(SlabState)  # int -> member
_NO_FREE_SLAB, _ALREADY_PRESENT = Refusal.NO_FREE_SLAB, Refusal.ALREADY_PRESENT
_NOT_PRESENT, _IN_FLIGHT, _UNKNOWN_PRECISION = Refusal.NOT_PRESENT, Refusal.IN_FLIGHT, Refusal.UNKNOWN_PRECISION
_ClassBooks = tuple[dict[ExpertKey, int], list[int], int]  # (slot, free heap, slab bytes) of one class


class SlabLedger:
    """Which expert copy lives in which slab, and in which state; see the module docstring.

    Internally one record per precision, ``(slot, free, slab_bytes)``: ``slot`` maps an
    :class:`ExpertKey` to the slab holding its copy (LOADING or READY; a DRAINING slab has
    left it), ``free`` is the class's min-heap of free slab ids. Slab states are ints.
    """

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
        self._class_of: list[_ClassBooks] = []  # slab id -> its class's books
        self._cls: dict[str, _ClassBooks] = {}
        for c in classes:
            first = len(self._class_of)
            rec: _ClassBooks = ({}, list(range(first, first + c.count)), c.slab_bytes)  # a range is a heap
            self._cls[c.precision] = rec
            self._class_of.extend([rec] * c.count)
        n = len(self._class_of)
        self._state = [_FREE] * n
        self._pins = [0] * n
        self.used_bytes = 0

    # ---- residency view (read-only queries) ----
    def precisions(self) -> list[str]:
        """Precisions the pool has slab classes for, in plan order."""
        return list(self.classes)

    def state(self, key: ExpertKey, precision: str) -> SlabState:
        """State of ``key``'s copy in ``precision`` (FREE when there is none)."""
        slab = self.slab_of(key, precision)
        return SlabState.FREE if slab is None else _STATES[self._state[slab]]

    def is_ready(self, key: ExpertKey, precision: str) -> bool:
        rec = self._cls.get(precision)
        slab = None if rec is None else rec[0].get(key)
        return slab is not None and self._state[slab] == _READY

    def is_loading(self, key: ExpertKey, precision: str) -> bool:
        rec = self._cls.get(precision)
        slab = None if rec is None else rec[0].get(key)
        return slab is not None and self._state[slab] == _LOADING

    def has_copy(self, key: ExpertKey, precision: str) -> bool:
        """A READY or LOADING copy exists (DRAINING ones are on their way out)."""
        return self.slab_of(key, precision) is not None

    def free_slabs(self, precision: str) -> int:
        rec = self._cls.get(precision)
        return 0 if rec is None else len(rec[1])

    def slab_of(self, key: ExpertKey, precision: str) -> int | None:
        rec = self._cls.get(precision)
        return None if rec is None else rec[0].get(key)

    def copies(self) -> list[tuple[ExpertKey, str, SlabState]]:
        """Every copy in the pool, sorted, for tests and snapshots."""
        state = self._state
        return sorted((k, p, _STATES[state[s]]) for p, rec in self._cls.items() for k, s in rec[0].items())

    # ---- mechanism (engines only) ----
    def begin_load(self, key: ExpertKey, precision: str) -> int | Refusal:
        """Reserve a slab for a copy about to be written; the slab id, or why not."""
        rec = self._cls.get(precision)
        if rec is None:
            return _UNKNOWN_PRECISION
        slot, free, nbytes = rec
        if not free:
            slab = slot.get(key)
            if slab is None:
                return _NO_FREE_SLAB
        else:
            slab = slot.setdefault(key, free[0])  # one hash: the lowest free slab, unless a copy exists
            if slab == free[0]:
                heappop(free)
                self._state[slab] = _LOADING
                self.used_bytes += nbytes
                return slab
        return _IN_FLIGHT if self._state[slab] == _LOADING else _ALREADY_PRESENT

    def finish_load(self, slab: int) -> None:
        """The copy into ``slab`` is complete: it may be served from now on."""
        state = self._state
        if slab.__class__ is not int or not 0 <= slab < len(state):
            self._check_id(slab)
        if state[slab] != _LOADING:
            raise PoolError(f"finish_load on slab {slab} in state {_STATES[state[slab]].name}")
        state[slab] = _READY

    def finish_loads(self, slabs: list[int]) -> None:
        """:meth:`finish_load` of each slab, in order."""
        state = self._state
        n = len(state)
        for slab in slabs:
            if slab.__class__ is not int or not 0 <= slab < n:
                self._check_id(slab)
            if state[slab] != _LOADING:
                raise PoolError(f"finish_load on slab {slab} in state {_STATES[state[slab]].name}")
            state[slab] = _READY

    def evict(self, key: ExpertKey, precision: str) -> int | Refusal:
        """Drop ``key``'s copy in ``precision``; a pinned slab drains and frees on its last unpin."""
        rec = self._cls.get(precision)
        if rec is None:
            return _NOT_PRESENT
        slot, free, nbytes = rec
        slab = slot.pop(key, None)
        if slab is None:
            return _NOT_PRESENT
        state = self._state
        if state[slab] == _LOADING:
            slot[key] = slab  # put back: a copy in flight cannot be dropped
            return _IN_FLIGHT
        if self._pins[slab]:
            state[slab] = _DRAINING
        else:
            state[slab] = _FREE
            self.used_bytes -= nbytes
            heappush(free, slab)
        return slab

    def pin(self, slab: int) -> None:
        """A kernel starts reading ``slab`` (it must be READY)."""
        self._check_id(slab)
        if self._state[slab] != _READY:
            raise PoolError(
                f"pin of slab {slab} in state {_STATES[self._state[slab]].name}: only READY copies are served"
            )
        self._pins[slab] += 1

    def unpin(self, slab: int) -> None:
        """A kernel finished reading ``slab``; a draining slab frees on its last unpin."""
        self._check_id(slab)
        if self._pins[slab] <= 0:
            raise PoolError(f"unpin of slab {slab} that is not pinned")
        self._pins[slab] -= 1
        if self._pins[slab] == 0 and self._state[slab] == _DRAINING:
            self._release(slab)

    def _check_id(self, slab: int) -> None:
        """Reject a Refusal (an IntEnum, so also an int) or an id outside the pool."""
        if isinstance(slab, Refusal) or not 0 <= slab < len(self._state):
            raise PoolError(f"{slab!r} is not a slab id of this pool (0..{len(self._state) - 1})")

    def _release(self, slab: int) -> None:
        _, free, nbytes = self._class_of[slab]
        self._state[slab] = _FREE
        self.used_bytes -= nbytes
        heappush(free, slab)
