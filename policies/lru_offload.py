"""lru_offload: a one-precision expert cache in HBM with least-recently-used eviction.

Models Mixtral-offloading (Eliseev & Mazur, 2023, "Fast inference of MoE language models
with offloading"): every expert lives in host memory; HBM holds as many experts as the budget
allows at one precision, by default in a cache per layer (``scope: LAYER``; GLOBAL shares one
pool across layers); a needed expert that is neither cached nor loading is fetched on demand
while the layer waits (``MissRule.STALL``), evicting the least recently used cached expert of
its pool that the current layer step does not need. No speculative prefetch. The shared
mechanics (scope, staging and bypass, slab plan, initial fill) are in
:mod:`policies.offload_cache`.

Recency within a step (the tie rule): a step's hits are used first, in ascending expert id,
then its admitted misses, in ascending expert id (their copies arrive after the hits were
used); so after a step the most recent expert is the highest admitted miss, or, without
misses, the highest hit.

Admission when a step needs more than its pool holds: misses are admitted in ascending
expert id while a free slot or a victim (a cached expert this step does not need) is left;
the remaining misses are bypassed through the staging slab.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from typing import ClassVar

from moebits.core.slabs import SlabLedger
from moebits.policies.base import Action, LayerObs, register_policy
from moebits.policies.offload_cache import OffloadCache, OffloadCacheConfig


@dataclass
class LruOffloadConfig(OffloadCacheConfig):
    """Knobs of :class:`LruOffload` (see :class:`policies.offload_cache.OffloadCacheConfig`)."""

    name: ClassVar[str] = "lru_offload"


@register_policy(LruOffloadConfig)
class LruOffload(OffloadCache):
    """Evict the least recently used cached expert of the pool; see the module docstring."""

    def _reset(self) -> None:
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in self._cap]  # least recent first

    def _use(self, keys: list[int], obs: LayerObs) -> list[int]:
        lru, misses = self._lru[obs.layer if self._per_layer else 0], []
        for k in keys:
            if k in lru:
                lru.move_to_end(k)
            else:
                misses.append(k)
        return misses

    def _admit(self, k: int) -> None:
        self._lru[self.pool_of(k)][k] = None

    def _fetch(self, misses: list[int], keys: list[int], obs: LayerObs, res: SlabLedger) -> list[Action]:
        """As :meth:`OffloadCache._fetch`, with all victims found in one pass over the LRU order
        (the same ones: an admitted miss is needed now, so never a victim of this step)."""
        pool = obs.layer if self._per_layer else 0
        cap, lru, promote_of = self._cap[pool], self._lru[pool], self._promote_of
        if len(keys) > cap:
            self._check_fits(keys, obs)
        free = cap - self._held[pool]
        if len(misses) <= free:
            for k in misses:
                lru[k] = None
            self._held[pool] += len(misses)
            return [promote_of[k] for k in misses]
        # up to `need` least recently used READY experts among those this step does not need:
        # its hits were just moved to the end of the LRU order, so those are the first len(lru) - hits
        need, is_ready, key_of, precision = len(misses) - free, res.is_ready, self._key_of, self.precision
        victims: list[int] = []
        for k in islice(lru, len(lru) - (len(keys) - len(misses))):
            if is_ready(key_of[k], precision):
                victims.append(k)
                if len(victims) == need:
                    break
        else:
            self._no_room(obs)
        actions = [promote_of[k] for k in misses[:free]]
        for k in misses[:free]:
            lru[k] = None
        demote_of = self._demote_of
        for v, k in zip(victims, misses[free:], strict=False):  # misses beyond the victims: bypassed
            del lru[v]
            lru[k] = None  # a miss is no victim: the same order as deleting all victims first
            actions.append(demote_of[v])
            actions.append(promote_of[k])
        self._held[pool] += free
        return actions

    def _pop_victim(self, pool: int, needed: set[int], res: SlabLedger) -> int:
        for k in self._lru[pool]:
            if self.evictable(k, needed, res):
                del self._lru[pool][k]
                return k
        return -1

    def _forget(self, k: int) -> bool:
        return self._lru[self.pool_of(k)].pop(k, 0) is None

    def cached(self) -> list[int]:
        return [k for lru in self._lru for k in lru]
