"""dynaexq: hotness-aware dynamic expert precision with asynchronous promotion.

Models DynaExq (Xiang et al., "Dynamic Expert Quantization for Scalable Mixture-of-Experts
Inference", arXiv 2511.15015): a hotness-aware precision controller that aligns expert
bit-widths with long-term activation statistics, a fully asynchronous precision-switching
pipeline, and a fragmentation-free pool for hybrid-precision experts. Here:

- hotness: ``S(t) = alpha * S(t-1) + (1 - alpha) * g(t)`` per expert, ``g`` the expert's
  summed gate weight in the layer step (0 when not routed), ``t`` counting the steps of that
  layer only; updated lazily (:class:`policies._hotness.LayerEma`), O(routed) per step;
- pool (slab plan): a dual slab pool, a low class with one slab for every expert
  (``layers * experts``: every expert keeps a resident ``low_precision`` copy, loaded before
  serving and never evicted) and a high class holding as many ``high_precision`` copies as
  the rest of the budget allows, split evenly per layer (``slots`` each, at most
  ``experts``; the remainder of an uneven split stays unused);
- control: per layer, the high copies follow a top-``slots`` set by hotness: a routed expert
  without a high copy takes a free slot of its layer, or replaces the weakest high copy of
  its layer if its hotness exceeds ``hysteresis`` times that copy's (anti-thrash margin) and
  that copy has been resident for at least ``min_residency`` steps of its layer and is READY
  (DEMOTE, then PROMOTE into the freed slab);
- asynchrony: promotions are PROMOTE actions queued on the link; meanwhile the expert is
  served from its resident low copy (``MissRule.SERVE_LOWER``: no stall ever), and the
  engine serves only READY copies, so compute never reads a half-copied one. At most
  ``max_promotions_per_step`` are issued per layer step and ``max_in_flight`` in flight.

Assumptions (not given by the abstract, so knobs): the EMA decay ``alpha``, the hysteresis
factor, the minimum residency, the two caps, the even per-layer split of high slabs, and the
warm start: with ``warm_start`` and a profiling trace, hotness starts from the profile's
mean gate weight per layer step and the high sets from its top experts, else cold (all
hotness 0, no high copies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from moebits.core.keys import ExpertKey
from moebits.core.precision import get_precision
from moebits.core.slabs import InfeasibleError, Refusal, SlabClass, SlabLedger
from moebits.policies._hotness import LayerEma, LayerTopN
from moebits.policies._tables import profile_gate_mean
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
from moebits.policies.static_uniform import expert_bytes


@dataclass
class DynaExqConfig(PolicyConfig):
    """Knobs of :class:`DynaExq`; see the module docstring.

    ``alpha`` in [0, 1): EMA decay per step of a layer. ``hysteresis`` >= 1: a challenger
    must be this many times hotter than the weakest high copy. ``min_residency``: layer
    steps a high copy stays before it may be demoted.
    """

    name: ClassVar[str] = "dynaexq"
    high_precision: str = "bf16"
    low_precision: str = "int4"
    alpha: float = 0.95
    hysteresis: float = 1.25
    min_residency: int = 8
    max_promotions_per_step: int = 2
    max_in_flight: int = 8
    warm_start: bool = True
    miss_rule: MissRule = MissRule.SERVE_LOWER


@register_policy(DynaExqConfig)
class DynaExq(Policy):
    """Per-layer top-n hot experts at high precision, all at low; see the module docstring."""

    def __init__(self, cfg: DynaExqConfig) -> None:
        for p in (cfg.high_precision, cfg.low_precision):
            get_precision(p)
        if cfg.high_precision == cfg.low_precision:
            raise ValueError(f"dynaexq: high and low precision are both {cfg.low_precision!r}")
        if cfg.max_promotions_per_step < 1 or cfg.max_in_flight < 1:
            raise ValueError('dynaexq: "max_promotions_per_step" and "max_in_flight" must be >= 1')
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule
        self.hi, self.lo = cfg.high_precision, cfg.low_precision
        self.promotions = 0
        self.demotions = 0

    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        spec, cfg = ctx.spec, self.cfg
        self._hi_bytes = expert_bytes(ctx, self.hi, cfg.name)
        self._lo_bytes = expert_bytes(ctx, self.lo, cfg.name)
        self.slots = self._slots_per_layer()
        self._key_of = [[ExpertKey(layer, e) for e in range(spec.experts)] for layer in range(spec.layers)]
        self._promote_of = [[Action(ActionKind.PROMOTE, k, self.hi) for k in row] for row in self._key_of]
        self._demote_of = [[Action(ActionKind.DEMOTE, k, self.hi) for k in row] for row in self._key_of]
        self.ema = LayerEma(spec.layers, spec.experts, cfg.alpha)
        self.top = LayerTopN(self.ema, self.slots, cfg.hysteresis, cfg.min_residency)
        self._in_flight: list[ExpertKey] = []
        if cfg.warm_start and ctx.profile is not None and self.slots:
            self._warm_start(profile_gate_mean(ctx.profile, spec.layers, spec.experts))

    def _slots_per_layer(self) -> int:
        spec = self.ctx.spec
        all_low = spec.layers * spec.experts * self._lo_bytes
        spare = self.ctx.budget_bytes - all_low
        if spare < 0:
            raise InfeasibleError(
                f"dynaexq keeps every expert resident at {self.lo}: {all_low / 1e9:.3f} GB, but the budget "
                f"is {self.ctx.budget_bytes / 1e9:.3f} GB; raise budget_gb or pick a lower low_precision"
            )
        return min(spec.experts, spare // self._hi_bytes // spec.layers)

    def _warm_start(self, gate_mean: np.ndarray) -> None:
        for layer, row in enumerate(gate_mean.tolist()):
            self.ema.seed(layer, row)
            hot = [e for e in np.argsort(-gate_mean[layer], kind="stable")[: self.slots].tolist() if row[e] > 0]
            for e in hot:
                self.top.add(layer, e)
            self.top.members[layer] = {e: -self.cfg.min_residency for e in hot}  # old enough to demote

    def slab_plan(self) -> list[SlabClass]:
        spec = self.ctx.spec
        plan = [SlabClass(self.lo, self._lo_bytes, spec.layers * spec.experts)]
        if self.slots:
            plan.insert(0, SlabClass(self.hi, self._hi_bytes, self.slots * spec.layers))
        return plan

    def initial_loads(self) -> list[Action]:
        spec = self.ctx.spec
        loads = [Action(ActionKind.PROMOTE, k, self.lo) for row in self._key_of for k in row]
        for layer in range(spec.layers):
            loads += [Action(ActionKind.PROMOTE, self._key_of[layer][e], self.hi)
                      for e in sorted(self.top.members[layer])]
        return loads

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        layer, experts = obs.layer, obs.experts.tolist()
        self.ema.update(layer, experts, obs.gate.tolist())
        outside = self.top.touch(layer, experts)
        if not self.slots:
            return ()
        if self._in_flight:
            is_loading, hi = res.is_loading, self.hi
            self._in_flight = [k for k in self._in_flight if is_loading(k, hi)]
        quota = min(self.cfg.max_promotions_per_step, self.cfg.max_in_flight - len(self._in_flight))
        if quota <= 0 or not outside:
            return ()
        return self._swaps(layer, outside, quota, res)

    def _swaps(self, layer: int, outside: list[int], quota: int, res: SlabLedger) -> list[Action]:
        """Promotions (each after the demotion that frees its slab) for this step's challengers
        (the strongest of ``outside``, the routed experts without a high copy)."""
        keys, hi, top = self._key_of[layer], self.hi, self.top
        actions: list[Action] = []
        free = res.free_slabs(hi)
        for c in top.strongest(layer, outside, quota):
            if top.has_free_slot(layer):
                if free <= 0:
                    break  # the layer's slot is still draining elsewhere in the pool
                free -= 1
            else:
                w = top.weakest_beaten_by(layer, c, lambda e: res.is_ready(keys[e], hi))
                if w is None:
                    break  # weaker challengers cannot win either
                top.discard(layer, w)
                actions.append(self._demote_of[layer][w])
                self.demotions += 1
            top.add(layer, c)
            actions.append(self._promote_of[layer][c])
            self._in_flight.append(keys[c])
            self.promotions += 1
        return actions

    def on_refused(self, action: Action, reason: Refusal) -> None:
        """A refused promotion leaves no high copy; a refused demotion leaves the copy in place."""
        if action.precision != self.hi:
            return
        layer, e = action.key
        if action.kind == ActionKind.DEMOTE:
            if reason != Refusal.NOT_PRESENT:
                self.top.add(layer, e)
            self.demotions -= 1
        else:
            self.top.discard(layer, e)
            if action.key in self._in_flight:
                self._in_flight.remove(action.key)
            self.promotions -= 1

    def high_experts(self, layer: int) -> list[int]:
        """Experts of ``layer`` holding (or loading) a high copy, ascending (tests, snapshots)."""
        return sorted(self.top.members[layer])

    def metrics(self) -> dict[str, float]:
        """Counters for the run summary: high-precision promotions and demotions issued."""
        return {"promotions": float(self.promotions), "demotions": float(self.demotions)}
