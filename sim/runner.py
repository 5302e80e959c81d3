"""From a :class:`sim.config.RunConfig` to a finished replay: load, check, build, run.

Everything that can make a run impossible is checked here, before the first event: the
workload and its model, the budget against the device, the policy's own configuration and
slab plan, and the budget against the largest layer step. Each failure is one ValueError
with one message; the CLI prints it as one line.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

from core.model_spec import ModelSpec
from core.quality import read_sensitivity
from policies.base import build_policy
from sim.config import RunConfig
from sim.engine import Engine, EngineOptions, InfeasibleError
from sim.metrics import RunResult, summarize
from sim.workload import load_profile, load_workload


def non_expert_total_bytes(spec: ModelSpec) -> int:
    """Resident non-expert weights (bf16): every layer's plus the embedding and LM head."""
    return spec.layers * spec.non_expert_bytes_per_layer + 2 * 2 * spec.vocab_size * spec.hidden


def check_device(cfg: RunConfig, spec: ModelSpec) -> int:
    """The expert budget in bytes, if it fits the device next to the non-expert weights."""
    budget = int(round(cfg.budget_gb * 1e9))
    if budget <= 0:
        raise InfeasibleError(f'"budget_gb" must be > 0, got {cfg.budget_gb:g}')
    rest = non_expert_total_bytes(spec)
    hw = cfg.hardware
    if budget + rest > hw.hbm_capacity_bytes:
        raise InfeasibleError(
            f"budget_gb={cfg.budget_gb:g} plus {rest / 1e9:.2f} GB of {spec.name}'s non-expert weights exceeds "
            f"{hw.name}'s {hw.hbm_capacity_gb:g} GB of device memory; lower budget_gb to at most "
            f"{(hw.hbm_capacity_bytes - rest) / 1e9:.2f}"
        )
    return budget


def _plain(value: Any) -> Any:
    """Config values as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def build_engine(cfg: RunConfig, options: EngineOptions | None = None) -> tuple[Engine, dict[str, Any]]:
    """The engine for ``cfg`` and the run's description (for the summary)."""
    spec = cfg.model.to_spec()
    work = load_workload(cfg.workload, spec, cfg.seed)
    spec = work.spec
    budget = check_device(cfg, spec)
    policy = build_policy(cfg.policy)
    profile, profile_src = None, None
    if cfg.workload.profile_path:
        profile, profile_src = load_profile(cfg.workload.profile_path, spec), cfg.workload.profile_path
    elif policy.needs_profile:
        profile, profile_src = work.view, "in-sample (the replayed trace)"
    table = read_sensitivity(cfg.quality_table) if cfg.quality_table else None
    engine = Engine(work.view, spec, cfg.hardware, policy, budget, seed=cfg.seed, sensitivity=table,
                    profile=profile, options=options)
    info = {
        "model": spec.name,
        "hardware": cfg.hardware.name,
        "budget_gb": cfg.budget_gb,
        "batch": cfg.workload.batch,
        "seed": cfg.seed,
        "workload": work.source,
        "profile": profile_src,
        "quality_table": cfg.quality_table,
        "policy_config": _plain(cfg.policy),
    }
    return engine, info


def simulate(cfg: RunConfig, options: EngineOptions | None = None) -> tuple[RunResult, dict[str, Any]]:
    """Run ``cfg``; returns the arrays and the summary."""
    engine, info = build_engine(cfg, options)
    result = engine.run()
    result.info.update(info)
    return result, summarize(result)
