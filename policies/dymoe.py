"""dymoe: importance-aware, depth-adaptive expert precision with look-ahead prefetch.

Models DyMoE ("DyMoE: Dynamic Expert Orchestration with Mixed-Precision Quantization for
Efficient MoE Inference on Edge", 2026): experts are offloaded and fetched on demand at a
precision chosen at run time from their importance (skewed across experts), critical layers
keep a higher precision floor (sensitivity is depth-dependent), and the next layers' likely
experts are prefetched to overlap I/O with compute. Here:

- importance: an EMA per expert of its summed gate weight per step of its layer
  (:class:`policies._hotness.LayerEma`), i.e. routing frequency times mean gate weight;
- precision wanted for expert e of layer l: ``high_precision`` when its importance is at
  least ``high_ratio`` times the layer's mean importance, else the layer's floor:
  ``critical_precision`` in critical layers, ``low_precision`` elsewhere. Critical layers
  are the first ``critical_first`` and last ``critical_last`` layers (EDGES), or the
  ``critical_count`` layers with the highest mean error at ``low_precision`` in the
  sensitivity table (TABLE);
- pool: one slab class per distinct precision, each an LRU cache
  (:class:`policies._lru.TieredCache`); ``high_budget_share`` of the budget (less the staging
  slab) goes to the high class, the rest to the floor classes in proportion to the layers
  each serves; with ``scope`` LAYER (the default) each class is split into a cache per layer
  over the layers it serves (the high class over all), with GLOBAL each class is one pool;
- bypass: with ``staging_experts`` > 0, that many ``high_precision`` slots are set aside as a
  staging slab; a miss that finds no room in any class of its pool is streamed through it
  and dropped, instead of an error;
- demand fetch: a needed expert without a copy at (or above) its wanted precision is loaded
  at it, evicting the least recently used READY copy of that class not needed by the step
  (falling back to lower, then higher classes when a class is full of needed experts); the
  step waits for it (``miss_rule`` STALL); a lower copy already cached stays cached;
- look-ahead prefetch: for the next ``lookahead_layers`` layers, the ``prefetch_count``
  experts a :class:`policies._lookahead.NextLayerPredictor` trained on the profiling trace
  predicts (layer-l -> l+1 co-occurrence, gate-weighted; chained for depth > 1), or the same
  expert ids (SAME_EXPERTS), are prefetched at their wanted precision, evicting LRU copies
  not needed now when ``prefetch_evicts``. :meth:`DyMoE.metrics` reports prefetches issued,
  hits (needed by the step they were aimed at) and the hit rate.

Assumptions (the abstract gives none of these numbers, so all are knobs): the three
precisions, the importance EMA and its ratio-to-mean threshold, the budget split, the
critical-layer rule, LRU replacement, the predictor and its depth and width. Importance and
the cache start from the profile: the EMA is seeded with the profile's mean gate weight per
step and, with ``initial_fill``, each class is filled with the profile's most important
experts wanting that precision.
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
from moebits.policies._hotness import LayerEma
from moebits.policies._lookahead import NextLayerPredictor, Predictor, PrefetchStats
from moebits.policies._lru import CachedPrefetchBooks, TieredCache
from moebits.policies._tables import profile_gate_mean, stats_for
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


class CriticalLayers(Enum):
    """How dymoe picks the layers that get the higher floor."""

    EDGES = "edges"
    TABLE = "table"


@dataclass
class DyMoEConfig(PolicyConfig):
    """Knobs of :class:`DyMoE`; see the module docstring. ``prefetch_count`` 0 means the
    model's top-k; ``top_m`` 0 means twice that (successors kept per expert)."""

    name: ClassVar[str] = "dymoe"
    high_precision: str = "int8"
    critical_precision: str = "int4"
    low_precision: str = "int2"
    high_budget_share: float = 0.5
    alpha: float = 0.9
    high_ratio: float = 2.0
    critical_layers: CriticalLayers = CriticalLayers.EDGES
    critical_first: int = 1
    critical_last: int = 1
    critical_count: int = 2
    predictor: Predictor = Predictor.COOCCURRENCE
    lookahead_layers: int = 1
    prefetch_count: int = 0
    top_m: int = 0
    prefetch_evicts: bool = True
    initial_fill: bool = True
    miss_rule: MissRule = MissRule.STALL
    scope: CacheScope = CacheScope.LAYER
    staging_experts: int = 2


def layer_shares(critical: list[bool], high: str, crit: str, low: str, high_share: float) -> dict[str, float]:
    """Budget share per precision class: ``high_share`` to ``high``, the rest to the floor
    classes in proportion to the layers each one is the floor of (equal names merge)."""
    n_crit = sum(critical)
    shares = {high: high_share}
    for p, share in ((crit, n_crit / len(critical)), (low, 1.0 - n_crit / len(critical))):
        shares[p] = shares.get(p, 0.0) + (1.0 - high_share) * share
    return shares


@register_policy(DyMoEConfig)
class DyMoE(CachedPrefetchBooks, Policy):
    """Importance-aware precision, critical-layer floors, look-ahead prefetch."""

    needs_profile: ClassVar[bool] = True

    def __init__(self, cfg: DyMoEConfig) -> None:
        bits = {p: get_precision(p).effective_bits for p in (cfg.high_precision, cfg.critical_precision,
                                                              cfg.low_precision)}
        if not bits[cfg.high_precision] >= bits[cfg.critical_precision] >= bits[cfg.low_precision]:
            raise ValueError("dymoe: need high_precision >= critical_precision >= low_precision in bits")
        if not 0.0 <= cfg.high_budget_share <= 1.0 or cfg.lookahead_layers < 0:
            raise ValueError('dymoe: "high_budget_share" must be in [0, 1] and "lookahead_layers" >= 0')
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule
        self.bits = bits

    # ---- set-up ----
    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        spec, cfg = ctx.spec, self.cfg
        self._E = spec.experts
        self._key_of = [ExpertKey(k // spec.experts, k % spec.experts) for k in range(spec.layers * spec.experts)]
        self.critical = self._critical_layers()
        self._bytes = {p: expert_bytes(ctx, p, cfg.name) for p in self.bits}
        shares = layer_shares(self.critical, cfg.high_precision, cfg.critical_precision, cfg.low_precision,
                              cfg.high_budget_share)
        budget = max(0, ctx.budget_bytes - cfg.staging_experts * self._bytes[cfg.high_precision])
        capacity = {p: min(len(self._key_of), int(shares[p] * budget) // self._bytes[p]) for p in shares}
        if sum(capacity.values()) < spec.top_k and not cfg.staging_experts:
            raise InfeasibleError(f"dymoe: the budget of {ctx.budget_bytes / 1e9:.3f} GB holds {sum(capacity.values())} "
                             f"experts, fewer than one token's top-{spec.top_k}; raise budget_gb")
        per_layer = cfg.scope is CacheScope.LAYER
        served = {p: [0.0] * spec.layers for p in capacity}  # per class, the layers it serves
        for layer, crit in enumerate(self.critical):
            served[cfg.high_precision][layer] = 1.0
            served[cfg.critical_precision if crit else cfg.low_precision][layer] = 1.0
        self.cache = TieredCache(capacity, self._key_of, self.bits, spec.layers if per_layer else 1, spec.experts,
                                 {p: w for p, w in served.items() if sum(w) > 0})
        self.stats = PrefetchStats(spec.layers)
        self._order = {p: self._fallback_order(p) for p in capacity}
        self.ema = LayerEma(spec.layers, spec.experts, cfg.alpha)
        self.predictor = self._fit_predictor()
        if ctx.profile is not None:
            for layer, row in enumerate(profile_gate_mean(ctx.profile, spec.layers, spec.experts).tolist()):
                self.ema.seed(layer, row)

    def _critical_layers(self) -> list[bool]:
        spec, cfg = self.ctx.spec, self.cfg
        layers = spec.layers
        if cfg.critical_layers is CriticalLayers.EDGES:
            return [i < cfg.critical_first or i >= layers - cfg.critical_last for i in range(layers)]
        err = stats_for(self.ctx, [cfg.low_precision]).error_of(cfg.low_precision, cfg.name).mean(axis=1)
        top = set(np.argsort(-err, kind="stable")[: cfg.critical_count].tolist())
        return [i in top for i in range(layers)]

    def _fallback_order(self, p: str) -> list[str]:
        """Classes to try for a copy wanted at ``p``: ``p``, lower ones (best first), higher ones."""
        names = sorted(self.cache.lru, key=lambda q: -self.bits[q])
        lower = [q for q in names if self.bits[q] < self.bits[p]]
        higher = [q for q in names if self.bits[q] > self.bits[p]][::-1]
        return [p, *lower, *higher]

    def _fit_predictor(self) -> NextLayerPredictor | None:
        spec, cfg = self.ctx.spec, self.cfg
        self._count = cfg.prefetch_count or spec.top_k
        if cfg.predictor is Predictor.SAME_EXPERTS or cfg.lookahead_layers == 0:
            return None
        if self.ctx.profile is None:
            raise ValueError(f"{cfg.name}: the co-occurrence predictor needs a profiling trace (ctx.profile); "
                             "the engine passed none (or set predictor: SAME_EXPERTS)")
        return NextLayerPredictor.fit(self.ctx.profile, spec.layers, spec.experts, cfg.top_m or 2 * spec.top_k)

    def slab_plan(self) -> list[SlabClass]:
        hi = self.cfg.high_precision if self.cfg.staging_experts else None
        return [SlabClass(p, self._bytes[p], n) for p, n in sorted(self.cache.capacity.items(),
                                                                   key=lambda pn: -self.bits[pn[0]]) if n > 0 or p == hi]

    def staging(self) -> SlabClass | None:
        """``staging_experts`` slots at ``high_precision`` for bypassed misses (None if 0)."""
        n, hi = self.cfg.staging_experts, self.cfg.high_precision
        return SlabClass(hi, self._bytes[hi], n) if n else None

    def initial_loads(self) -> list[Action]:
        if not self.cfg.initial_fill or self.ctx.profile is None:
            return []
        gate = profile_gate_mean(self.ctx.profile, self.ctx.spec.layers, self._E).ravel()
        left = {p: list(c) for p, c in self.cache.cap.items()}  # free slots per class and pool
        chosen: list[tuple[int, str]] = []
        for k in np.argsort(-gate, kind="stable").tolist():
            if gate[k] <= 0:
                break
            p = self.wanted(k // self._E, k % self._E)
            i = self.cache.pool(k)
            if left[p][i] > 0:
                left[p][i] -= 1
                chosen.append((k, p))
        for k, p in reversed(chosen):  # least important first: evicted first
            self.cache.add(k, p)
        return [Action(ActionKind.PROMOTE, self._key_of[k], p) for k, p in reversed(chosen)]

    # ---- serving ----
    def wanted(self, layer: int, expert: int) -> str:
        """The precision expert ``expert`` of ``layer`` should be served at, now."""
        row, thr, hi, floor = self._rule(layer)
        s = row[expert]
        return hi if s > 0.0 and s >= thr else floor

    def _rule(self, layer: int) -> tuple[list[float], float, str, str]:
        """Scores of ``layer``, the high threshold, and the two precisions (see :meth:`wanted`)."""
        cfg = self.cfg
        floor = cfg.critical_precision if self.critical[layer] else cfg.low_precision
        return self.ema.v[layer], cfg.high_ratio * self.ema.mean_score(layer), cfg.high_precision, floor

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        layer, experts, gates = obs.layer, obs.experts.tolist(), obs.gate.tolist()
        self.ema.update(layer, experts, gates)
        self.cache.begin_step(res)
        base = layer * self._E
        needed = [base + e for e in experts]
        protect = set(needed)
        self.stats.on_step(layer, protect)
        actions: list[Action] = []
        row, thr, hi, floor = self._rule(layer)
        for e, k in zip(experts, needed, strict=True):
            s = row[e]
            self._demand(k, hi if s > 0.0 and s >= thr else floor, protect, res, actions, obs)
        if self.cfg.lookahead_layers:
            self._prefetch(layer, obs.experts, obs.gate, protect, res, actions)
        return actions

    def _demand(self, k: int, p: str, protect: set[int], res: SlabLedger, actions: list[Action],
                obs: LayerObs) -> None:
        have = self.cache.touch_best(k)
        if have is not None and self.bits[have] >= self.bits[p]:
            return
        if self.cache.load(k, self._order[p], protect, res, actions) is None and have is None \
                and not self.cfg.staging_experts:
            raise InfeasibleError(f"dymoe: no slab for expert {self._key_of[k]} at layer step {obs.index}: every "
                             "cached copy is needed now or loading and staging_experts is 0; raise budget_gb or "
                             "lower the batch size")

    def _prefetch(self, layer: int, experts: np.ndarray, weights: np.ndarray, protect: set[int],
                  res: SlabLedger, actions: list[Action]) -> None:
        L, E, cache, bits = self.ctx.spec.layers, self._E, self.cache, self.bits
        guess: list[int] = []
        for depth in range(self.cfg.lookahead_layers):
            if depth:  # chain: the last guess stands in for the routing of its layer
                experts, weights = np.array(guess, dtype=np.int64), np.ones(len(guess))
            nxt = (layer + 1) % L
            guess = self._guess(layer, experts, weights)
            row, thr, hi, floor = self._rule(nxt)
            for j in guess:
                k = nxt * E + j
                protect.add(k)
                p = hi if row[j] > 0.0 and row[j] >= thr else floor
                have = cache.touch_best(k)
                if (have is None or bits[have] < bits[p]) and cache.load(
                        k, [p], protect, res, actions, ActionKind.PREFETCH, self.cfg.prefetch_evicts):
                    self.stats.on_issue(nxt, k)
            layer = nxt

    def _guess(self, layer: int, experts: np.ndarray, weights: np.ndarray) -> list[int]:
        if self.predictor is None:  # SAME_EXPERTS: the heaviest of this step's experts
            ids, w = experts.tolist(), weights.tolist()
            order = sorted(range(len(ids)), key=lambda i: (-w[i], ids[i]))
            return [ids[i] for i in order[: self._count]]
        return self.predictor.predict(layer, experts, weights, self._count)
