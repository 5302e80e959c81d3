"""static_frequency: an offline, frequency-ranked two-precision allocation; nothing moves.

Models the offline mixed-precision allocators (MxMoE's activation-frequency allocation,
the frequency term of DynaExq's hotness, without their sensitivity weighting): from a
profiling trace (``ctx.profile``), rank experts by the tokens routed to them; every expert
gets a ``low_precision`` copy, then the most frequently routed ones are upgraded to
``high_precision`` (replacing their low copy) until the budget is full. Everything is placed
before serving and stays put, so it is the "hotness known in advance, no run-time switching"
baseline that dynamic controllers must beat when hotness drifts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from moebits.core.precision import get_precision
from moebits.core.routing import LayerSteps
from moebits.core.slabs import InfeasibleError, SlabClass
from moebits.policies.base import (
    Action,
    MissRule,
    Policy,
    PolicyConfig,
    PolicyContext,
    promote,
    register_policy,
)
from moebits.policies.static_uniform import expert_bytes


@dataclass
class StaticFrequencyConfig(PolicyConfig):
    """Knobs of :class:`StaticFrequency`.

    ``high_precision`` for the most routed experts, ``low_precision`` for all others (must
    be smaller). ``miss_rule`` is never exercised: every expert is always READY.
    """

    name: ClassVar[str] = "static_frequency"
    high_precision: str = "bf16"
    low_precision: str = "int4"
    miss_rule: MissRule = MissRule.SERVE_LOWER


def ranked_by_popularity(profile: LayerSteps, layers: int, experts: int) -> np.ndarray:
    """Flat expert ids (``layer * experts + expert``), most routed tokens first.

    Ties go to the lower (layer, expert), so the ranking is deterministic."""
    if profile.layer_steps and (int(profile.ls_layer.max()) >= layers or int(profile.ex_expert.max()) >= experts):
        raise ValueError(
            f"the profiling trace names layer {int(profile.ls_layer.max())} / expert "
            f"{int(profile.ex_expert.max())}, outside the model's {layers} layers x {experts} experts"
        )
    counts = profile.counts(layers, experts).ravel()
    return np.argsort(-counts, kind="stable")


@register_policy(StaticFrequencyConfig)
class StaticFrequency(Policy):
    """Most-routed experts at high precision, the rest at low; see the module docstring."""

    needs_profile: ClassVar[bool] = True

    def __init__(self, cfg: StaticFrequencyConfig) -> None:
        get_precision(cfg.high_precision)
        get_precision(cfg.low_precision)
        if cfg.high_precision == cfg.low_precision:
            raise ValueError(f"static_frequency: high and low precision are both {cfg.low_precision!r}")
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule

    @property
    def is_static(self) -> bool:
        return True

    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        if ctx.profile is None:
            raise ValueError("static_frequency needs a profiling trace (the engine passed no profile)")
        self._high_bytes = expert_bytes(ctx, self.cfg.high_precision, self.cfg.name)
        self._low_bytes = expert_bytes(ctx, self.cfg.low_precision, self.cfg.name)
        if self._high_bytes <= self._low_bytes:
            raise ValueError(
                f"static_frequency: high precision {self.cfg.high_precision} ({self._high_bytes} B/expert) "
                f"must be larger than low precision {self.cfg.low_precision} ({self._low_bytes} B/expert)"
            )
        spec = ctx.spec
        self._n = spec.layers * spec.experts
        self._ranked = ranked_by_popularity(ctx.profile, spec.layers, spec.experts)
        self._n_high = self._high_count()
        self.high = np.zeros(self._n, dtype=bool)  # flat id -> at high precision
        self.high[self._ranked[: self._n_high]] = True

    def _high_count(self) -> int:
        """How many experts can be upgraded from low to high within the budget."""
        all_low_bytes = self._n * self._low_bytes
        spare_bytes = self.ctx.budget_bytes - all_low_bytes
        if spare_bytes < 0:
            raise InfeasibleError(
                f"static_frequency needs {all_low_bytes / 1e9:.3f} GB for {self._n} experts even all at "
                f"{self.cfg.low_precision}, budget is {self.ctx.budget_bytes / 1e9:.3f} GB; "
                "raise budget_gb or pick a lower low_precision"
            )
        return min(self._n, spare_bytes // (self._high_bytes - self._low_bytes))

    def slab_plan(self) -> list[SlabClass]:
        return [
            SlabClass(self.cfg.high_precision, self._high_bytes, self._n_high),
            SlabClass(self.cfg.low_precision, self._low_bytes, self._n - self._n_high),
        ]

    def initial_loads(self) -> list[Action]:
        spec = self.ctx.spec
        hi, lo = self.cfg.high_precision, self.cfg.low_precision
        return [
            promote(i // spec.experts, i % spec.experts, hi if self.high[i] else lo)
            for i in range(self._n)
        ]
