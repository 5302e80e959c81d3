"""oracle: Belady's optimal replacement with bypass for the one-precision expert cache.

The bound every online cache policy is measured against. Same mechanics as ``lru_offload``
(one precision, demand fetch, ``MissRule.STALL``, same scope, staging, slab plan; see
:mod:`policies.offload_cache`), but it reads the replay's own future routing (``ctx.future``,
so ``needs_future`` is true). A step's needed experts are all served (hits from the cache,
misses copied in); what it chooses is which misses stay cached and which cached experts go:

- with a staging slab (``staging_experts`` > 0), Belady *with bypass*: experts are ordered by
  their *future*, the steps at which they are used after this one, compared
  lexicographically (the sooner next use first; on equal next uses the sooner use after
  that, and so on; a future that ends comes after any that goes on; equal futures to the
  lower flat id). The misses, soonest future first, each take a free slot of their pool if
  one is left, else replace the pool's cached expert not needed by this step with the
  latest future, but only if that comes strictly after the miss's own; otherwise the miss,
  and every later one, is streamed through the staging slab and dropped. By next use alone
  this is Belady's rule (1966, "A study of replacement algorithms for a virtual-storage
  computer"); the later uses break its ties, which matter here because a step needs a set
  of experts at once and its hits stay cached while they are served (only a step's own
  misses can be admitted, into slots of experts it does not need): of two experts next
  needed together, only the cached one will be a hit, and it stays. The tests check that
  this equals a brute-force optimum on small cases and never misses more than LRU or LFU
  with the same pools; no proof is claimed beyond that.
- without one (``staging_experts: 0``), every miss must be cached: misses in ascending id each
  evict the farthest-used cached expert not needed now (Belady under demand fetching).

Initial fill AUTO takes, per pool, the first distinct experts of the future, which is optimal
when initial loads are free; the other fills behave as in ``lru_offload``.

Next-use indices, and the ranks of the futures (prefix doubling over each expert's chain of
uses, :func:`future_ranks`), are precomputed with numpy in ``prepare`` (one array entry per
routed expert of the future); at run time a lazy max-heap per pool of ``(-key, flat id)``
gives the victim, so a step costs O(needed log cached).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from moebits.core.slabs import SlabLedger
from moebits.policies.base import Action, LayerObs, PolicyContext, register_policy
from moebits.policies.offload_cache import InitialFill, OffloadCache, OffloadCacheConfig


@dataclass
class OracleConfig(OffloadCacheConfig):
    """Knobs of :class:`Oracle` (see :class:`policies.offload_cache.OffloadCacheConfig`)."""

    name: ClassVar[str] = "oracle"


def next_use_steps(flat: np.ndarray, step_of: np.ndarray, never: int) -> np.ndarray:
    """For each entry, the layer step of the next entry with the same flat id (``never`` if none).

    ``flat`` and ``step_of`` are per-entry flat expert ids and layer steps, in replay order."""
    order = np.argsort(flat, kind="stable")  # by id, then by step
    same = flat[order[1:]] == flat[order[:-1]]
    nxt = np.full(flat.shape[0], never, dtype=np.int64)
    nxt[order[:-1]] = np.where(same, step_of[order[1:]], never)
    return nxt


def future_ranks(flat: np.ndarray, step_of: np.ndarray, ids: int) -> np.ndarray:
    """Per entry, then per id (a virtual entry before step 0): the rank of its future, the
    ascending steps at which its id is used after it, compared lexicographically (sooner
    first; a future that ends ranks after any that goes on). Equal futures, equal ranks.

    Prefix doubling: after round r, ranks order the first 2**r uses of each future."""
    X = flat.shape[0]
    flat_all = np.concatenate([flat, np.arange(ids, dtype=np.int64)])
    step_all = np.concatenate([step_of, np.full(ids, -1, dtype=np.int64)])
    order = np.lexsort((step_all, flat_all))  # by id, then by step (virtual entries first)
    same = flat_all[order[1:]] == flat_all[order[:-1]]
    jump = np.full(X + ids, -1, dtype=np.int64)
    jump[order[:-1]] = np.where(same, order[1:], -1)  # the id's next entry
    ended = int(step_of.max(initial=0)) + 1
    rank = np.where(jump >= 0, step_all[np.maximum(jump, 0)], ended)
    while (jump >= 0).any():
        second = np.where(jump >= 0, rank[np.maximum(jump, 0)], X + ids + ended + 1)
        order = np.lexsort((second, rank))
        new = np.r_[True, (rank[order][1:] != rank[order][:-1]) | (second[order][1:] != second[order][:-1])]
        rank = np.empty_like(rank)
        rank[order] = np.cumsum(new) - 1
        jump = np.where(jump >= 0, jump[np.maximum(jump, 0)], -1)
    return rank


@register_policy(OracleConfig)
class Oracle(OffloadCache):
    """Belady with bypass (or, without staging, under demand fetching); see the module docstring."""

    needs_future: ClassVar[bool] = True

    def prepare(self, ctx: PolicyContext) -> None:
        if ctx.future is None:
            raise ValueError("oracle needs the replay's future routing (the engine passed none)")
        fut, spec = ctx.future, ctx.spec
        sizes = np.diff(fut.offsets)
        if fut.layer_steps and (int(fut.ls_layer.max()) >= spec.layers or int(fut.ex_expert.max()) >= spec.experts):
            raise ValueError(f"oracle: the future routing names experts outside {spec.name}'s layers x experts")
        self._never = fut.layer_steps + 1
        step_of = np.repeat(np.arange(fut.layer_steps, dtype=np.int64), sizes)
        self._flat = np.repeat(fut.ls_layer.astype(np.int64), sizes) * spec.experts + fut.ex_expert
        n_ids = spec.layers * spec.experts
        if self.cfg.staging_experts:  # bypass: order by the whole future (module docstring)
            ranks = future_ranks(self._flat, step_of, n_ids)
            self._next, self._start_key = ranks[: self._flat.shape[0]], ranks[self._flat.shape[0]:]
        else:
            self._next = next_use_steps(self._flat, step_of, self._never)
        self._max_needed = int(sizes.max()) if sizes.size else 0
        self._offsets: list[int] = fut.offsets.tolist()
        self._layer_of: list[int] = fut.ls_layer.tolist()
        ids, first = np.unique(self._flat, return_index=True)
        self._first_use = np.full(n_ids, self._never, dtype=np.int64)
        self._first_use[ids] = step_of[first]
        if self.cfg.staging_experts:
            self._first_use = self._start_key
        self._first_order = ids[np.argsort(first, kind="stable")]  # distinct ids by first use
        super().prepare(ctx)

    def min_capacity(self) -> int:
        """The most distinct experts any step of the future needs at once."""
        return max(self.ctx.spec.top_k, self._max_needed)

    def _initial_ranking(self) -> tuple[list[int], bool]:
        if self.cfg.initial_fill is InitialFill.AUTO:
            return self._first_order.tolist(), False
        return super()._initial_ranking()

    def _reset(self) -> None:
        self._resident: dict[int, int] = {}  # flat id -> its next use
        self._heap: list[list[tuple[int, int]]] = [[] for _ in self._cap]
        self._now: dict[int, int] = {}  # next use of this step's experts
        self._victim_next = 0  # next use of the victim last popped

    def _use(self, keys: list[int], obs: LayerObs) -> list[int]:
        i, n = obs.index, len(keys)
        start = self._offsets[i] if 0 <= i < len(self._layer_of) else -1
        if start < 0 or self._offsets[i + 1] - start != n or self._layer_of[i] != obs.layer:
            raise ValueError(f"oracle: layer step {i} (layer {obs.layer}) does not match the future it was given")
        pool = obs.layer if self._per_layer else 0
        resident, heap, misses = self._resident, self._heap[pool], []
        self._now = dict(zip(keys, self._next[start : start + n].tolist(), strict=True))
        for k, nxt in self._now.items():
            if k in resident:
                resident[k] = nxt
                heapq.heappush(heap, (-nxt, k))
            else:
                misses.append(k)
        if len(heap) > 4 * self._held[pool] + 64:
            self._compact(pool)
        return misses

    def _compact(self, pool: int) -> None:
        heap = [(-nu, r) for r, nu in self._resident.items() if self.pool_of(r) == pool]
        heapq.heapify(heap)
        self._heap[pool] = heap

    def _fetch(self, misses: list[int], keys: list[int], obs: LayerObs, res: SlabLedger) -> list[Action]:
        """Without staging: the demand-fetch rule of :class:`OffloadCache`. With it: Belady with
        bypass (module docstring)."""
        if not self.cfg.staging_experts:
            return super()._fetch(misses, keys, obs, res)
        pool = obs.layer if self._per_layer else 0
        free = self._cap[pool] - self._held[pool]
        now, needed = self._now, set(keys)
        actions: list[Action] = []
        for k in sorted(misses, key=lambda m: (now[m], m)):
            if free > 0:
                free -= 1
            else:
                v = self._pop_victim(pool, needed, res)
                if v < 0:
                    break
                if self._victim_next <= now[k]:  # the miss is used no sooner: keep v, bypass the rest
                    self._resident[v] = self._victim_next
                    heapq.heappush(self._heap[pool], (-self._victim_next, v))
                    break
                self._held[pool] -= 1
                actions.append(self._demote_of[v])
            self._book(k)
            actions.append(self._promote_of[k])
        return actions

    def _admit(self, k: int) -> None:
        nxt = self._now.get(k)
        if nxt is None:  # initial fill
            nxt = int(self._first_use[k])
        self._resident[k] = nxt
        heapq.heappush(self._heap[self.pool_of(k)], (-nxt, k))

    def _pop_victim(self, pool: int, needed: set[int], res: SlabLedger) -> int:
        heap, skipped = self._heap[pool], []
        victim = -1
        while heap:
            entry = heapq.heappop(heap)
            neg_next, k = entry
            if self._resident.get(k) != -neg_next:
                continue  # stale
            if self.evictable(k, needed, res):
                victim = k
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if victim >= 0:
            self._victim_next = self._resident.pop(victim)  # its next use, for the bypass test
        return victim

    def _forget(self, k: int) -> bool:
        return self._resident.pop(k, None) is not None

    def cached(self) -> list[int]:
        return sorted(self._resident)
