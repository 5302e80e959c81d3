"""hobbit: a high-precision expert cache that fetches low-precision copies of less critical misses.

Models HOBBIT (Liu et al., "HOBBIT: A Mixed Precision Expert Offloading System for Fast
MoE Inference", arXiv 2411.01433): experts are cached in HBM at high precision; on a cache
miss, an expert that matters little to the current token (small gate weight) is fetched as
a low-precision copy instead of the full one, so the layer stalls only for the small copy;
and the next layer's likely experts are prefetched from the current routing. Here:

- pool: two LRU caches (:class:`policies._lru.TieredCache`), a high class and a low class
  (low-precision copies fetched on misses must live somewhere): ``low_budget_share`` of the
  budget (less the staging slab) goes to low copies, the rest to high ones; with ``scope``
  LAYER (the default, as HOBBIT keeps it) each class is split evenly into a cache per layer,
  with GLOBAL each class is one pool for all layers;
- bypass: with ``staging_experts`` > 0, that many high-precision slots are set aside as a
  staging slab; a miss that finds no room in its pool (every cached copy there is needed by
  the step) is streamed through it and dropped, instead of an error;
- criticality of a needed expert: MEAN_GATE = its summed gate weight over the tokens routed
  to it (the mean gate per token), SUM_GATE = its summed gate over the step's tokens; it is
  critical when that reaches ``critical_gate / top_k`` (1.0 = the average gate);
- hit: a high copy, or a low copy of a non-critical expert. Miss: a critical expert is
  fetched at high precision, a non-critical one at low; the victim is the least recently
  used READY copy of that class not needed by the step (the other class is tried when one
  is full of needed experts). The step waits for the copy (``miss_rule`` STALL);
- prefetch: after the demand fetches, the ``prefetch_count`` experts predicted for the next
  layer (:class:`policies._lookahead.NextLayerPredictor` from the profile's layer-l -> l+1
  co-occurrence, or the same expert ids with SAME_EXPERTS) are prefetched at high precision
  if their mean gate per token in the profile (or, with SAME_EXPERTS, in this step) is
  critical, else at low. :meth:`Hobbit.metrics` reports prefetches issued and used.

Assumptions (knobs): the cache split, the gate threshold and its measure, LRU replacement
in both caches (HOBBIT's multidimensional cache policy is richer), the predictor (HOBBIT
predicts with the next layer's gate on the current hidden state, which a trace cannot
replay), and the initial fill (the profile's most routed experts at high precision).
HOBBIT's option of skipping very unimportant experts is not modelled: engines compute every
routed expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np
from moebits.core.keys import ExpertKey
from moebits.core.precision import get_precision
from moebits.core.slabs import InfeasibleError, SlabClass, SlabLedger
from moebits.policies._lookahead import NextLayerPredictor, Predictor, PrefetchStats
from moebits.policies._lru import CachedPrefetchBooks, TieredCache
from moebits.policies._tables import profile_mean_gate
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
from moebits.policies.offload_cache import CacheScope
from moebits.policies.static_uniform import expert_bytes


class Criticality(Enum):
    """How hobbit measures an expert's importance to the current step (module docstring)."""

    MEAN_GATE = "mean_gate"
    SUM_GATE = "sum_gate"


@dataclass
class HobbitConfig(PolicyConfig):
    """Knobs of :class:`Hobbit`; see the module docstring. ``prefetch_count`` 0 means the
    model's top-k (and no prefetch when ``prefetch`` is false); ``top_m`` 0 means twice it."""

    name: ClassVar[str] = "hobbit"
    high_precision: str = "bf16"
    low_precision: str = "int4"
    low_budget_share: float = 0.25
    critical_gate: float = 1.0
    criticality: Criticality = Criticality.MEAN_GATE
    prefetch: bool = True
    predictor: Predictor = Predictor.COOCCURRENCE
    prefetch_count: int = 0
    top_m: int = 0
    prefetch_evicts: bool = True
    initial_fill: bool = True
    miss_rule: MissRule = MissRule.STALL
    scope: CacheScope = CacheScope.LAYER
    staging_experts: int = 2


@register_policy(HobbitConfig)
class Hobbit(CachedPrefetchBooks, Policy):
    """High-precision LRU cache, low-precision fetch for non-critical misses, prefetch."""

    needs_profile: ClassVar[bool] = True

    def __init__(self, cfg: HobbitConfig) -> None:
        hi, lo = get_precision(cfg.high_precision), get_precision(cfg.low_precision)
        if hi.effective_bits <= lo.effective_bits:
            raise ValueError(f"hobbit: high_precision {hi.name} must have more bits than low_precision {lo.name}")
        if not 0.0 <= cfg.low_budget_share < 1.0:
            raise ValueError(f'hobbit: "low_budget_share" must be in [0, 1), got {cfg.low_budget_share}')
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule
        self.hi, self.lo = hi.name, lo.name
        self.bits = {hi.name: hi.effective_bits, lo.name: lo.effective_bits}
        self._critical_order, self._plain_order = [hi.name, lo.name], [lo.name, hi.name]

    # ---- set-up ----
    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        spec, cfg = ctx.spec, self.cfg
        self._E, n = spec.experts, spec.layers * spec.experts
        self._key_of = [ExpertKey(k // spec.experts, k % spec.experts) for k in range(n)]
        self._bytes = {p: expert_bytes(ctx, p, cfg.name) for p in (self.hi, self.lo)}
        budget = max(0, ctx.budget_bytes - cfg.staging_experts * self._bytes[self.hi])
        low_bytes = int(cfg.low_budget_share * budget)
        capacity = {self.hi: min(n, (budget - low_bytes) // self._bytes[self.hi]),
                    self.lo: min(n, low_bytes // self._bytes[self.lo])}
        if capacity[self.hi] + capacity[self.lo] < spec.top_k and not cfg.staging_experts:
            raise InfeasibleError(f"hobbit: the budget of {ctx.budget_bytes / 1e9:.3f} GB caches fewer experts than "
                             f"one token's top-{spec.top_k}; raise budget_gb or low_budget_share")
        per_layer = cfg.scope is CacheScope.LAYER
        self.cache = TieredCache(capacity, self._key_of, self.bits, spec.layers if per_layer else 1, spec.experts)
        self.stats = PrefetchStats(spec.layers)
        self._threshold = cfg.critical_gate / spec.top_k
        self._count = cfg.prefetch_count or spec.top_k
        self._mean_gate = (None if ctx.profile is None
                           else profile_mean_gate(ctx.profile, spec.layers, self._E).tolist())
        self.predictor = self._fit_predictor()

    def _fit_predictor(self) -> NextLayerPredictor | None:
        spec, cfg = self.ctx.spec, self.cfg
        if not cfg.prefetch or cfg.predictor is Predictor.SAME_EXPERTS:
            return None
        if self.ctx.profile is None:
            raise ValueError("hobbit: the co-occurrence predictor needs a profiling trace (ctx.profile); the "
                             "engine passed none (set predictor: SAME_EXPERTS or prefetch: false)")
        return NextLayerPredictor.fit(self.ctx.profile, spec.layers, spec.experts, cfg.top_m or 2 * spec.top_k)

    def slab_plan(self) -> list[SlabClass]:
        return [SlabClass(p, self._bytes[p], self.cache.capacity[p]) for p in (self.hi, self.lo)
                if self.cache.capacity[p] > 0 or (p == self.hi and self.cfg.staging_experts)]

    def staging(self) -> SlabClass | None:
        """``staging_experts`` high-precision slots for bypassed misses (None if 0)."""
        n = self.cfg.staging_experts
        return SlabClass(self.hi, self._bytes[self.hi], n) if n else None

    def initial_loads(self) -> list[Action]:
        profile = self.ctx.profile
        if not self.cfg.initial_fill or profile is None:
            return []
        spec = self.ctx.spec
        counts = profile.counts(spec.layers, spec.experts).ravel()
        left, top = list(self.cache.cap[self.hi]), []  # free slots per pool
        for k in np.argsort(-counts, kind="stable").tolist():
            if not counts[k]:
                break
            if left[self.cache.pool(k)] > 0:
                left[self.cache.pool(k)] -= 1
                top.append(k)
        for k in reversed(top):  # least popular first: evicted first
            self.cache.add(k, self.hi)
        return [Action(ActionKind.PROMOTE, self._key_of[k], self.hi) for k in reversed(top)]

    # ---- serving ----
    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        layer, experts = obs.layer, obs.experts.tolist()
        gates, tokens = obs.gate.tolist(), obs.tokens.tolist()
        crit = self._critical(gates, tokens)
        self.cache.begin_step(res)
        base = layer * self._E
        needed = [base + e for e in experts]
        protect = set(needed)
        self.stats.on_step(layer, protect)
        actions: list[Action] = []
        for k, c in zip(needed, crit, strict=True):
            self._demand(k, c, protect, res, actions, obs)
        if self.cfg.prefetch:
            self._prefetch(obs, experts, gates, crit, protect, res, actions)
        return actions

    def _critical(self, gates: list[float], tokens: list[int]) -> list[bool]:
        t = self._threshold
        if self.cfg.criticality is Criticality.MEAN_GATE:
            return [g >= t * n for g, n in zip(gates, tokens, strict=True)]
        step_tokens = max(1.0, sum(tokens) / self.ctx.spec.top_k)
        return [g >= t * step_tokens for g in gates]

    def _demand(self, k: int, critical: bool, protect: set[int], res: SlabLedger, actions: list[Action],
                obs: LayerObs) -> None:
        cache = self.cache
        have = cache.touch_best(k)
        if have == self.hi or (have is not None and not critical):
            return
        order = self._critical_order if critical else self._plain_order
        if cache.load(k, order, protect, res, actions) is None and have is None and not self.cfg.staging_experts:
            raise InfeasibleError(f"hobbit: no slab for expert {self._key_of[k]} at layer step {obs.index}: every "
                             "cached copy is needed now or loading and staging_experts is 0; raise budget_gb or "
                             "lower the batch size")

    def _prefetch(self, obs: LayerObs, experts: list[int], gates: list[float], crit: list[bool],
                  protect: set[int], res: SlabLedger, actions: list[Action]) -> None:
        layer = obs.layer
        nxt = (layer + 1) % self.ctx.spec.layers
        if self.predictor is None:
            order = sorted(range(len(experts)), key=lambda i: (-gates[i], experts[i]))[: self._count]
            guess = [(experts[i], crit[i]) for i in order]
        else:
            row = self._mean_gate[nxt] if self._mean_gate is not None else None
            guess = [(j, row is not None and row[j] >= self._threshold)
                     for j in self.predictor.predict(layer, obs.experts, obs.gate, self._count)]
        for j, critical in guess:
            k = nxt * self._E + j
            protect.add(k)
            p = self.hi if critical else self.lo
            have = self.cache.touch_best(k)
            if (have is None or self.bits[have] < self.bits[p]) and self.cache.load(
                    k, [p], protect, res, actions, ActionKind.PREFETCH, self.cfg.prefetch_evicts):
                self.stats.on_issue(nxt, k)
