"""routernorm: static expert-wise bit allocation from router-norm change and neuron variance.

Models "Efficient Quantization of Mixture-of-Experts with Theoretical Generalization
Guarantees" (arXiv 2604.06515): experts whose router row's l2 norm changed less during
training capture less frequent but critical features, so the model is more sensitive to
their quantization and they get more bits; experts with a large maximum intra-neuron
variance would inject large quantization noise at low precision, so they are raised too.
Here, per layer (router norms compare within one router only), once before serving:

1. rank the layer's experts by router-norm change, smallest first. The change comes from
   the sensitivity table's ``router_norm_change``; where no training history exists, the
   final norm stands in for it (all rows start from the same initialization scale, so the
   final norm orders the changes as long as norms grow in training);
2. give ``levels`` (highest first, two or three of them) in rank order: every expert
   starts at the lowest level; walking the ranking, each takes the highest level the
   layer's budget (``budget / layers``) still affords while the others stay at the lowest,
   the top level being capped at ``top_share`` of the experts; budget left over then raises
   experts one level at a time in rank order, ignoring the cap, so the budget is used;
3. the zeta rule: walking the ranking, an expert below the top level whose maximum
   intra-neuron variance exceeds ``zeta`` times that of the lowest-ranked expert of the
   level above (the expert ranked just above it across the level boundary, not yet moved by
   this rule) trades levels with it: it is raised, that expert lowered, bytes unchanged.
   One pass; an expert moved once is not moved again.

Assumptions (knobs): the even per-layer budget, the level list, the top-level cap, the
pairwise reading of the zeta rule, and the final-norm proxy. Nothing moves at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from moebits.core.keys import ExpertKey
from moebits.core.precision import get_precision
from moebits.core.slabs import InfeasibleError, SlabClass
from moebits.policies._tables import stats_for
from moebits.policies.base import (
    Action,
    ActionKind,
    MissRule,
    Policy,
    PolicyConfig,
    PolicyContext,
    register_policy,
)
from moebits.policies.static_uniform import expert_bytes


@dataclass
class RouterNormConfig(PolicyConfig):
    """Knobs of :class:`RouterNorm`; see the module docstring."""

    name: ClassVar[str] = "routernorm"
    levels: list[str] = field(default_factory=lambda: ["int4", "int3", "int2"])
    top_share: float = 0.25
    zeta: float = 1.5
    miss_rule: MissRule = MissRule.SERVE_LOWER


def waterfill(order: list[int], nbytes: list[int], budget_bytes: int, top_share: float) -> list[int]:
    """Level per expert (0 = highest) by rank ``order`` within ``budget_bytes`` (steps 1-2)."""
    n, low = len(order), len(nbytes) - 1
    spare = budget_bytes - n * nbytes[low]
    if spare < 0:
        raise InfeasibleError(f"routernorm: {n} experts need {n * nbytes[low]} bytes per layer even at the lowest "
                         f"level, the layer's budget is {budget_bytes}; raise budget_gb or lower the levels")
    level, cap = [low] * n, int(top_share * n)
    for e in order:
        for v in range(low):
            if (v > 0 or cap > 0) and nbytes[v] - nbytes[low] <= spare:
                spare -= nbytes[v] - nbytes[low]
                level[e], cap = v, cap - (v == 0)
                break
    for e in order:
        while level[e] > 0 and nbytes[level[e] - 1] - nbytes[level[e]] <= spare:
            spare -= nbytes[level[e] - 1] - nbytes[level[e]]
            level[e] -= 1
    return level


def zeta_rule(order: list[int], level: list[int], variance: list[float], zeta: float) -> list[int]:
    """Step 3: pairwise trades across level boundaries (see the module docstring). O(experts)."""
    level, moved = list(level), set[int]()
    stacks: dict[int, list[int]] = {}
    for e in order:  # per level, its experts in rank order: the last one is the lowest-ranked
        stacks.setdefault(level[e], []).append(e)
    for x in order:
        v = level[x]
        if v == 0 or x in moved:
            continue
        above = stacks.get(v - 1, [])
        while above and above[-1] in moved:
            above.pop()
        if above and variance[x] > zeta * variance[above[-1]]:
            partner = above.pop()
            level[x], level[partner] = v - 1, v
            moved.update((x, partner))
    return level


def allocate_layer(change: np.ndarray, variance: np.ndarray, nbytes: list[int], budget_bytes: int,
                   top_share: float, zeta: float) -> list[int]:
    """Level per expert of one layer (0 = highest): steps 1-3 of the module docstring."""
    order = np.argsort(change, kind="stable").tolist()
    level = waterfill(order, nbytes, budget_bytes, top_share)
    return zeta_rule(order, level, variance.tolist(), zeta)


@register_policy(RouterNormConfig)
class RouterNorm(Policy):
    """Bits by router-norm change, raised for high intra-neuron variance; static."""

    def __init__(self, cfg: RouterNormConfig) -> None:
        if len(cfg.levels) < 2:
            raise ValueError(f"routernorm: \"levels\" needs two or more precisions, got {cfg.levels}")
        bits = [get_precision(p).effective_bits for p in cfg.levels]
        if any(a <= b for a, b in zip(bits, bits[1:], strict=False)):
            raise ValueError(f"routernorm: \"levels\" must go from most to fewest bits, got {cfg.levels}")
        if not 0.0 <= cfg.top_share <= 1.0 or cfg.zeta <= 0:
            raise ValueError('routernorm: "top_share" must be in [0, 1] and "zeta" > 0')
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule

    @property
    def is_static(self) -> bool:
        return True

    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        cfg, spec = self.cfg, ctx.spec
        self._bytes = [expert_bytes(ctx, p, cfg.name) for p in cfg.levels]
        if any(a <= b for a, b in zip(self._bytes, self._bytes[1:], strict=False)):
            raise ValueError(f"routernorm: the levels' expert sizes {self._bytes} must decrease")
        stats = stats_for(ctx, list(cfg.levels))
        change = stats.router_norm_change if stats.router_norm_change is not None else stats.router_norm
        per_layer = ctx.budget_bytes // spec.layers
        self.level = np.array([allocate_layer(change[layer], stats.max_variance[layer], self._bytes, per_layer,
                                              cfg.top_share, cfg.zeta) for layer in range(spec.layers)])

    def slab_plan(self) -> list[SlabClass]:
        counts = np.bincount(self.level.ravel(), minlength=len(self._bytes))
        return [SlabClass(p, self._bytes[i], int(counts[i])) for i, p in enumerate(self.cfg.levels) if counts[i]]

    def initial_loads(self) -> list[Action]:
        levels = self.cfg.levels
        return [Action(ActionKind.PROMOTE, ExpertKey(layer, e), levels[v])
                for layer, row in enumerate(self.level.tolist()) for e, v in enumerate(row)]

    def precision_of(self, layer: int, expert: int) -> str:
        return self.cfg.levels[int(self.level[layer, expert])]
