"""mxmoe: a static per-expert precision allocation trading quantization loss against kernel time.

Models MxMoE (Duanmu et al., "MxMoE: Mixed-precision Quantization for MoE with Accuracy and
Performance Co-Design", arXiv 2505.05799): precision is allocated from parameter
sensitivity, activation frequency and hardware cost together. Here, once before serving,
every expert ``e`` gets one precision ``p_e`` of ``precisions`` minimizing

    J = r * log(sum_e w_e * err(e, p_e)) + (1 - r) * log(sum_e w_e * time(p_e))

subject to ``sum_e bytes(p_e) <= budget`` (everything resident, nothing moves), where
``w_e`` is the expert's activation frequency (the profiling trace's share of its layer's
routed tokens, else the sensitivity table's mean frequency; each layer weighs the same),
``err`` the table's quantization error and ``time`` the expert's kernel time per decode
token in that precision relative to bf16, from the hardware profile's kernel model
(:func:`core.hardware.expert_time_s` at one token per expert: the measured kernel table where
the profile has one for this expert shape, else the roofline the simulator times with), so
the policy and the simulator agree on what is fast. Without a hardware profile in the context
the time is the precision's bytes relative to bf16 (memory-bound decode); a non-empty
``relative_time`` overrides both. ``r`` is ``accuracy_weight``.

Solvers: EXACT enumerates every assignment (``len(precisions) ** experts`` of them, for
small cases only); GREEDY starts from the smallest precision everywhere and repeatedly
applies the upgrade (one expert to any larger precision) with the best objective decrease
per extra byte that still fits, until none decreases J, then does the same ranking upgrades
by their whole decrease (the usual knapsack safeguard against one large item) and keeps the
better of the two; with ``greedy_batch`` > 1 each round applies that many upgrades (distinct
experts, gains computed once per round), which is faster and slightly less exact. AUTO takes EXACT when the enumeration has at most
``max_exact_combinations`` assignments. ``tests/test_policies_seed.py`` measures the
greedy's optimality gap against EXACT on small random cases.

Assumptions (knobs): per-expert rather than per-linear-block granularity (MxMoE allocates
per linear block; an expert's three matrices share one precision here), decode-time costs,
the frequency weighting, and a loss floor (1e-9 of the all-lowest loss) so that log stays
finite when an error is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

import numpy as np
from moebits.core.hardware import expert_time_s
from moebits.core.keys import ExpertKey
from moebits.core.precision import get_precision
from moebits.core.slabs import InfeasibleError, SlabClass
from moebits.policies._tables import profile_frequency, stats_for
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


class Solver(Enum):
    """How mxmoe solves the allocation (module docstring)."""

    AUTO = "auto"
    EXACT = "exact"
    GREEDY = "greedy"


@dataclass
class MxMoEConfig(PolicyConfig):
    """Knobs of :class:`MxMoE`; see the module docstring. ``greedy_batch`` 0 means
    ``max(1, experts // 256)`` upgrades per greedy round."""

    name: ClassVar[str] = "mxmoe"
    precisions: list[str] = field(default_factory=lambda: ["bf16", "int8", "int4", "int3", "int2"])
    accuracy_weight: float = 0.75
    relative_time: dict[str, float] = field(default_factory=dict)  # empty: from the hardware profile
    solver: Solver = Solver.AUTO
    max_exact_combinations: int = 1 << 16
    greedy_batch: int = 0
    miss_rule: MissRule = MissRule.SERVE_LOWER


def objective(loss_sum: np.ndarray | float, time_sum: np.ndarray | float, r: float) -> np.ndarray | float:
    """``r * log(loss) + (1 - r) * log(time)``."""
    return r * np.log(loss_sum) + (1.0 - r) * np.log(time_sum)


def assignment_objective(choice: np.ndarray, loss: np.ndarray, time: np.ndarray, r: float) -> float:
    """J of an assignment (precision index per expert)."""
    rows = np.arange(loss.shape[0])
    return float(objective(loss[rows, choice].sum(), time[rows, choice].sum(), r))


def solve_exact(loss: np.ndarray, time: np.ndarray, nbytes: np.ndarray, budget: int, r: float,
                max_combinations: int) -> np.ndarray:
    """The optimal assignment by enumeration (``loss``, ``time``: ``[N, P]``; ``nbytes``: ``[P]``)."""
    n, p = loss.shape
    total = p**n
    if total > max_combinations:
        raise ValueError(f"mxmoe: exact allocation of {n} experts over {p} precisions needs {total} "
                         f"assignments, more than max_exact_combinations={max_combinations}; use GREEDY")
    powers = p ** np.arange(n, dtype=np.int64)
    rows = np.arange(n)[None, :]
    best_j, best = np.inf, None
    for start in range(0, total, 1 << 16):
        digits = (np.arange(start, min(total, start + (1 << 16)), dtype=np.int64)[:, None] // powers) % p
        j = objective(loss[rows, digits].sum(axis=1), time[rows, digits].sum(axis=1), r)
        j = np.where(nbytes[digits].sum(axis=1) <= budget, j, np.inf)
        i = int(np.argmin(j))
        if j[i] < best_j:
            best_j, best = float(j[i]), digits[i]
    if best is None:
        raise InfeasibleError("mxmoe: no assignment fits the budget")
    return best.astype(np.int64)


def _greedy(loss: np.ndarray, time: np.ndarray, nbytes: np.ndarray, budget: int, r: float, batch: int,
            per_byte: bool) -> np.ndarray:
    """One greedy run: upgrades ranked by objective decrease per extra byte, or in total."""
    n, _ = loss.shape
    rows = np.arange(n)
    choice = np.full(n, int(np.argmin(nbytes)), dtype=np.int64)
    used = int(nbytes[choice].sum())
    if used > budget:
        raise InfeasibleError(f"mxmoe: {n} experts need {used / 1e9:.3f} GB even at the smallest precision, "
                         f"budget is {budget / 1e9:.3f} GB; raise budget_gb or add a smaller precision")
    while True:
        total_l, total_t = loss[rows, choice].sum(), time[rows, choice].sum()
        d_bytes = nbytes[None, :] - nbytes[choice][:, None]
        new_l = total_l - loss[rows, choice][:, None] + loss
        new_t = total_t - time[rows, choice][:, None] + time
        d_j = r * np.log(new_l / total_l) + (1.0 - r) * np.log(new_t / total_t)
        ok = (d_bytes > 0) & (used + d_bytes <= budget) & (d_j < 0)
        gain = np.where(ok, -d_j / (np.maximum(d_bytes, 1) if per_byte else 1), -np.inf)
        best_q = np.argmax(gain, axis=1)
        best_g = gain[rows, best_q]
        picks = [i for i in np.argsort(-best_g, kind="stable")[:batch].tolist() if np.isfinite(best_g[i])]
        if not picks:
            return choice
        for i in picks:
            extra = int(nbytes[best_q[i]] - nbytes[choice[i]])
            if used + extra <= budget:
                choice[i], used = best_q[i], used + extra


def solve_greedy(loss: np.ndarray, time: np.ndarray, nbytes: np.ndarray, budget: int, r: float,
                 batch: int = 1) -> np.ndarray:
    """The better of two greedy runs from the smallest precision everywhere: upgrades ranked
    by objective decrease per extra byte, and by objective decrease (see the module docstring)."""
    runs = [_greedy(loss, time, nbytes, budget, r, batch, per_byte) for per_byte in (True, False)]
    return min(runs, key=lambda c: assignment_objective(c, loss, time, r))


@register_policy(MxMoEConfig)
class MxMoE(Policy):
    """Static loss/time co-optimized precision per expert; see the module docstring."""

    def __init__(self, cfg: MxMoEConfig) -> None:
        if not cfg.precisions:
            raise ValueError("mxmoe: \"precisions\" is empty")
        for p in cfg.precisions:
            get_precision(p)
            if cfg.relative_time and (p not in cfg.relative_time or cfg.relative_time[p] <= 0):
                raise ValueError(f"mxmoe: relative_time needs a positive entry for {p!r} (or leave it empty)")
        if not 0.0 <= cfg.accuracy_weight <= 1.0:
            raise ValueError(f'mxmoe: "accuracy_weight" must be in [0, 1], got {cfg.accuracy_weight}')
        self.cfg = cfg
        self.miss_rule = cfg.miss_rule

    @property
    def is_static(self) -> bool:
        return True

    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        cfg, spec = self.cfg, ctx.spec
        self.precisions = list(dict.fromkeys(cfg.precisions))
        self._bytes = np.array([expert_bytes(ctx, p, cfg.name) for p in self.precisions], dtype=np.int64)
        loss, time = self.problem()
        log_combos = loss.shape[0] * np.log(len(self.precisions))
        exact = cfg.solver is Solver.EXACT or (
            cfg.solver is Solver.AUTO and log_combos <= np.log(max(cfg.max_exact_combinations, 1)))
        if exact:
            choice = solve_exact(loss, time, self._bytes, ctx.budget_bytes, cfg.accuracy_weight,
                                 cfg.max_exact_combinations)
        else:
            batch = cfg.greedy_batch or max(1, loss.shape[0] // 256)
            choice = solve_greedy(loss, time, self._bytes, ctx.budget_bytes, cfg.accuracy_weight, batch)
        self.choice = choice.reshape(spec.layers, spec.experts)

    def problem(self) -> tuple[np.ndarray, np.ndarray]:
        """The loss and time matrices ``[N, P]`` (flat expert id, precision) of the allocation."""
        spec, ctx = self.ctx.spec, self.ctx
        stats = stats_for(ctx, self.precisions)
        freq = (profile_frequency(ctx.profile, spec.layers, spec.experts) if ctx.profile is not None
                else stats.mean_frequency())
        w = (freq / max(float(freq.sum()), 1e-30)).ravel()
        err = np.stack([stats.error_of(p, self.cfg.name).ravel() for p in self.precisions], axis=1)
        loss = w[:, None] * err
        lowest = int(np.argmin(self._bytes))
        loss += 1e-9 * max(float(loss[:, lowest].sum()), 1e-30) / loss.shape[0]
        speed = self.speed()
        time = w[:, None] * speed[None, :] + 1e-12
        return loss, time

    def speed(self) -> np.ndarray:
        """Kernel time per decode token of each precision relative to bf16 (module docstring)."""
        ctx, spec = self.ctx, self.ctx.spec
        if self.cfg.relative_time:
            return np.array([self.cfg.relative_time[p] for p in self.precisions])
        if ctx.hardware is None:
            return np.array([spec.expert_bytes(p) / spec.expert_bytes("bf16") for p in self.precisions])
        ref = float(expert_time_s(ctx.hardware, spec, "bf16", 1.0))
        return np.array([float(expert_time_s(ctx.hardware, spec, p, 1.0)) / ref for p in self.precisions])

    def slab_plan(self) -> list[SlabClass]:
        counts = np.bincount(self.choice.ravel(), minlength=len(self.precisions))
        return [SlabClass(p, int(self._bytes[i]), int(counts[i])) for i, p in enumerate(self.precisions)
                if counts[i] > 0]

    def initial_loads(self) -> list[Action]:
        return [Action(ActionKind.PROMOTE, ExpertKey(layer, e), self.precisions[q])
                for layer, row in enumerate(self.choice.tolist()) for e, q in enumerate(row)]

    def precision_of(self, layer: int, expert: int) -> str:
        return self.precisions[int(self.choice[layer, expert])]
