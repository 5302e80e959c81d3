"""OffloadCache: the demand-fetch mechanics of the one-precision expert caches.

Shared by ``lru_offload``, ``lfu_offload`` and ``oracle``, which differ only in the victim
they pick (and, for the oracle, in which misses it admits). Every expert lives in host
memory; HBM holds as many experts as the budget allows at ``cfg.precision``:

- **scope** (``cfg.scope``): LAYER (the default, as Mixtral-offloading, HOBBIT, MoE-Infinity
  and llama.cpp's expert cache keep it) gives every MoE layer its own slots: the cache's
  slots are split evenly over the layers (the first ``slots % layers`` layers get one more),
  or in proportion to ``cfg.layer_shares`` (one weight per layer, largest remainders
  rounded up); no layer gets more slots than it has experts. GLOBAL keeps one pool shared by
  all layers (a victim may come from any layer).
- **staging** (``cfg.staging_experts``): that many expert slots at the cache's precision are
  set aside from the budget as a staging slab (:meth:`Policy.staging`). A needed expert the
  policy does not admit to its cache is streamed through it by the engine: copied, used by
  this step, dropped (*bypass*). Each policy states which of a step's misses it admits when
  not all fit (see its module). With ``staging_experts: 0`` there is no bypass: every needed
  expert must be cached at once, and a step that needs more than its pool holds raises.
- slab plan: one class at ``cfg.precision`` with the cache's slots (the pools are the
  policy's own books over that class). Slots = (budget - staging bytes) // expert bytes, at
  most one per expert of the model.
- initial fill (``cfg.initial_fill``): AUTO takes the most routed experts of the profiling
  trace when the engine gives one, else ROUND_ROBIN (expert 0 of every layer, then expert 1
  of every layer, ...); EMPTY starts cold. Each pool is filled up to its slots; fill order is
  the initial recency order (the first loaded is evicted first; with a profile, the least
  popular is loaded first).
- per step: record the use of every needed expert, then for each miss (ascending expert id
  unless the policy says otherwise) take a free slot of its pool if one is left, else DEMOTE
  a victim of its pool and PROMOTE the miss into its slab; a miss with neither is bypassed.
  Victims are READY copies not needed by this step. Work is O(needed experts) with dicts
  keyed by the flat id ``layer * experts + expert``; the (immutable) actions are built once
  per expert in ``prepare`` and reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import get_precision
from moebits.core.slabs import InfeasibleError, Refusal, SlabClass, SlabLedger
from moebits.policies.base import Action, ActionKind, LayerObs, MissRule, Policy, PolicyConfig, PolicyContext
from moebits.policies.static_frequency import ranked_by_popularity
from moebits.policies.static_uniform import expert_bytes


class InitialFill(Enum):
    """Which experts a cache holds before serving starts (see the module docstring)."""

    AUTO = "auto"
    ROUND_ROBIN = "round_robin"
    POPULAR = "popular"
    EMPTY = "empty"


class CacheScope(Enum):
    """LAYER: a cache per MoE layer (its own slots). GLOBAL: one pool shared by all layers."""

    LAYER = "layer"
    GLOBAL = "global"


def split_slots(slots: int, layers: int, experts: int, shares: Sequence[float] | None = None) -> list[int]:
    """``slots`` split over ``layers`` (evenly, or by ``shares``), at most ``experts`` each.

    Even: every layer gets ``slots // layers`` and the first ``slots % layers`` one more.
    Shares: ``slots * share / sum(shares)`` rounded down, the largest remainders rounded up
    (ties to the lower layer). Slots a full layer cannot take are lost (never more than the
    model's experts)."""
    if shares is None or len(shares) == 0:
        base, extra = divmod(slots, layers)
        out = [base + (1 if i < extra else 0) for i in range(layers)]
    else:
        if len(shares) != layers or min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f'"layer_shares" needs {layers} non-negative weights with a positive sum, got {list(shares)}')
        exact = [slots * s / sum(shares) for s in shares]
        out = [int(x) for x in exact]
        order = sorted(range(layers), key=lambda i: (-(exact[i] - out[i]), i))
        for i in order[: slots - sum(out)]:
            out[i] += 1
    return [min(n, experts) for n in out]


@dataclass
class OffloadCacheConfig(PolicyConfig):
    """Knobs shared by the demand-fetch caches (see :mod:`policies.offload_cache`).

    ``precision``: the cached copies' format. ``miss_rule``: STALL (wait for the copy).
    ``initial_fill``: what is cached before serving. ``scope``: LAYER (a cache per layer) or
    GLOBAL (one pool). ``layer_shares``: with LAYER, one weight per layer for splitting the
    slots (null: evenly). ``staging_experts``: expert slots of the staging slab through which
    bypassed experts stream (0: no bypass)."""

    precision: str = "bf16"
    miss_rule: MissRule = MissRule.STALL
    initial_fill: InitialFill = InitialFill.AUTO
    scope: CacheScope = CacheScope.LAYER
    layer_shares: list[float] | None = None
    staging_experts: int = 2


class OffloadCache(Policy):
    """A single-precision demand-fetch expert cache; subclasses choose the victim.

    Pools: ``pool = layer`` with LAYER scope, else 0; ``self._cap[pool]`` slots each,
    ``self._held[pool]`` of them booked. Subclass hooks (flat ids ``k = layer * experts +
    expert``): ``_use(keys, obs)`` records a step's use of ``keys`` and returns those not
    cached; ``_admit(k)`` books ``k``; ``_pop_victim(pool, needed, res)`` removes and returns
    the expert to evict, or -1 when none may go; ``_forget(k)`` drops ``k`` from the books
    (True if it was there); ``cached()`` lists cached ids.
    """

    def __init__(self, cfg: OffloadCacheConfig) -> None:
        get_precision(cfg.precision)
        if cfg.staging_experts < 0:
            raise ValueError(f'{cfg.name}: "staging_experts" must be >= 0, got {cfg.staging_experts}')
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule
        self.precision = cfg.precision
        self._per_layer = cfg.scope is CacheScope.LAYER

    # ---- set-up ----
    def per_layer_budget_bytes(self, spec: ModelSpec, experts: int) -> int:
        """The budget that gives every layer exactly ``experts`` slots, plus the staging slab."""
        if self.cfg.scope is not CacheScope.LAYER or self.cfg.layer_shares:
            raise ValueError(f"{self.cfg.name}: budget.experts needs scope LAYER split evenly")
        return (spec.layers * experts + self.cfg.staging_experts) * spec.expert_bytes(self.precision)

    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        spec = ctx.spec
        self._experts = spec.experts
        self._n = spec.layers * spec.experts
        self._slab_bytes = expert_bytes(ctx, self.precision, self.cfg.name)
        self._staging_bytes = self.cfg.staging_experts * self._slab_bytes
        self.capacity = min(self._n, max(0, ctx.budget_bytes - self._staging_bytes) // self._slab_bytes)
        if self._per_layer:
            self._cap = split_slots(self.capacity, spec.layers, spec.experts, self.cfg.layer_shares)
            self.capacity = sum(self._cap)
        else:
            self._cap = [self.capacity]
        self._held = [0] * len(self._cap)
        self._key_of = [ExpertKey(k // spec.experts, k % spec.experts) for k in range(self._n)]
        self._promote_of = [Action(ActionKind.PROMOTE, key, self.precision) for key in self._key_of]
        self._demote_of = [Action(ActionKind.DEMOTE, key, self.precision) for key in self._key_of]
        self._reset()

    def pool_of(self, k: int) -> int:
        """The pool of flat id ``k``: its layer (LAYER scope) or 0."""
        return k // self._experts if self._per_layer else 0

    def min_capacity(self) -> int:
        """Fewest experts a pool must hold without bypass (one token's ``top_k``)."""
        return self.ctx.spec.top_k

    def slab_plan(self) -> list[SlabClass]:
        need, smallest = self.min_capacity(), min(self._cap)
        if self.cfg.staging_experts == 0 and smallest < need:
            where = "a layer's cache holds" if self._per_layer else "the cache holds"
            raise InfeasibleError(
                f"{self.cfg.name} at {self.precision}: {where} {smallest} experts in a budget of "
                f"{self.ctx.budget_bytes / 1e9:.3f} GB ({self.capacity} in all), but a layer step needs up to "
                f"{need} at once ({need * self._slab_bytes / 1e9:.3f} GB) and staging_experts is 0; raise "
                "budget_gb, pick a lower precision or set staging_experts"
            )
        return [SlabClass(self.precision, self._slab_bytes, self.capacity)]

    def staging(self) -> SlabClass | None:
        """The staging slab: ``staging_experts`` slots at the cache's precision (None if 0)."""
        n = self.cfg.staging_experts
        return SlabClass(self.precision, self._slab_bytes, n) if n else None

    def initial_loads(self) -> list[Action]:
        ranked, wanted_last = self._initial_ranking()
        chosen = self._fit_pools(ranked)
        keys = chosen[::-1] if wanted_last else chosen  # first loaded = first evicted
        for k in keys:
            self._book(k)
        return [self._promote_of[k] for k in keys]

    def _fit_pools(self, ranked: list[int]) -> list[int]:
        """The first ids of ``ranked`` that fit their pool, in ``ranked`` order."""
        room, out = list(self._cap), []
        for k in ranked:
            p = self.pool_of(k)
            if room[p] > 0:
                room[p] -= 1
                out.append(k)
        return out

    def _initial_ranking(self) -> tuple[list[int], bool]:
        """Candidates for the initial fill, most wanted first, and whether the fill loads them
        in reverse (most wanted last, so evicted last)."""
        fill, profile = self.cfg.initial_fill, self.ctx.profile
        if fill is InitialFill.EMPTY:
            return [], False
        if fill is InitialFill.POPULAR or (fill is InitialFill.AUTO and profile is not None):
            if profile is None:
                raise ValueError(f"{self.cfg.name}: initial_fill POPULAR needs a profiling trace")
            spec = self.ctx.spec
            return ranked_by_popularity(profile, spec.layers, spec.experts).tolist(), True
        layers = self.ctx.spec.layers
        return np.arange(self._n).reshape(layers, self._experts).T.ravel().tolist(), False  # expert-major

    # ---- serving ----
    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        base = obs.layer * self._experts
        keys = [base + e for e in obs.experts.tolist()]  # flat ids
        misses = self._use(keys, obs)
        if not misses:
            return ()
        return self._fetch(misses, keys, obs, res)

    def _check_fits(self, keys: list[int], obs: LayerObs) -> None:
        cap = self._cap[obs.layer if self._per_layer else 0]
        if len(keys) > cap and not self.cfg.staging_experts:
            where = f"layer {obs.layer}'s cache" if self._per_layer else "the cache"
            raise InfeasibleError(
                f"{self.cfg.name}: layer step {obs.index} (layer {obs.layer}) needs {len(keys)} experts "
                f"at once but {where} holds {cap} and staging_experts is 0; raise budget_gb, lower the "
                "batch size or set staging_experts"
            )

    def _fetch(self, misses: list[int], keys: list[int], obs: LayerObs, res: SlabLedger) -> list[Action]:
        """DEMOTE/PROMOTE pairs (or a bare PROMOTE into a free slot) for each miss, in order;
        misses left without a slot are bypassed (not booked, no action)."""
        self._check_fits(keys, obs)
        pool = obs.layer if self._per_layer else 0
        free = self._cap[pool] - self._held[pool]
        needed = set(keys)
        actions: list[Action] = []
        for k in misses:
            if free > 0:
                free -= 1
            else:
                v = self._pop_victim(pool, needed, res)
                if v < 0:
                    self._no_room(obs)
                    break
                self._held[pool] -= 1
                actions.append(self._demote_of[v])
            self._book(k)
            actions.append(self._promote_of[k])
        return actions

    def _book(self, k: int) -> None:
        self._held[self.pool_of(k)] += 1
        self._admit(k)

    def _no_room(self, obs: LayerObs) -> None:
        """No victim for a miss: bypass it (and the rest) if there is a staging slab, else raise."""
        if not self.cfg.staging_experts:
            raise InfeasibleError(
                f"{self.cfg.name}: nothing to evict at layer step {obs.index} (layer {obs.layer}): all cached "
                "experts of the pool are needed now or still loading, and staging_experts is 0"
            )

    def evictable(self, k: int, needed: set[int], res: SlabLedger) -> bool:
        """A cached expert may be evicted: not needed now and its copy is READY."""
        return k not in needed and res.is_ready(self._key_of[k], self.precision)

    def on_refused(self, action: Action, reason: Refusal) -> None:
        """A refused load leaves no copy: forget it. (Demotes only target READY copies.)"""
        if action.kind != ActionKind.DEMOTE and reason in (Refusal.NO_FREE_SLAB, Refusal.UNKNOWN_PRECISION):
            k = action.key.layer * self._experts + action.key.expert
            if self._forget(k):
                self._held[self.pool_of(k)] -= 1

    # ---- hooks ----
    def _reset(self) -> None:
        raise NotImplementedError

    def _use(self, keys: list[int], obs: LayerObs) -> list[int]:
        raise NotImplementedError

    def _admit(self, k: int) -> None:
        raise NotImplementedError

    def _pop_victim(self, pool: int, needed: set[int], res: SlabLedger) -> int:
        raise NotImplementedError

    def _forget(self, k: int) -> bool:
        raise NotImplementedError

    def cached(self) -> list[int]:
        """Flat ids of the cached experts (for tests and snapshots)."""
        raise NotImplementedError
