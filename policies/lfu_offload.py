"""lfu_offload: a one-precision expert cache in HBM with least-frequently-used eviction.

The frequency counterpart of ``lru_offload`` (same demand fetch, same STALL rule, same slab
plan and initial fill; see :class:`policies.lru_offload.OffloadCache`): on a miss it evicts
the cached expert used in the fewest layer steps so far, counting the whole history of the
replay (uses while the expert was not cached count too, and survive its eviction), ties
broken by recency (the least recently used goes first; initially loaded experts count as
used in fill order, before any step). It models the "hot experts stay" heuristics of
expert-caching systems in their simplest, hotness-only form.

The victim comes from a lazy min-heap of ``(uses, last use, flat id)``: each use pushes a
fresh entry and stale ones are skipped when popped, so a step costs O(needed log cached);
the heap is rebuilt when stale entries outnumber live ones fourfold.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

from moebits.core.slabs import SlabLedger
from moebits.policies.base import LayerObs, register_policy
from moebits.policies.lru_offload import OffloadCache, OffloadCacheConfig


@dataclass
class LfuOffloadConfig(OffloadCacheConfig):
    """Knobs of :class:`LfuOffload` (see :class:`policies.lru_offload.OffloadCacheConfig`)."""

    name: ClassVar[str] = "lfu_offload"


@register_policy(LfuOffloadConfig)
class LfuOffload(OffloadCache):
    """Evict the least frequently used cached expert, ties by recency."""

    def _reset(self) -> None:
        self._uses: dict[int, int] = {}  # whole-history use counts, cached or not
        self._last: dict[int, int] = {}  # tick of the last use (or of the initial fill)
        self._tick = 0
        self._resident: set[int] = set()
        self._heap: list[tuple[int, int, int]] = []

    def _use(self, keys: list[int], obs: LayerObs) -> list[int]:
        uses, last, resident, heap = self._uses, self._last, self._resident, self._heap
        tick, misses = self._tick, []
        for k in keys:
            tick += 1
            n = uses.get(k, 0) + 1
            uses[k] = n
            last[k] = tick
            if k in resident:
                heapq.heappush(heap, (n, tick, k))
            else:
                misses.append(k)
        self._tick = tick
        if len(heap) > 4 * len(resident) + 64:
            self._compact()
        return misses

    def _admit(self, k: int) -> None:
        if k not in self._last:  # initial fill: recency by fill order
            self._tick += 1
            self._last[k] = self._tick
        self._resident.add(k)
        heapq.heappush(self._heap, (self._uses.get(k, 0), self._last[k], k))

    def _compact(self) -> None:
        """Rebuild the heap from the live entries only."""
        self._heap = [(self._uses.get(r, 0), self._last[r], r) for r in self._resident]
        heapq.heapify(self._heap)

    def _pop_victim(self, needed: set[int], res: SlabLedger, obs: LayerObs) -> int:
        heap, skipped = self._heap, []
        victim = -1
        while heap:
            entry = heapq.heappop(heap)
            n, t, k = entry
            if k not in self._resident or self._last[k] != t or self._uses.get(k, 0) != n:
                continue  # stale
            if self.evictable(k, needed, res):
                victim = k
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if victim < 0:
            raise self.no_victim(obs)
        self._resident.discard(victim)
        return victim

    def _forget(self, k: int) -> None:
        self._resident.discard(k)

    def cached(self) -> list[int]:
        return sorted(self._resident)
