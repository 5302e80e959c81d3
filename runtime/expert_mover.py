"""Promotions and demotions under captured graphs: copies, table writes and slab fences, in order.

A captured step reads the residency table (:class:`runtime.residency.ResidencyTable`) and
never asks the host. Three rules keep what it reads whole:

1. A copy into a slab lands on the copy stream and records an event; the table entry that
   points at the slab is written only at a step boundary after the host saw that event
   complete (``Streams.done``, a query, no wait). Kernels never read a half-copied slab.
2. Table writes are enqueued on the compute stream between steps (``table.flush``), so a
   step's kernels all read one table state: those enqueued before read the old entry.
3. A slab a demotion frees may still be read by steps enqueued before the demotion's table
   write. The write is followed by a fence event on the compute stream; the next copy into
   that slab waits for the fence on the copy stream (a device-side wait: no host sync).

Copies are therefore issued at the boundary, after the flush, never inside :meth:`promote`.
At a waiting boundary (``boundary(wait=True)``, the per-pass seam of :func:`drive.driver.per_pass`)
every copy in flight completes first (the host waits for its event; ``stats.wait_s``): a copy
issued at one boundary is servable from the next whatever its timing, so decisions do not
depend on when copies land.
The :class:`Streams` protocol is the only contact with CUDA: :class:`CudaStreams` on a GPU,
:class:`SyncStreams` (everything at once) on the CPU, and a scripted fake in the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from moebits.core.keys import ExpertKey
from moebits.core.slabs import Refusal
from moebits.drive.context import precision_order
from moebits.runtime.pool import DevicePool
from moebits.runtime.residency import ResidencyTable

RowFn = Callable[[ExpertKey, str], torch.Tensor]  # the packed host bytes of an expert copy


class Streams(Protocol):
    """Where copies and fences run (see the module docstring)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any | None) -> Any:
        """Enqueue ``dst <- src`` on the copy stream once ``after`` (a fence, or None) fired; its event."""

    def fence(self) -> Any:
        """An event on the compute stream after everything enqueued so far."""

    def done(self, event: Any) -> bool:
        """Whether ``event`` has fired (never waits)."""

    def wait(self, event: Any) -> None:
        """Work enqueued on the compute stream from now on starts after ``event`` (a device-side wait)."""


class SyncStreams:
    """CPU: copies run at once, events are always done."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any | None) -> Any:
        dst.copy_(src)
        return None

    def fence(self) -> Any:
        return None

    def done(self, event: Any) -> bool:
        return True

    def wait(self, event: Any) -> None:
        return None


class CudaStreams:
    """A dedicated copy stream; fences on the current (compute) stream. (Copies in 1 MiB pieces were tried
    against the copy bubble, benchmarks/copy_bubble.sh: no change on the H200; one copy each.)"""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any | None) -> Any:
        if after is not None:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def fence(self) -> Any:
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def done(self, event: Any) -> bool:
        return event is None or bool(event.query())

    def wait(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)


@dataclass
class MoverStats:
    """Traffic and table writes (what a policy asked for, and refusals, are the driver's counts)."""

    h2d_bytes: int = 0
    applied: int = 0       # table entries written
    wait_s: float = 0.0    # host seconds waiting for copies at waiting boundaries


@dataclass
class Copy:
    """One promotion's copy: its slab, its place ``seq`` in the copy stream (FIFO), its event."""

    key: ExpertKey
    precision: str
    slab: int
    seq: int
    event: Any = None
    issued: bool = False


@dataclass
class ExpertMover:
    """Carries out PROMOTE/DEMOTE for a table-driven step; see the module docstring."""

    pool: DevicePool
    table: ResidencyTable
    rows: RowFn
    streams: Streams
    stats: MoverStats = field(default_factory=MoverStats)
    _queued: list[Copy] = field(default_factory=list)
    _flying: list[Copy] = field(default_factory=list)
    _seq: int = 0
    _fence_of: dict[int, Any] = field(default_factory=dict)   # slab -> fence its next copy waits for
    _freed: list[int] = field(default_factory=list)
    _best_first: list[str] | None = None   # the pool's precisions, most bits first

    def promote(self, key: ExpertKey, precision: str) -> Refusal | None:
        """Reserve a slab for ``key`` in ``precision``; the copy is issued at the next boundary."""
        slab = self.pool.ledger.begin_load(key, precision)
        if slab.__class__ is not int:
            return slab  # type: ignore[return-value]
        self._seq += 1
        self._queued.append(Copy(key, precision, slab, self._seq))  # type: ignore[arg-type]
        return None

    def demote(self, key: ExpertKey, precision: str) -> Refusal | None:
        """Drop ``key``'s copy in ``precision``; the table falls back to its best other READY copy."""
        slab = self.pool.ledger.evict(key, precision)
        if slab.__class__ is not int:
            return slab  # type: ignore[return-value]
        self._freed.append(slab)  # type: ignore[arg-type]
        self.point_at_best(key)
        return None

    def in_flight(self) -> int:
        return len(self._queued) + len(self._flying)

    def copy_of(self, key: ExpertKey, precision: str) -> Copy | None:
        """The copy of ``key`` in ``precision`` queued or in flight, if any."""
        for c in (*self._flying, *self._queued):
            if c.key == key and c.precision == precision:
                return c
        return None

    def boundary(self, wait: bool = False) -> list[ExpertKey]:
        """Between two steps: finish completed copies (with ``wait``, every copy in flight: the host
        waits for those not done), write the table, fence freed slabs, issue copies.

        Returns the experts whose promoted copy became servable at this boundary."""
        if wait:
            self._wait_flying()
        ready = self._collect_done()
        self.stats.applied += len(self.table.flush())
        if self._freed:
            fence = self.streams.fence()
            for slab in self._freed:
                self._fence_of[slab] = fence
            self._freed.clear()
        self._issue()
        return ready

    def drain(self) -> None:
        """Issue and complete every copy (host waits; for tests and for the end of a run)."""
        while self._queued or self._flying:
            self.boundary()
            if self._flying:
                ev = self._flying[0].event
                if ev is not None:
                    ev.synchronize()

    def wait_all(self) -> None:
        """STALL: issue what is queued and make every copy servable before the next kernel (host waits)."""
        self.drain()

    # ---- internals
    def _wait_flying(self) -> None:
        t0 = time.perf_counter()
        for c in self._flying:
            while not self.streams.done(c.event):
                c.event.synchronize()
        self.stats.wait_s += time.perf_counter() - t0

    def _collect_done(self) -> list[ExpertKey]:
        ready, left = [], []
        for c in self._flying:
            if self.streams.done(c.event):
                self.pool.ledger.finish_load(c.slab)
                self.point_at_best(c.key)
                ready.append(c.key)
            else:
                left.append(c)
        self._flying = left
        return ready

    def _issue(self) -> None:
        for c in self._queued:
            dst = self.pool.slab_bytes(c.slab)
            src = self.rows(c.key, c.precision)
            c.event = self.streams.copy(dst, src, self._fence_of.pop(c.slab, None))
            c.issued = True
            self.stats.h2d_bytes += dst.numel()
            self._flying.append(c)
        self._queued.clear()

    def point_at_best(self, key: ExpertKey) -> None:
        """Stage the table entry of ``key`` to its highest-precision READY copy (if any)."""
        ledger = self.pool.ledger
        if self._best_first is None:
            self._best_first = precision_order(ledger.precisions())   # channel mixes by effective bits
        for p in self._best_first:
            if ledger.is_ready(key, p):
                slab = ledger.slab_of(key, p)
                assert slab is not None
                self.table.stage(key.layer, key.expert, *self.pool.slot(slab))
                return
        self.table.clear(key.layer, key.expert)
