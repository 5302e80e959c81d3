"""dynamo: an expert-level mixed-precision baseline plus channel-level dynamic switching.

Models DynaMo (Chen et al., "DynaMo: Runtime Switchable Quantization for MoE with
Cross-Dataset Adaptation", arXiv 2503.21135): significance is defined per expert and per
channel from a multi-level analysis over several datasets; an expert-level mixed-precision
baseline keeps the quantized model good on all of them, and a channel-level dynamic
switching mechanism adapts it to a novel dataset at run time. Here:

- significance of an expert: its activation frequency aggregated over the sensitivity
  table's datasets (MAX: significant if frequent on any dataset; MEAN), plus the profiling
  trace's routing as one more dataset when the engine gives one;
- baseline (static, resident before serving): every expert at ``low_precision``, then the
  experts with the largest ``significance * (error(low) - error(high))`` raised to
  ``high_precision`` until ``1 - mix_budget_share`` of the budget is spent;
- channel-level switching, modelled as a partial promotion: a *channel-mix* copy
  (:class:`core.precision.ChannelMix`, registered under its name as one more precision)
  holds the expert's low copy plus its most significant ``channel_fraction`` of channels at
  ``channel_precision``: ``low + channel_fraction * channel`` bytes, error
  ``low - significance_share * (low - channel)``, where ``significance_share`` (f_sig) is
  the share of the expert's error reduction those channels carry (for outlier-dominated
  channels it is well above ``channel_fraction``). The rest of the budget
  (``mix_budget_share``) holds such copies, split evenly per layer; per layer they follow
  the run-time hottest low-baseline experts (EMA of the gate weight, with the hysteresis
  and minimum residency of :class:`policies._hotness.LayerTopN`), promoted asynchronously
  while the expert is served from its baseline copy (``MissRule.SERVE_LOWER``: no stall).

Assumptions (knobs): the two baseline precisions, the aggregation, the greedy benefit
ranking, f, f_sig and the channel precision, the budget split, and the run-time hotness
rule. A channel-mix copy moves its whole bytes over the link (the real system would copy
only the high channels and reuse the resident low copy: this overstates transfer time by
the low part), and only low-baseline experts get one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np
from moebits.core.keys import ExpertKey
from moebits.core.precision import ChannelMix, get_precision, register_channel_mix
from moebits.core.slabs import InfeasibleError, Refusal, SlabClass, SlabLedger
from moebits.policies._hotness import LayerEma, LayerTopN
from moebits.policies._tables import ExpertStats, stats_for
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


class Aggregate(Enum):
    """How per-dataset frequencies combine into one significance."""

    MAX = "max"
    MEAN = "mean"


@dataclass
class DynaMoConfig(PolicyConfig):
    """Knobs of :class:`DynaMo`; see the module docstring."""

    name: ClassVar[str] = "dynamo"
    high_precision: str = "int4"
    low_precision: str = "int2"
    channel_precision: str = "int8"
    channel_fraction: float = 0.1
    significance_share: float = 0.5
    mix_budget_share: float = 0.1
    aggregate: Aggregate = Aggregate.MAX
    alpha: float = 0.95
    hysteresis: float = 1.25
    min_residency: int = 8
    max_switches_per_step: int = 1
    max_in_flight: int = 4
    miss_rule: MissRule = MissRule.SERVE_LOWER


def significance(stats: ExpertStats, how: Aggregate) -> np.ndarray:
    """Per-expert significance ``[L, E]`` from the table's per-dataset frequencies."""
    if not stats.frequency:
        return stats.mean_frequency()
    freq = np.stack(list(stats.frequency.values()))
    return freq.max(axis=0) if how is Aggregate.MAX else freq.mean(axis=0)


def baseline_high(benefit: np.ndarray, n_high: int) -> np.ndarray:
    """Boolean mask of the ``n_high`` largest benefits (ties: lower flat id first)."""
    flat = benefit.ravel()
    mask = np.zeros(flat.shape[0], dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:n_high]] = True
    return mask.reshape(benefit.shape)


@register_policy(DynaMoConfig)
class DynaMo(Policy):
    """Static expert-level mixed precision plus run-time channel-mix copies of hot experts."""

    def __init__(self, cfg: DynaMoConfig) -> None:
        hi, lo, ch = (get_precision(p) for p in (cfg.high_precision, cfg.low_precision, cfg.channel_precision))
        if hi.effective_bits <= lo.effective_bits:
            raise ValueError(f"dynamo: high_precision {hi.name} must have more bits than low_precision {lo.name}")
        if not 0.0 <= cfg.mix_budget_share < 1.0:
            raise ValueError(f'dynamo: "mix_budget_share" must be in [0, 1), got {cfg.mix_budget_share}')
        self.mix = ChannelMix(lo.name, ch.name, cfg.channel_fraction, cfg.significance_share)
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule
        self.hi, self.lo = hi.name, lo.name
        self.promotions = 0

    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        spec, cfg = ctx.spec, self.cfg
        self.mix_name = register_channel_mix(self.mix)
        self._bytes = {p: expert_bytes(ctx, p, cfg.name) for p in (self.hi, self.lo)}
        mix_bytes = self.mix.expert_bytes(self._bytes[self.lo], expert_bytes(ctx, cfg.channel_precision, cfg.name))
        self._bytes[self.mix_name] = mix_bytes
        self._keys = [[ExpertKey(layer, e) for e in range(spec.experts)] for layer in range(spec.layers)]
        self.stats = stats_for(ctx, [self.hi, self.lo, cfg.channel_precision])
        self.high = self._baseline(int((1.0 - cfg.mix_budget_share) * ctx.budget_bytes))
        mix_budget = ctx.budget_bytes - self._baseline_bytes()
        self.slots = min(spec.experts, mix_budget // mix_bytes // spec.layers)
        self.ema = LayerEma(spec.layers, spec.experts, cfg.alpha)
        self.top = LayerTopN(self.ema, self.slots, cfg.hysteresis, cfg.min_residency)
        self._low_rows = [set(np.flatnonzero(~row).tolist()) for row in self.high]
        self._in_flight: list[ExpertKey] = []

    def _baseline(self, budget_bytes: int) -> np.ndarray:
        """Which experts the static baseline holds at high precision: ``[L, E]`` bool."""
        spec, st = self.ctx.spec, self.stats
        n = spec.layers * spec.experts
        all_low = n * self._bytes[self.lo]
        if all_low > budget_bytes:
            raise InfeasibleError(
                f"dynamo keeps every expert resident, at least at {self.lo}: {all_low / 1e9:.3f} GB, but its "
                f"baseline budget is {budget_bytes / 1e9:.3f} GB; raise budget_gb or lower mix_budget_share"
            )
        n_high = min(n, (budget_bytes - all_low) // (self._bytes[self.hi] - self._bytes[self.lo]))
        gain = st.error_of(self.lo, self.cfg.name) - st.error_of(self.hi, self.cfg.name)
        return baseline_high(significance(st, self.cfg.aggregate) * gain, n_high)

    def _baseline_bytes(self) -> int:
        n_high = int(self.high.sum())
        return n_high * self._bytes[self.hi] + (self.high.size - n_high) * self._bytes[self.lo]

    @property
    def is_static(self) -> bool:
        return getattr(self, "slots", 1) == 0

    def slab_plan(self) -> list[SlabClass]:
        n_high = int(self.high.sum())
        plan = [SlabClass(self.hi, self._bytes[self.hi], n_high),
                SlabClass(self.lo, self._bytes[self.lo], self.high.size - n_high)]
        if self.slots:
            plan.append(SlabClass(self.mix_name, self._bytes[self.mix_name], self.slots * self.ctx.spec.layers))
        return [c for c in plan if c.count > 0]

    def initial_loads(self) -> list[Action]:
        return [Action(ActionKind.PROMOTE, key, self.hi if self.high[key.layer, key.expert] else self.lo)
                for row in self._keys for key in row]

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        if not self.slots:
            return ()
        layer, experts = obs.layer, obs.experts.tolist()
        self.ema.update(layer, experts, obs.gate.tolist())
        self.top.touch(layer, experts)
        mix = self.mix_name
        self._in_flight = [k for k in self._in_flight if res.is_loading(k, mix)]
        quota = min(self.cfg.max_switches_per_step, self.cfg.max_in_flight - len(self._in_flight))
        if quota <= 0:
            return ()
        return self._switches(layer, experts, quota, res)

    def _switches(self, layer: int, experts: list[int], quota: int, res: SlabLedger) -> list[Action]:
        """Channel-mix promotions (each after the demotion that frees its slab)."""
        keys, mix, top, low = self._keys[layer], self.mix_name, self.top, self._low_rows[layer]
        actions: list[Action] = []
        free = res.free_slabs(mix)
        for c in top.challengers(layer, experts, low.__contains__, quota):
            if top.has_free_slot(layer):
                if free <= 0:
                    break
                free -= 1
            else:
                w = top.weakest_beaten_by(layer, c, lambda e: res.is_ready(keys[e], mix))
                if w is None:
                    break
                top.discard(layer, w)
                actions.append(Action(ActionKind.DEMOTE, keys[w], mix))
            top.add(layer, c)
            actions.append(Action(ActionKind.PROMOTE, keys[c], mix))
            self._in_flight.append(keys[c])
            self.promotions += 1
        return actions

    def on_refused(self, action: Action, reason: Refusal) -> None:
        """A refused switch leaves no mix copy; a refused demotion leaves it in place."""
        if action.precision != self.mix_name:
            return
        layer, e = action.key
        if action.kind == ActionKind.DEMOTE:
            if reason != Refusal.NOT_PRESENT:
                self.top.add(layer, e)
            return
        self.top.discard(layer, e)
        if action.key in self._in_flight:
            self._in_flight.remove(action.key)
        self.promotions -= 1

    def mixed_experts(self, layer: int) -> list[int]:
        """Experts of ``layer`` holding (or loading) a channel-mix copy (tests, snapshots)."""
        return sorted(self.top.members[layer])

    def metrics(self) -> dict[str, float]:
        """Counters for the run summary: channel-mix promotions and baseline high experts."""
        return {"channel_mix_promotions": float(self.promotions), "baseline_high": float(self.high.sum())}
