"""lru_offload: a one-precision expert cache in HBM with least-recently-used eviction.

Models Mixtral-offloading (Eliseev & Mazur, 2023, "Fast inference of MoE language models
with offloading"): every expert lives in host memory; HBM holds as many experts as the budget
allows at one precision; a needed expert that is neither cached nor loading is fetched on
demand while the layer waits (``MissRule.STALL``), evicting the least recently used cached
expert that the current layer step does not need. Two differences from that system: the
cache is one slab pool shared by all layers (Mixtral-offloading keeps k slots per layer),
and there is no speculative prefetch.

This module also holds :class:`OffloadCache`, the demand-fetch mechanics shared with
``lfu_offload`` and ``oracle`` (they differ only in the victim they pick):

- slab plan: one class at ``cfg.precision``, as many slabs as fit the budget (at most one
  per expert). A cache smaller than ``top_k`` experts cannot serve even one token, so
  :meth:`OffloadCache.slab_plan` raises; a layer step (a batch) that needs more distinct
  experts than the cache holds raises a ValueError in ``on_layer_step`` naming the step
  (under STALL, every needed expert must be cached at once).
- initial fill (``cfg.initial_fill``): AUTO takes the most routed experts of the profiling
  trace when the engine gives one, else ROUND_ROBIN (expert 0 of every layer, then expert 1
  of every layer, ...); EMPTY starts cold. Fill order is the initial recency order (the
  first loaded is evicted first; with a profile, the least popular is loaded first).
- per step: record the use of every needed expert, then for each miss (ascending expert id)
  take a free slab if one is left, else DEMOTE a victim and PROMOTE the miss into its slab.
  Victims are READY copies not needed by this step. Work is O(needed experts) with dicts
  keyed by the flat id ``layer * experts + expert``; the (immutable) actions are built once
  per expert in ``prepare`` and reused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np
from moebits.core.keys import ExpertKey
from moebits.core.precision import get_precision
from moebits.core.slabs import InfeasibleError, Refusal, SlabClass, SlabLedger
from moebits.policies.base import (
    Action,
    ActionKind,
    LayerObs,
    MissRule,
    Policy,
    PolicyConfig,
    PolicyContext,
    register_policy,
)
from moebits.policies.static_frequency import ranked_by_popularity
from moebits.policies.static_uniform import expert_bytes


class InitialFill(Enum):
    """Which experts a cache holds before serving starts (see the module docstring)."""

    AUTO = "auto"
    ROUND_ROBIN = "round_robin"
    POPULAR = "popular"
    EMPTY = "empty"


@dataclass
class OffloadCacheConfig(PolicyConfig):
    """Knobs shared by the demand-fetch caches: cached ``precision``, ``miss_rule``, and
    ``initial_fill``."""

    precision: str = "bf16"
    miss_rule: MissRule = MissRule.STALL
    initial_fill: InitialFill = InitialFill.AUTO


class OffloadCache(Policy):
    """A single-precision demand-fetch expert cache; subclasses choose the victim.

    Subclass hooks (flat ids ``k = layer * experts + expert``): ``_use(keys, obs)`` records
    a step's use of ``keys`` and returns those not cached; ``_admit(k)`` caches ``k``;
    ``_pop_victim(needed, res, obs)`` removes and returns the expert to evict; ``_forget(k)``
    drops ``k`` from the books; ``cached()`` lists cached ids.
    """

    def __init__(self, cfg: OffloadCacheConfig) -> None:
        get_precision(cfg.precision)
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule
        self.precision = cfg.precision

    # ---- set-up ----
    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        spec = ctx.spec
        self._experts = spec.experts
        self._n = spec.layers * spec.experts
        self._slab_bytes = expert_bytes(ctx, self.precision, self.cfg.name)
        self.capacity = min(self._n, self.slabs_that_fit(self.precision))
        self._key_of = [ExpertKey(k // spec.experts, k % spec.experts) for k in range(self._n)]
        self._promote_of = [Action(ActionKind.PROMOTE, key, self.precision) for key in self._key_of]
        self._demote_of = [Action(ActionKind.DEMOTE, key, self.precision) for key in self._key_of]
        self._reset()

    def min_capacity(self) -> int:
        """Fewest cached experts the policy can work with (one token's ``top_k``)."""
        return self.ctx.spec.top_k

    def slab_plan(self) -> list[SlabClass]:
        need = self.min_capacity()
        if self.capacity < need:
            raise InfeasibleError(
                f"{self.cfg.name} at {self.precision} caches {self.capacity} experts in a budget of "
                f"{self.ctx.budget_bytes / 1e9:.3f} GB, but a layer step needs up to {need} at once "
                f"({need * self._slab_bytes / 1e9:.3f} GB); raise budget_gb or pick a lower precision"
            )
        return [SlabClass(self.precision, self._slab_bytes, self.capacity)]

    def initial_loads(self) -> list[Action]:
        keys = self._initial_keys()
        for k in keys:
            self._admit(k)
        return [self._promote_of[k] for k in keys]

    def _initial_keys(self) -> list[int]:
        """Flat ids to load before serving, first-evicted first."""
        fill, profile = self.cfg.initial_fill, self.ctx.profile
        if fill is InitialFill.EMPTY:
            return []
        if fill is InitialFill.POPULAR or (fill is InitialFill.AUTO and profile is not None):
            if profile is None:
                raise ValueError(f"{self.cfg.name}: initial_fill POPULAR needs a profiling trace")
            spec = self.ctx.spec
            top = ranked_by_popularity(profile, spec.layers, spec.experts)[: self.capacity]
            return top[::-1].tolist()
        layers = self.ctx.spec.layers
        order = np.arange(self._n).reshape(layers, self._experts).T.ravel()  # expert-major
        return order[: self.capacity].tolist()

    # ---- serving ----
    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        base = obs.layer * self._experts
        keys = [base + e for e in obs.experts.tolist()]  # flat ids
        misses = self._use(keys, obs)
        if not misses:
            return ()
        return self._fetch(misses, keys, obs, res)

    def _check_fits(self, keys: list[int], obs: LayerObs) -> None:
        if len(keys) > self.capacity:
            raise InfeasibleError(
                f"{self.cfg.name}: layer step {obs.index} (layer {obs.layer}) needs {len(keys)} experts "
                f"at once but the cache holds {self.capacity}; raise budget_gb or lower the batch size"
            )

    def _fetch(self, misses: list[int], keys: list[int], obs: LayerObs, res: SlabLedger) -> list[Action]:
        """DEMOTE/PROMOTE pairs (or a bare PROMOTE into a free slab) for each miss, in order."""
        self._check_fits(keys, obs)
        free = res.free_slabs(self.precision)
        needed = set(keys)
        actions: list[Action] = []
        for k in misses:
            if free > 0:
                free -= 1
            else:
                actions.append(self._demote_of[self._pop_victim(needed, res, obs)])
            self._admit(k)
            actions.append(self._promote_of[k])
        return actions

    def evictable(self, k: int, needed: set[int], res: SlabLedger) -> bool:
        """A cached expert may be evicted: not needed now and its copy is READY."""
        return k not in needed and res.is_ready(self._key_of[k], self.precision)

    def no_victim(self, obs: LayerObs) -> ValueError:
        return ValueError(
            f"{self.cfg.name}: nothing to evict at layer step {obs.index} (layer {obs.layer}): all "
            f"{len(self.cached())} cached experts are needed now or still loading"
        )

    def on_refused(self, action: Action, reason: Refusal) -> None:
        """A refused load leaves no copy: forget it. (Demotes only target READY copies.)"""
        if action.kind != ActionKind.DEMOTE and reason in (Refusal.NO_FREE_SLAB, Refusal.UNKNOWN_PRECISION):
            self._forget(action.key.layer * self._experts + action.key.expert)

    # ---- hooks ----
    def _reset(self) -> None:
        raise NotImplementedError

    def _use(self, keys: list[int], obs: LayerObs) -> list[int]:
        raise NotImplementedError

    def _admit(self, k: int) -> None:
        raise NotImplementedError

    def _pop_victim(self, needed: set[int], res: SlabLedger, obs: LayerObs) -> int:
        raise NotImplementedError

    def _forget(self, k: int) -> None:
        raise NotImplementedError

    def cached(self) -> list[int]:
        """Flat ids of the cached experts (for tests and snapshots)."""
        raise NotImplementedError


@dataclass
class LruOffloadConfig(OffloadCacheConfig):
    """Knobs of :class:`LruOffload` (see :class:`OffloadCacheConfig`)."""

    name: ClassVar[str] = "lru_offload"


@register_policy(LruOffloadConfig)
class LruOffload(OffloadCache):
    """Evict the least recently used cached expert; see the module docstring."""

    def _reset(self) -> None:
        self._lru: OrderedDict[int, None] = OrderedDict()  # least recent first

    def _use(self, keys: list[int], obs: LayerObs) -> list[int]:
        lru, misses = self._lru, []
        for k in keys:
            if k in lru:
                lru.move_to_end(k)
            else:
                misses.append(k)
        return misses

    def _admit(self, k: int) -> None:
        self._lru[k] = None

    def _fetch(self, misses: list[int], keys: list[int], obs: LayerObs, res: SlabLedger) -> list[Action]:
        """As :meth:`OffloadCache._fetch`, with all victims found in one pass over the LRU order
        (the same ones: an admitted miss is needed now, so never a victim of this step)."""
        if len(keys) > self.capacity:
            self._check_fits(keys, obs)
        free = res.free_slabs(self.precision)
        lru, promote_of = self._lru, self._promote_of
        if len(misses) <= free:
            for k in misses:
                lru[k] = None
            return [promote_of[k] for k in misses]
        victims = self._victims(len(misses) - free, set(keys), res, obs)
        actions = [promote_of[k] for k in misses[:free]]
        demote_of = self._demote_of
        for v, k in zip(victims, misses[free:], strict=True):
            del lru[v]
            actions.append(demote_of[v])
            actions.append(promote_of[k])
        for k in misses:
            lru[k] = None
        return actions

    def _victims(self, n: int, needed: set[int], res: SlabLedger, obs: LayerObs) -> list[int]:
        """The ``n`` least recently used evictable experts, least recent first."""
        is_ready, key_of, precision = res.is_ready, self._key_of, self.precision
        victims: list[int] = []
        for k in self._lru:
            if k not in needed and is_ready(key_of[k], precision):
                victims.append(k)
                if len(victims) == n:
                    return victims
        raise self.no_victim(obs)

    def _pop_victim(self, needed: set[int], res: SlabLedger, obs: LayerObs) -> int:
        k = self._victims(1, needed, res, obs)[0]
        del self._lru[k]
        return k

    def _forget(self, k: int) -> None:
        self._lru.pop(k, None)

    def cached(self) -> list[int]:
        return list(self._lru)
