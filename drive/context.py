"""Building a policy for a run: its context, its slab ledger, and the run's description.

Both engines set a policy up the same way: a :class:`policies.base.PolicyContext` (model,
budget, a ``numpy`` Generator seeded with the run's seed, bytes per precision, profile,
future, sensitivity table), ``prepare``, then ``slab_plan`` carved into a
:class:`core.slabs.SlabLedger`. What the run was (model, budget, workload, table, policy
config) goes into the summary through :func:`run_info`.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

import numpy as np
from moebits.core.config import BaseRunConfig, BudgetConfig
from moebits.core.hardware import HardwareProfile
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import PRECISIONS, get_channel_mix, get_precision
from moebits.core.quality import SensitivityTable, table_kind
from moebits.core.routing import LayerSteps
from moebits.core.slabs import InfeasibleError, SlabLedger
from moebits.policies.base import Policy, PolicyContext


class PolicyError(ValueError):
    """A policy broke the contract (e.g. left a needed expert with no copy at all)."""


def effective_bits(name: str) -> float:
    """Bits per weight of a precision or a registered channel mix."""
    mix = get_channel_mix(name)
    return mix.effective_bits if mix is not None else get_precision(name).effective_bits


def precision_order(names: list[str]) -> list[str]:
    """Precisions highest first (by effective bits, then name): index 0 is the best copy, bit 0
    of a residency mask (both engines order their pools so)."""
    return sorted(names, key=lambda p: (-effective_bits(p), p))


def policy_name(policy: Policy) -> str:
    """The policy's preset name (its config's ``name``), else its class name."""
    cfg = getattr(policy, "cfg", None)
    return getattr(cfg, "name", "") or type(policy).__name__


def prepare_policy(policy: Policy, spec: ModelSpec, budget_bytes: int, seed: int, *,
                   profile: LayerSteps | None = None, future: LayerSteps | None = None,
                   sensitivity: SensitivityTable | None = None, slack_bytes: int = 0,
                   hardware: HardwareProfile | None = None) -> SlabLedger:
    """``policy.prepare(ctx)`` and the ledger of its slab plan within ``budget_bytes`` less the
    policy's staging slab (:meth:`policies.base.Policy.staging`: its bytes are part of the budget);
    ``slack_bytes`` more for an engine that aligns its slabs (the policy never sees them)."""
    if policy.needs_future and future is None:
        raise ValueError(f"policy {policy_name(policy)} needs the future routing: run it on a trace")
    ctx = PolicyContext(
        spec=spec, budget_bytes=budget_bytes, rng=np.random.default_rng(seed),
        precision_bytes={p: spec.expert_bytes(p) for p in PRECISIONS},
        profile=profile, future=future if policy.needs_future else None, sensitivity=sensitivity,
        hardware=hardware,
    )
    policy.prepare(ctx)
    staging = policy.staging()
    staging_bytes = 0 if staging is None else staging.slab_bytes * staging.count
    if staging_bytes >= budget_bytes:
        raise InfeasibleError(f"the staging slab of {policy_name(policy)} ({staging_bytes / 1e9:.3f} GB) leaves nothing of "
                         f"budget_gb={budget_bytes / 1e9:g}; raise budget_gb or lower staging_experts")
    return SlabLedger(policy.slab_plan(), budget_bytes - staging_bytes + slack_bytes)


def policy_metrics(policy: Policy) -> dict[str, float]:
    """The policy's own counters (its ``metrics()``), or {} for a policy without them."""
    metrics = getattr(policy, "metrics", None)
    if not callable(metrics):
        return {}
    return {str(k): float(v) for k, v in metrics().items()}


def plain(value: Any) -> Any:
    """Config values as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def budget_label(b: BudgetConfig) -> str:
    """The budget's kind as the ``conf/budget/`` preset names it: ``gb``, ``all_int4``, ``bf16_25pct``,
    ``per_layer_8`` (``budget=per_layer budget.experts=8``)."""
    if b.experts:
        return f"per_layer_{b.experts}"
    if b.all_at is None:
        return "gb"
    return f"all_{b.all_at}" if b.fraction == 1.0 else f"{b.all_at}_{b.fraction * 100:g}pct"


def run_info(cfg: BaseRunConfig, model: str, budget: int, workload: str, profile: str | None,
             table_src: str) -> dict[str, Any]:
    """What the run was, for ``summary.json`` (the same keys from both engines)."""
    lag = {"observe_lag": cfg.observe_lag} if cfg.observe_lag else {}  # absent at 0: summaries as before the lag
    if cfg.route_lag:
        lag["route_lag"] = cfg.route_lag
    return {
        **lag,
        "model": model,
        "hardware": cfg.hardware.name,
        "budget_gb": budget / 1e9,
        "budget_bytes": budget,
        "budget_kind": budget_label(cfg.budget),
        "batch": cfg.workload.batch,
        "seed": cfg.seed,
        "workload": workload,
        "profile": profile,
        "quality_table": table_src,
        "quality_proxy_kind": table_kind(table_src),
        "policy_config": plain(cfg.policy),
    }
