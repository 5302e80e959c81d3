"""The simulated HBM slab pool: a :class:`core.slabs.SlabLedger` plus copy completion times.

The ledger keeps the books (slab classes sized from the policy's plan within the budget,
deterministic lowest-id allocation, no fragmentation, refusals instead of overflow). This
class adds what time means to them:

- a load reserves a slab at once (LOADING) and queues its copy on the host-to-device link;
  the copy's completion time is known in closed form (see :mod:`sim.link`), and the slab turns
  READY when the engine's clock passes it (:meth:`SimPool.advance`), never earlier, so no step
  can serve a half-copied slab. The link is one FIFO, so copies complete in the order they
  were queued: the pending loads are a deque, not a heap;
- mirrors of the ledger's state as per-expert bitmasks (bit ``p`` = precision index ``p`` in
  :attr:`SimPool.precisions`, highest precision first) so the engine's inner loop reads
  residency with two list lookups instead of building keys.
"""

from __future__ import annotations

from collections import deque

from core.keys import ExpertKey
from core.model_spec import ModelSpec
from core.precision import get_channel_mix, get_precision
from core.slabs import Refusal, SlabLedger
from sim.link import Link


def effective_bits(name: str) -> float:
    """Bits per weight of a precision or a registered channel mix."""
    mix = get_channel_mix(name)
    return mix.effective_bits if mix is not None else get_precision(name).effective_bits


def precision_order(names: list[str]) -> list[str]:
    """Precisions highest first (by effective bits, then name): index 0 is the best copy."""
    return sorted(names, key=lambda p: (-effective_bits(p), p))


class SimPool:
    """A slab ledger whose loads take time on ``h2d``; see the module docstring."""

    def __init__(self, ledger: SlabLedger, spec: ModelSpec, h2d: Link) -> None:
        self.ledger = ledger
        self.h2d = h2d
        self.precisions = precision_order(ledger.precisions())
        self.index = {p: i for i, p in enumerate(self.precisions)}
        self._P = len(self.precisions)
        self.slab_bytes = [ledger.classes[p].slab_bytes for p in self.precisions]
        self.experts = spec.experts
        self.ready = [[0] * spec.experts for _ in range(spec.layers)]
        self.loading = [[0] * spec.experts for _ in range(spec.layers)]
        self.done_at: dict[int, float] = {}  # (flat id * P + p) -> completion time of a LOADING copy
        self.pending: deque[tuple[float, int, int, int, int]] = deque()  # (done, slab, layer, expert, p), FIFO
        self.peak_bytes = ledger.used_bytes
        self.loaded_bytes = 0

    def place(self, key: ExpertKey, precision: str) -> int | Refusal:
        """An untimed initial load: the copy is READY at once and moves no counted bytes."""
        slab = self.ledger.begin_load(key, precision)
        if isinstance(slab, Refusal):
            return slab
        self.ledger.finish_load(slab)
        self.ready[key.layer][key.expert] |= 1 << self.index[precision]
        self.peak_bytes = max(self.peak_bytes, self.ledger.used_bytes)
        return slab

    def load(self, key: ExpertKey, precision: str, now_s: float) -> int | Refusal:
        """Reserve a slab and queue the copy at ``now_s``; the slab id, or why not."""
        slab = self.ledger.begin_load(key, precision)
        if slab.__class__ is Refusal:
            return slab
        p = self.index[precision]
        nbytes = self.slab_bytes[p]
        done = self.h2d.submit(now_s, nbytes)
        self.loaded_bytes += nbytes
        layer, expert = key
        self.loading[layer][expert] |= 1 << p
        self.done_at[(layer * self.experts + expert) * self._P + p] = done
        self.pending.append((done, slab, layer, expert, p))
        used = self.ledger.used_bytes
        if used > self.peak_bytes:
            self.peak_bytes = used
        return slab

    def evict(self, key: ExpertKey, precision: str) -> int | Refusal:
        """Drop a READY copy (the ledger refuses LOADING or absent ones)."""
        slab = self.ledger.evict(key, precision)
        if slab.__class__ is not Refusal:
            self.ready[key[0]][key[1]] &= ~(1 << self.index[precision])
        return slab

    def advance(self, now_s: float) -> None:
        """Every copy whose completion time is ``<= now_s`` turns READY, in completion order."""
        pending, ledger, P, E = self.pending, self.ledger, len(self.precisions), self.experts
        while pending and pending[0][0] <= now_s:
            _, slab, layer, expert, p = pending.popleft()
            ledger.finish_load(slab)
            bit = 1 << p
            self.loading[layer][expert] &= ~bit
            self.ready[layer][expert] |= bit
            del self.done_at[(layer * E + expert) * P + p]

    def ready_time(self, layer: int, expert: int, p: int) -> float:
        """Completion time of the LOADING copy of (layer, expert) in precision index ``p``."""
        return self.done_at[(layer * self.experts + expert) * len(self.precisions) + p]
