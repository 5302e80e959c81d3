"""Asynchronous promotion: host-to-device copies on a copy stream, and the pins that keep slabs stable.

Two small mechanisms keep expert handles stable while copies and kernels run concurrently:

- :class:`Promoter`: a load reserves its slab in the ledger (LOADING), then copies the expert's
  pinned host row into the slab on a dedicated CUDA stream (``non_blocking``) and records an
  event after it. The copy stream is one FIFO, so copies complete in submission order. A copy
  turns READY (``ledger.finish_load``) only when the engine observes its event complete: at
  the next layer step (:meth:`Promoter.poll`), or when a layer waits for it
  (:meth:`Promoter.wait`, which turns READY the copies queued up to and including it). A
  kernel is only ever launched on READY slabs, after the host saw the copy finish, so it never
  reads a half-copied expert.
- :class:`Fences`: the slabs a layer's kernels read are pinned before launch; an event recorded
  on the compute stream after the kernels marks their end, and the slabs are unpinned once it
  has completed (polled at the next layer step). A DEMOTE of a pinned slab only drains it
  (:class:`core.slabs.SlabLedger`), so a copy never overwrites a slab a kernel still reads.

Without CUDA the same code runs synchronously: copies complete at once (yet turn READY only at
the next poll or wait, the same logical points as on a GPU) and kernels have finished when
their fence is recorded.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from moebits.core.keys import ExpertKey
from moebits.core.slabs import SlabLedger
from moebits.runtime.host_store import HostStore
from moebits.runtime.pool import DevicePool


@dataclass
class Copy:
    """One promotion in flight: ``seq`` is its place in the copy stream's FIFO."""

    seq: int
    slab: int
    key: ExpertKey
    precision: str
    nbytes: int
    event: torch.cuda.Event | None = field(default=None, repr=False)

    def done(self) -> bool:
        return self.event is None or self.event.query()


class Promoter:
    """Copies host rows into slabs on a copy stream; see the module docstring."""

    def __init__(self, pool: DevicePool, store: HostStore, ledger: SlabLedger) -> None:
        self.pool, self.store, self.ledger = pool, store, ledger
        self.cuda = pool.device.type == "cuda"
        self.stream = torch.cuda.Stream(pool.device) if self.cuda else None
        self.pending: deque[Copy] = deque()
        self.by_key: dict[tuple[ExpertKey, str], Copy] = {}
        self.loaded_bytes = 0
        self._seq = 0

    def place(self, key: ExpertKey, precision: str, slab: int) -> None:
        """An initial load: copy now and mark READY (untimed, uncounted)."""
        self.pool.slab_bytes(slab).copy_(self.store.row(key, precision))
        self.ledger.finish_load(slab)

    def submit(self, key: ExpertKey, precision: str, slab: int) -> Copy:
        """Queue the copy of ``key``'s ``precision`` row into the reserved (LOADING) ``slab``."""
        src, dst = self.store.row(key, precision), self.pool.slab_bytes(slab)
        event = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            dst.copy_(src)
        c = Copy(self._seq, slab, key, precision, dst.numel(), event)
        self._seq += 1
        self.pending.append(c)
        self.by_key[(key, precision)] = c
        self.loaded_bytes += c.nbytes
        return c

    def in_flight(self, key: ExpertKey, precision: str) -> Copy | None:
        return self.by_key.get((key, precision))

    def poll(self) -> int:
        """Turn READY every copy at the head of the FIFO whose event has completed; how many."""
        n = 0
        while self.pending and self.pending[0].done():
            self._finish(self.pending.popleft())
            n += 1
        return n

    def wait(self, copy: Copy) -> float:
        """Block until ``copy`` has landed; it and every copy queued before it turn READY.
        Returns the seconds spent waiting."""
        t0 = time.perf_counter()
        if copy.event is not None:
            copy.event.synchronize()
        while self.pending and self.pending[0].seq <= copy.seq:
            self._finish(self.pending.popleft())
        return time.perf_counter() - t0

    def drain(self) -> None:
        """Wait for every copy in flight (end of a run)."""
        if self.pending:
            self.wait(self.pending[-1])

    def _finish(self, c: Copy) -> None:
        self.ledger.finish_load(c.slab)
        del self.by_key[(c.key, c.precision)]


class Fences:
    """Pins the slabs a layer's kernels read until an event after those kernels completes."""

    def __init__(self, ledger: SlabLedger, device: torch.device) -> None:
        self.ledger = ledger
        self.cuda = device.type == "cuda"
        self.open: deque[tuple[torch.cuda.Event | None, list[int]]] = deque()

    def pin(self, slabs: list[int]) -> None:
        for s in slabs:
            self.ledger.pin(s)

    def close(self, slabs: list[int]) -> None:
        """The kernels reading ``slabs`` have been launched: fence them (unpin at once on CPU)."""
        if not self.cuda:
            self._unpin(slabs)
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        self.open.append((event, slabs))

    def poll(self) -> None:
        """Unpin the slabs of every fence (in launch order) whose kernels have finished."""
        while self.open and (self.open[0][0] is None or self.open[0][0].query()):
            self._unpin(self.open.popleft()[1])

    def drain(self) -> None:
        while self.open:
            event, slabs = self.open.popleft()
            if event is not None:
                event.synchronize()
            self._unpin(slabs)

    def _unpin(self, slabs: list[int]) -> None:
        for s in slabs:
            self.ledger.unpin(s)
