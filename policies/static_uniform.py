"""static_uniform: every expert resident at one precision, nothing ever moves.

Models the plain quantize-and-deploy baseline (e.g. a GPTQ/AWQ int4 checkpoint loaded whole
into HBM): one precision for every routed expert of every layer, all placed before serving
starts, no transfers at run time. It answers "what does uniform precision cost in quality
and memory", and is infeasible when the budget cannot hold the whole model at that
precision: :meth:`StaticUniform.slab_plan` then raises a ValueError that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moebits.core.precision import get_precision
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


@dataclass
class StaticUniformConfig(PolicyConfig):
    """Knobs of :class:`StaticUniform`.

    ``precision``: the one weight format of every expert. ``miss_rule``: never exercised
    (every expert is always READY); SERVE_LOWER reads as "serve what is there".
    """

    name: ClassVar[str] = "static_uniform"
    precision: str = "int4"
    miss_rule: MissRule = MissRule.SERVE_LOWER


def expert_bytes(ctx: PolicyContext, precision: str, who: str) -> int:
    """One expert's bytes at ``precision`` from the context, with a clear error if unknown."""
    try:
        return ctx.precision_bytes[precision]
    except KeyError:
        known = ", ".join(ctx.precision_bytes)
        raise ValueError(f"{who}: no expert size for precision {precision!r}; the engine knows {known}") from None


@register_policy(StaticUniformConfig)
class StaticUniform(Policy):
    """All ``layers * experts`` experts at ``cfg.precision``; see the module docstring."""

    def __init__(self, cfg: StaticUniformConfig) -> None:
        get_precision(cfg.precision)
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule

    @property
    def is_static(self) -> bool:
        return True

    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        self._slab_bytes = expert_bytes(ctx, self.cfg.precision, self.cfg.name)
        self._n = ctx.spec.layers * ctx.spec.experts

    def slab_plan(self) -> list[SlabClass]:
        need_bytes = self._n * self._slab_bytes
        if need_bytes > self.ctx.budget_bytes:
            raise InfeasibleError(
                f"static-uniform at {self.cfg.precision} needs {need_bytes / 1e9:.3f} GB for "
                f"{self._n} experts, budget is {self.ctx.budget_bytes / 1e9:.3f} GB; "
                "raise budget_gb or pick a lower precision"
            )
        return [SlabClass(self.cfg.precision, self._slab_bytes, self._n)]

    def initial_loads(self) -> list[Action]:
        spec, p = self.ctx.spec, self.cfg.precision
        return [promote(layer, e, p) for layer in range(spec.layers) for e in range(spec.experts)]
