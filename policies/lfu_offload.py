"""lfu_offload: a one-precision expert cache in HBM with least-frequently-used eviction.

The frequency counterpart of ``lru_offload`` (same demand fetch, same STALL rule, same scope,
staging, slab plan and initial fill; see :mod:`policies.offload_cache`): on a miss it evicts
the cached expert of the pool used in the fewest layer steps so far, counting the whole
history of the replay (uses while the expert was not cached count too, and survive its
eviction). Ties go to the most recent: among equal counts the least recently used is
evicted. Recency within a step (the tie rule): a step's experts are used in ascending expert
id, hits and misses alike; initially loaded experts count as used in fill order, before any
step. It models the "hot experts stay" heuristics of expert-caching systems in their
simplest, hotness-only form.

Admission when a step needs more than its pool holds: misses are admitted in ascending
expert id while a free slot or a victim (a cached expert this step does not need) is left;
the remaining misses are bypassed through the staging slab.

The victim comes from a lazy min-heap per pool of ``(uses, last use, flat id)``: each use
pushes a fresh entry and stale ones are skipped when popped, so a step costs
O(needed log cached); a pool's heap is rebuilt when stale entries outnumber live ones fourfold.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

from moebits.core.slabs import SlabLedger
from moebits.policies.base import LayerObs, register_policy
from moebits.policies.offload_cache import OffloadCache, OffloadCacheConfig


@dataclass
class LfuOffloadConfig(OffloadCacheConfig):
    """Knobs of :class:`LfuOffload` (see :class:`policies.offload_cache.OffloadCacheConfig`)."""

    name: ClassVar[str] = "lfu_offload"


@register_policy(LfuOffloadConfig)
class LfuOffload(OffloadCache):
    """Evict the least frequently used cached expert of the pool, ties by recency."""

    def _reset(self) -> None:
        self._uses: dict[int, int] = {}  # whole-history use counts, cached or not
        self._last: dict[int, int] = {}  # tick of the last use (or of the initial fill)
        self._tick = 0
        self._resident: set[int] = set()
        self._heap: list[list[tuple[int, int, int]]] = [[] for _ in self._cap]

    def _use(self, keys: list[int], obs: LayerObs) -> list[int]:
        uses, last, resident = self._uses, self._last, self._resident
        pool = obs.layer if self._per_layer else 0
        heap = self._heap[pool]
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
        if len(heap) > 4 * self._held[pool] + 64:
            self._compact(pool)
        return misses

    def _admit(self, k: int) -> None:
        if k not in self._last:  # initial fill: recency by fill order
            self._tick += 1
            self._last[k] = self._tick
        self._resident.add(k)
        heapq.heappush(self._heap[self.pool_of(k)], (self._uses.get(k, 0), self._last[k], k))

    def _compact(self, pool: int) -> None:
        """Rebuild a pool's heap from its live entries only."""
        heap = [(self._uses.get(r, 0), self._last[r], r) for r in self._resident if self.pool_of(r) == pool]
        heapq.heapify(heap)
        self._heap[pool] = heap

    def _pop_victim(self, pool: int, needed: set[int], res: SlabLedger) -> int:
        heap, skipped = self._heap[pool], []
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
        if victim >= 0:
            self._resident.discard(victim)
        return victim

    def _forget(self, k: int) -> bool:
        if k not in self._resident:
            return False
        self._resident.discard(k)
        return True

    def cached(self) -> list[int]:
        return sorted(self._resident)
