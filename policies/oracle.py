"""oracle: Belady's optimal eviction for the one-precision expert cache.

The bound every online cache policy is measured against. Same mechanics as ``lru_offload``
(one precision, demand fetch, ``MissRule.STALL``, same slab plan; see
:class:`policies.lru_offload.OffloadCache`), but it reads the replay's own future routing
(``ctx.future``, so ``needs_future`` is true) and on a miss evicts the cached expert, not
needed by the current step, whose next use lies farthest ahead (never-used-again first; ties
to the lower flat id). Under demand fetching (load only what the current step needs, evict
only to make room) this minimises the number of misses (Belady 1966, "A study of replacement
algorithms for a virtual-storage computer"; the exchange argument carries over to steps that
need a set of experts at once, with that set protected).

Initial fill AUTO takes the first ``capacity`` distinct experts of the future, which is
optimal when initial loads are free; the other fills behave as in ``lru_offload``.

Next-use indices are precomputed with numpy in ``prepare`` (one array entry per routed
expert of the future); at run time a lazy max-heap of ``(-next use, flat id)`` gives the
victim, so a step costs O(needed log cached).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from moebits.core.slabs import SlabLedger
from moebits.policies.base import LayerObs, PolicyContext, register_policy
from moebits.policies.lru_offload import InitialFill, OffloadCache, OffloadCacheConfig


@dataclass
class OracleConfig(OffloadCacheConfig):
    """Knobs of :class:`Oracle` (see :class:`policies.lru_offload.OffloadCacheConfig`)."""

    name: ClassVar[str] = "oracle"


def next_use_steps(flat: np.ndarray, step_of: np.ndarray, never: int) -> np.ndarray:
    """For each entry, the layer step of the next entry with the same flat id (``never`` if none).

    ``flat`` and ``step_of`` are per-entry flat expert ids and layer steps, in replay order."""
    order = np.argsort(flat, kind="stable")  # by id, then by step
    same = flat[order[1:]] == flat[order[:-1]]
    nxt = np.full(flat.shape[0], never, dtype=np.int64)
    nxt[order[:-1]] = np.where(same, step_of[order[1:]], never)
    return nxt


@register_policy(OracleConfig)
class Oracle(OffloadCache):
    """Evict the cached expert whose next use is farthest in the future (Belady)."""

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
        self._next = next_use_steps(self._flat, step_of, self._never)
        self._max_needed = int(sizes.max()) if sizes.size else 0
        self._offsets: list[int] = fut.offsets.tolist()
        self._layer_of: list[int] = fut.ls_layer.tolist()
        ids, first = np.unique(self._flat, return_index=True)
        self._first_use = np.full(spec.layers * spec.experts, self._never, dtype=np.int64)
        self._first_use[ids] = step_of[first]
        self._first_order = ids[np.argsort(first, kind="stable")]  # distinct ids by first use
        super().prepare(ctx)

    def min_capacity(self) -> int:
        """The most distinct experts any step of the future needs at once."""
        return max(self.ctx.spec.top_k, self._max_needed)

    def _initial_keys(self) -> list[int]:
        if self.cfg.initial_fill is InitialFill.AUTO:
            return self._first_order[: self.capacity].tolist()
        return super()._initial_keys()

    def _reset(self) -> None:
        self._resident: dict[int, int] = {}  # flat id -> its next use
        self._heap: list[tuple[int, int]] = []
        self._now: dict[int, int] = {}  # next use of this step's experts

    def _use(self, keys: list[int], obs: LayerObs) -> list[int]:
        i, n = obs.index, len(keys)
        start = self._offsets[i] if 0 <= i < len(self._layer_of) else -1
        if start < 0 or self._offsets[i + 1] - start != n or self._layer_of[i] != obs.layer:
            raise ValueError(f"oracle: layer step {i} (layer {obs.layer}) does not match the future it was given")
        resident, heap, misses = self._resident, self._heap, []
        self._now = dict(zip(keys, self._next[start : start + n].tolist(), strict=True))
        for k, nxt in self._now.items():
            if k in resident:
                resident[k] = nxt
                heapq.heappush(heap, (-nxt, k))
            else:
                misses.append(k)
        if len(heap) > 4 * len(resident) + 64:
            self._heap = [(-nu, r) for r, nu in resident.items()]
            heapq.heapify(self._heap)
        return misses

    def _admit(self, k: int) -> None:
        nxt = self._now.get(k)
        if nxt is None:  # initial fill
            nxt = int(self._first_use[k])
        self._resident[k] = nxt
        heapq.heappush(self._heap, (-nxt, k))

    def _pop_victim(self, needed: set[int], res: SlabLedger, obs: LayerObs) -> int:
        heap, skipped = self._heap, []
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
        if victim < 0:
            raise self.no_victim(obs)
        del self._resident[victim]
        return victim

    def _forget(self, k: int) -> None:
        self._resident.pop(k, None)

    def cached(self) -> list[int]:
        return sorted(self._resident)
