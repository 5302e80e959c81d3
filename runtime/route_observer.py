"""Routing seen by the host off the critical path: per-step device->host copies into pinned rings.

Dimension legend: L layers, T rows of a step, k experts per row, R ring slots.

A captured step writes every layer's routing into its buffers ``ids/weights [L, T, k]`` on the
device. After the step, :meth:`RouteObserver.record` enqueues one asynchronous copy of both into
ring slot ``step % R`` of pinned host memory and records an event: one copy per step, none per
layer, and no wait. The policy observes step ``t`` before step ``t + lag`` is served
(:meth:`RouteObserver.due`): with ``lag >= 2`` the event of step ``t`` has normally fired long
before the host asks (the host runs ahead of the device by a step at most), with ``lag = 1``
the host waits for the step just enqueued to finish. ``lag`` is the observation lag of the
policy seam; ``R > lag`` slots keep unread steps from being overwritten.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class StepRouting:
    """One step's routing as the host sees it: ``ids``/``weights [L, T, k]`` (numpy)."""

    step: int
    ids: np.ndarray
    weights: np.ndarray
    rows: int


class RouteObserver:
    """Pinned rings of routing plus their events; see the module docstring."""

    def __init__(self, layers: int, rows: int, top_k: int, lag: int, device: torch.device) -> None:
        """``rows``: the most rows a recorded step has."""
        if lag < 1:
            raise ValueError(f'"lag" must be >= 1 (a policy cannot see a step before it runs), got {lag}')
        self.lag, self.slots = lag, lag + 2
        pin = device.type == "cuda"
        shape = (self.slots, layers, rows, top_k)
        self.ids = torch.zeros(shape, dtype=torch.int32, pin_memory=pin)
        self.weights = torch.zeros(shape, dtype=torch.float32, pin_memory=pin)
        self._ids_np, self._weights_np = self.ids.numpy(), self.weights.numpy()   # the same memory
        self.cuda = pin
        self._events = [torch.cuda.Event() for _ in range(self.slots)] if pin else [None] * self.slots
        self._views: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pending: deque[tuple[int, int, Any]] = deque()   # (step, live rows, event)
        self.wait_s = 0.0

    def record(self, step: int, ids: torch.Tensor, weights: torch.Tensor, live_rows: int) -> None:
        """Enqueue the copy of a step's routing (current stream, after the step's kernels)."""
        if len(self._pending) >= self.slots:
            raise RuntimeError("route ring overrun: observe steps (due) before recording more")
        slot = step % self.slots
        key = (slot, live_rows, ids.data_ptr())
        views = self._views.get(key)
        if views is None:   # the slot's ring views and the source views, made once per (slot, rows, buffer)
            views = self._views[key] = (self._slot(self.ids, slot, live_rows), ids[:, :live_rows],
                                        self._slot(self.weights, slot, live_rows), weights[:, :live_rows])
        views[0].copy_(views[1], non_blocking=True)
        views[2].copy_(views[3], non_blocking=True)
        ev = self._events[slot]   # free: the slot's previous step was read (due) before this one was recorded
        if ev is not None:
            ev.record()
        self._pending.append((step, live_rows, ev))

    def due(self, serving: int) -> list[StepRouting]:
        """Every recorded step ``t <= serving - lag``, oldest first (waits for their copies if needed)."""
        out = []
        while self._pending and self._pending[0][0] <= serving - self.lag:
            step, rows, ev = self._pending.popleft()
            if ev is not None and not ev.query():
                t0 = time.perf_counter()
                ev.synchronize()
                self.wait_s += time.perf_counter() - t0
            slot = step % self.slots
            n = self._ids_np.shape[1] * rows * self._ids_np.shape[3]
            shape = (self._ids_np.shape[1], rows, self._ids_np.shape[3])
            out.append(StepRouting(step, self._ids_np[slot].reshape(-1)[:n].reshape(shape).copy(),
                                   self._weights_np[slot].reshape(-1)[:n].reshape(shape).copy(), rows))
        return out

    @staticmethod
    def _slot(ring: torch.Tensor, slot: int, rows: int) -> torch.Tensor:
        """Slot ``slot`` as a contiguous ``[L, rows, k]`` view (a pinned, contiguous copy target:
        an asynchronous device-to-host copy into a strided view would go through pageable memory)."""
        L, _, k = ring.shape[1:]
        return ring[slot].view(-1)[: L * rows * k].view(L, rows, k)

    def flush(self) -> list[StepRouting]:
        """Everything recorded (end of a run)."""
        return self.due(1 << 62)


def routing_of(ids: torch.Tensor, weights: torch.Tensor, experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct experts ascending, tokens routed to each, their summed gate weight) of ``ids [T, k]``."""
    e = ids.reshape(-1).to("cpu", torch.int64).numpy()
    w = weights.reshape(-1).to("cpu", torch.float64).numpy()
    counts = np.bincount(e, minlength=experts)
    used = np.flatnonzero(counts)
    gate = np.bincount(e, weights=w, minlength=experts)[used]
    return used.astype(np.int16), counts[used].astype(np.int32), gate.astype(np.float32)
