"""The runtime's mechanisms for the driver: the device slab pool and its copy stream.

Two mechanisms share the ledger-backed residency view (:class:`LedgerRows`): the eager
engine's :class:`DeviceMechanism` (below) and the graph path's :class:`MoverMechanism`, whose
copies and table writes are :class:`runtime.expert_mover.ExpertMover`'s (issued and applied at
boundaries, so captured graphs never see a half-copied slab).

:class:`DeviceMechanism` is what :class:`drive.driver.Driver` hands a policy's actions to in
the runtime (the simulator's counterpart is :class:`sim.pool.SimPool`): DEMOTE evicts at once
(a pinned slab drains), PROMOTE / PREFETCH reserve a slab in the ledger and start the copy on
the copy stream (:class:`runtime.promote.Promoter`). Residency reads straight from the ledger
(bitmasks per expert, bit ``p`` = precision index ``p``, highest first), so it never drifts from
what the kernels see; a copy in flight is ready in copy-stream order (its FIFO ``seq``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from moebits.core.keys import ExpertKey
from moebits.core.slabs import Refusal, SlabLedger
from moebits.drive.driver import Accepted, Refused
from moebits.policies.base import Action, ActionKind
from moebits.runtime.expert_mover import ExpertMover
from moebits.runtime.promote import Promoter

_DEMOTE, _PREFETCH = ActionKind.DEMOTE, ActionKind.PREFETCH


class LedgerRows:
    """One layer's residency bitmasks, read from the ledger on demand (``row[expert]``)."""

    def __init__(self, ledger: SlabLedger, keys: list[ExpertKey], precisions: list[str], loading: bool) -> None:
        self._test = ledger.is_loading if loading else ledger.is_ready
        self.keys, self.precisions = keys, precisions

    def __getitem__(self, e: int) -> int:
        key, test = self.keys[e], self._test
        return sum(1 << p for p, name in enumerate(self.precisions) if test(key, name))

    def __len__(self) -> int:
        return len(self.keys)


class DeviceMechanism:
    """Carries out a policy's actions on the device pool; see the module docstring."""

    def __init__(self, ledger: SlabLedger, promoter: Promoter, precisions: list[str],
                 keys: list[list[ExpertKey]]) -> None:
        self.ledger, self.promoter, self.precisions, self.keys = ledger, promoter, precisions, keys
        self.ready = [LedgerRows(ledger, k, precisions, False) for k in keys]
        self.loading = [LedgerRows(ledger, k, precisions, True) for k in keys]
        self.peak_bytes = ledger.used_bytes

    def place(self, key: ExpertKey, precision: str) -> int | Refusal:
        """An initial load: copied synchronously, READY at once, uncounted."""
        slab = self.ledger.begin_load(key, precision)
        if not isinstance(slab, Refusal):
            self.promoter.place(key, precision, slab)
            self.peak_bytes = max(self.peak_bytes, self.ledger.used_bytes)
        return slab

    def evict(self, key: ExpertKey, precision: str) -> int | Refusal:
        return self.ledger.evict(key, precision)

    def apply(self, actions: Sequence[Action], now_s: float, counts: dict[str, int], refused: Refused,
              bad_key: Callable[[ExpertKey], None], accepted: Accepted | None = None) -> None:
        """Carry out ``actions`` in order (see :class:`drive.driver.Mechanism`)."""
        ledger = self.ledger
        for a in actions:
            bad_key(a.key)
            if a.kind is _DEMOTE:
                r = ledger.evict(a.key, a.precision)
                if isinstance(r, Refusal):
                    refused(a, r)
                else:
                    counts["demotions"] += 1
                continue
            slab = ledger.begin_load(a.key, a.precision)
            if isinstance(slab, Refusal):
                refused(a, slab)
                continue
            copy = self.promoter.submit(a.key, a.precision, slab)
            counts["prefetches" if a.kind is _PREFETCH else "promotions"] += 1
            self.peak_bytes = max(self.peak_bytes, ledger.used_bytes)
            if accepted is not None:
                accepted(a, now_s, float(copy.seq))

    def ready_time(self, layer: int, expert: int, p: int) -> float:
        """The copy's place in the copy stream's FIFO (copies complete in that order)."""
        copy = self.promoter.in_flight(self.keys[layer][expert], self.precisions[p])
        assert copy is not None, f"L{layer}E{expert}@{self.precisions[p]} is not in flight"
        return float(copy.seq)


class MoverMechanism:
    """The graph path's mechanism: actions through an :class:`ExpertMover` over a residency table.

    DEMOTE drops the copy at once and re-points the table at the next boundary; PROMOTE /
    PREFETCH reserve a slab, and the mover issues the copy at the next boundary and points the
    table at it at the boundary after it completed. Initial loads (:meth:`place`) reserve READY
    slabs and point the table at them; :meth:`write_placed` then fills them, a layer at a time
    (quantized on the weights' device, like loading a checkpoint). A copy in flight is ready in
    copy-stream order (its ``seq``).
    """

    def __init__(self, mover: ExpertMover, precisions: list[str], keys: list[list[ExpertKey]]) -> None:
        self.mover, self.precisions, self.keys = mover, precisions, keys
        ledger = mover.pool.ledger
        self.ledger = ledger
        self.ready = [LedgerRows(ledger, k, precisions, False) for k in keys]
        self.loading = [LedgerRows(ledger, k, precisions, True) for k in keys]
        self.peak_bytes = ledger.used_bytes
        self.placed: list[tuple[ExpertKey, str, int]] = []   # (key, precision, slab) to fill

    def place(self, key: ExpertKey, precision: str) -> int | Refusal:
        """An initial load: a READY slab now (filled by :meth:`write_placed`), uncounted."""
        slab = self.ledger.begin_load(key, precision)
        if not isinstance(slab, Refusal):
            self.ledger.finish_load(slab)
            self.mover.point_at_best(key)
            self.placed.append((key, precision, slab))
            self.peak_bytes = max(self.peak_bytes, self.ledger.used_bytes)
        return slab

    def evict(self, key: ExpertKey, precision: str) -> int | Refusal:
        r = self.mover.demote(key, precision)
        return r if r is not None else 0

    def write_placed(self, write: Callable[[int, str, list[int], list[int]], None]) -> None:
        """Fill the placed slabs: ``write(layer, precision, experts, slabs)`` per layer and
        precision, layers in order; then the table write is flushed."""
        by: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for key, p, slab in self.placed:
            if self.ledger.slab_of(key, p) == slab:            # not evicted by a later initial DEMOTE
                by.setdefault((key.layer, p), []).append((key.expert, slab))
        for (layer, p), pairs in sorted(by.items()):
            write(layer, p, [e for e, _ in pairs], [s for _, s in pairs])
        self.placed.clear()
        self.mover.table.flush()

    def apply(self, actions: Sequence[Action], now_s: float, counts: dict[str, int], refused: Refused,
              bad_key: Callable[[ExpertKey], None], accepted: Accepted | None = None) -> None:
        """Carry out ``actions`` in order (see :class:`drive.driver.Mechanism`)."""
        mover = self.mover
        for a in actions:
            bad_key(a.key)
            if a.kind is _DEMOTE:
                r = mover.demote(a.key, a.precision)
                if r is not None:
                    refused(a, r)
                else:
                    counts["demotions"] += 1
                continue
            r = mover.promote(a.key, a.precision)
            if r is not None:
                refused(a, r)
                continue
            counts["prefetches" if a.kind is _PREFETCH else "promotions"] += 1
            self.peak_bytes = max(self.peak_bytes, self.ledger.used_bytes)
            if accepted is not None:
                copy = mover.copy_of(a.key, a.precision)
                accepted(a, now_s, float(copy.seq if copy is not None else 0))

    def ready_time(self, layer: int, expert: int, p: int) -> float:
        """The copy's place in the copy stream's FIFO (copies complete in that order)."""
        copy = self.mover.copy_of(self.keys[layer][expert], self.precisions[p])
        assert copy is not None, f"L{layer}E{expert}@{self.precisions[p]} is not in flight"
        return float(copy.seq)
