"""From a :class:`sim.config.RunConfig` to a finished replay: load, check, build, run.

Everything that can make a run impossible is checked here, before the first event: the
workload and its model, the budget against the device, the policy's own configuration and
slab plan, and the budget against the largest layer step. Each failure is one ValueError
with one message; the CLI prints it as one line.

Two things are settled here for every run: the expert budget in bytes (``budget_gb``, or a
share of the model's own expert bytes, :class:`sim.config.BudgetConfig`) and the sensitivity
table. Without a ``quality_table`` file the run builds one synthetic table
(:func:`policies._tables.synthetic_table`, seeded by the run's seed) and hands that same
table to the policy (``PolicyContext.sensitivity``) and to the quality proxy, so that what a
policy ranks experts by and what the proxy charges agree; ``summary.json`` names the table
(``quality_table``: a path, ``synthetic(seed=S)`` or ``analytic``). Policies that report
counters (a ``metrics() -> dict[str, float]`` method) have them under ``policy_metrics``.
"""

from __future__ import annotations

from typing import Any

from moebits.core.config import budget_bytes
from moebits.core.model_spec import ModelSpec
from moebits.core.quality import SensitivityTable
from moebits.drive.context import budget_label, policy_metrics, run_info
from moebits.drive.records import RunResult, summarize
from moebits.policies._tables import run_table
from moebits.policies.base import Policy, build_policy
from moebits.sim.config import RunConfig
from moebits.sim.engine import Engine, EngineOptions, InfeasibleError
from moebits.traces.replay import calibration_profile
from moebits.traces.workload import check_settings_used, load_profile, load_workload


def non_expert_total_bytes(spec: ModelSpec) -> int:
    """Resident non-expert weights (bf16): every layer's plus the embedding and LM head."""
    return spec.layers * spec.non_expert_bytes_per_layer + 2 * 2 * spec.vocab_size * spec.hidden


def resolve_budget(cfg: RunConfig, spec: ModelSpec, policy: Policy | None = None) -> int:
    """The expert budget in bytes: ``budget_gb``, or ``fraction`` x all experts at ``all_at``,
    or ``budget.experts`` slots per layer of ``policy``'s cache (:func:`core.config.budget_bytes`)."""
    per_layer = None if policy is None else (lambda n: policy.per_layer_budget_bytes(spec, n))
    try:
        return budget_bytes(cfg.budget_gb, cfg.budget, spec, per_layer)
    except ValueError as exc:
        raise InfeasibleError(str(exc)) from None


def check_device(cfg: RunConfig, spec: ModelSpec, policy: Policy | None = None) -> int:
    """The expert budget in bytes, if it fits the device next to the non-expert weights."""
    budget = resolve_budget(cfg, spec, policy)
    rest = non_expert_total_bytes(spec)
    hw = cfg.hardware
    if budget + rest > hw.hbm_capacity_bytes:
        what = f"budget_gb={cfg.budget_gb:g}" if cfg.budget.all_at is None and not cfg.budget.experts else \
            f"budget={budget_label(cfg.budget)} ({budget / 1e9:.2f} GB for {spec.name})"
        raise InfeasibleError(
            f"{what} plus {rest / 1e9:.2f} GB of {spec.name}'s non-expert weights exceeds "
            f"{hw.name}'s {hw.hbm_capacity_gb:g} GB of device memory; lower budget_gb to at most "
            f"{(hw.hbm_capacity_bytes - rest) / 1e9:.2f}"
        )
    return budget


def sensitivity_table(cfg: RunConfig, spec: ModelSpec) -> tuple[SensitivityTable | None, str]:
    """The run's sensitivity table, chosen as the simulator and runtime both do."""
    return run_table(cfg.quality_table, spec, cfg.seed)


def build_engine(cfg: RunConfig, options: EngineOptions | None = None) -> tuple[Engine, dict[str, Any]]:
    """The engine for ``cfg`` and the run's description (for the summary)."""
    spec = cfg.model.to_spec()
    check_settings_used(cfg.workload)
    work = load_workload(cfg.workload, spec, cfg.seed)
    spec = work.spec
    policy = build_policy(cfg.policy)
    budget = check_device(cfg, spec, policy)
    profile, profile_src = None, None
    if cfg.workload.profile_path:
        profile, profile_src = load_profile(cfg.workload.profile_path, spec), cfg.workload.profile_path
    elif policy.needs_profile and (cal := calibration_profile(work.view, work.source)) is not None:
        profile, profile_src = load_profile(str(cal), spec), f"{cal} (the trace's CALIBRATION profile)"
    elif policy.needs_profile:
        profile, profile_src = work.view, "in-sample (the replayed trace)"
    table, table_src = sensitivity_table(cfg, spec)
    engine = Engine(work.view, spec, cfg.hardware, policy, budget, seed=cfg.seed, sensitivity=table,
                    profile=profile, options=options, observe_lag=cfg.observe_lag,
                    route_lag=cfg.route_lag)
    return engine, run_info(cfg, spec.name, budget, work.source, profile_src, table_src)


def simulate(cfg: RunConfig, options: EngineOptions | None = None) -> tuple[RunResult, dict[str, Any]]:
    """Run ``cfg``; returns the arrays and the summary."""
    engine, info = build_engine(cfg, options)
    result = engine.run()
    result.info.update(info)
    result.info["policy_metrics"] = policy_metrics(engine.policy)
    return result, summarize(result)
