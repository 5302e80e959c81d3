"""Measured quality of every policy x budget on the project's trained MoE (CPU).

For each workload (an EVALUATION trace of :mod:`train.workloads`: code, prose), policy and
budget, one simulator replay decides what is served: the policy reads the CALIBRATION
sensitivity table and, where it wants a profile, the CALIBRATION trace of the same kind; the
engine's serve log gives the precision of every routed expert at every layer step. Then:

- **measured** (:mod:`train.quality`): the trained model runs teacher-forced over the
  workload's bytes with the trace's routing forced and each routed (token, expert) served at
  the logged precision from dequantized weights: mean next-byte KL against bf16 (nats per
  position) and bits per byte, over all positions and over the decode positions;
- **predicted** (the simulator's quality proxy, graded with the EVALUATION table, never the
  table the policy read): gate-weighted error per (token, layer), as :mod:`core.quality`
  defines it; the table's error unit makes ``proxy x layers`` an estimate of the KL in nats;
  the proxy the replay computed itself with the policy's own table (``proxy_policy_table``)
  rides along for contrast, and so does the simulated decode time per token (``tpot_ms``,
  hardware preset ``h100_pcie5``): quality here ignores time, and a cache that serves misses
  from the host's bf16 copy reaches bf16 quality by paying for it in time.

Gap recovered: for a policy at a budget, ``(KL_base - KL_policy) / (KL_base - KL_bf16)`` with
``KL_bf16 = 0`` (the reference) and ``base`` the static uniform allocation (the highest single
precision that fits the budget) or the static frequency allocation at the same budget; the
prediction is the same ratio of proxies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from moebits.core.config import BudgetConfig, budget_bytes
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import ChannelMix, get_precision, register_channel_mix
from moebits.core.quality import SensitivityTable, read_sensitivity
from moebits.core.routing import LayerSteps
from moebits.drive.app import CONF_DIR
from moebits.drive.context import policy_metrics
from moebits.drive.quality import error_table
from moebits.drive.records import RunResult, summarize
from moebits.sim.config import RunConfig, register_configs
from moebits.sim.engine import Engine, EngineOptions
from moebits.sim.runner import build_engine
from moebits.traces.format import read_trace
from omegaconf import OmegaConf

POLICIES = ("static_uniform", "static_frequency", "mxmoe", "routernorm", "dynaexq", "dymoe", "dynamo", "hobbit",
            "lru_offload", "lfu_offload", "oracle")
BUDGETS = ("all_int2", "all_int3", "all_int4", "bf16_25pct", "bf16_50pct")
WORKLOADS = ("evaluation_code", "evaluation_prose")
UNIFORM_ORDER = ("bf16", "fp8", "int8", "int4", "int3", "int2")


@dataclass(frozen=True)
class StudyPaths:
    """Inputs of the study: the built corpus and the trained model's shipped data."""

    data_dir: Path
    model_dir: Path
    traces_dir: Path
    calibration_table: Path
    evaluation_table: Path


@dataclass
class RunRow:
    """One policy x budget x workload: the measured and predicted quality."""

    policy: str
    budget: str
    workload: str
    status: str = "ok"
    proxy: float = float("nan")
    proxy_policy_table: float = float("nan")
    kl_mean: float = float("nan")
    kl_decode: float = float("nan")
    bpb: float = float("nan")
    bpb_decode: float = float("nan")
    tpot_ms: float = float("nan")
    precision_mix: dict[str, float] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


def budget_config(name: str) -> BudgetConfig:
    """``all_int4`` / ``bf16_25pct`` as a :class:`BudgetConfig` (the ``conf/budget/`` presets)."""
    if name.startswith("all_"):
        return BudgetConfig(all_at=name.removeprefix("all_"), fraction=1.0)
    prec, pct = name.split("_")
    return BudgetConfig(all_at=prec, fraction=float(pct.removesuffix("pct")) / 100)


def uniform_precision(budget: str, spec: ModelSpec) -> str:
    """The highest single precision whose copy of every expert fits ``budget``."""
    nbytes = budget_bytes(0.0, budget_config(budget), spec)
    for p in UNIFORM_ORDER:
        if spec.all_experts_bytes(get_precision(p)) <= nbytes:
            return p
    raise ValueError(f"no uniform precision fits {budget}")


LADDER = ("bf16", "int8", "int4", "int3", "int2")
TWO_LEVEL = ("dynaexq", "hobbit", "static_frequency")  # high/low policies compared at the same bytes
DEFAULT_LOW = "int4"


def level_overrides(policy: str, budget: str, spec: ModelSpec) -> list[str]:
    """Budget-fitted precisions: static_uniform takes the highest uniform precision that fits;
    the two-level policies keep their low precision (int4) where every expert fits at it with
    room to spare, else go one rung below the uniform precision (int2 at the bottom)."""
    uni = uniform_precision(budget, spec)
    if policy == "static_uniform":
        return [f"policy.precision={uni}"]
    if policy not in TWO_LEVEL:
        return []
    nbytes = budget_bytes(0.0, budget_config(budget), spec)
    if spec.all_experts_bytes(get_precision(DEFAULT_LOW)) < nbytes:
        return []
    low = LADDER[min(LADDER.index(uni) + 1, len(LADDER) - 1)] if uni in LADDER else "int2"
    return [f"policy.low_precision={low}"]


def compose_run(policy: str, budget: str, trace: Path, profile: Path | None, table: Path,
                extra: Sequence[str]) -> RunConfig:
    """The simulator's run config (composed as ``moebits sim`` composes it; ``profile`` None: the
    simulator's default, the trace's CALIBRATION profile)."""
    register_configs()
    overrides = [f"policy={policy}", f"budget={budget}", "workload=file", f"workload.path={trace}",
                 "model=trace", f"quality_table={table}", "progress=false", "figure=false", *extra]
    if profile is not None:
        overrides.append(f"workload.profile_path={profile}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    assert isinstance(cfg, RunConfig)
    return cfg


def served_log(view: LayerSteps, result: RunResult, staging: str | None = None) -> dict[tuple[int, int, int], dict[int, str]]:
    """``(batch, pass, layer) -> {expert: precision}`` from a replay's per-step served records;
    an expert a step needed but did not list was bypassed: streamed through the policy's staging
    slab and served at its precision ``staging`` (:mod:`drive.missrule`)."""
    if result.served is None:
        raise ValueError("the replay kept no served records; run it with EngineOptions(served=True)")
    out: dict[tuple[int, int, int], dict[int, str]] = {}
    for i, row in enumerate(result.served):
        by = {e: p for e, _, p in row}
        for e in view.experts(i).tolist():
            if e not in by:
                if staging is None:
                    raise ValueError(f"layer step {i} served no copy of expert {e} and the policy has no staging slab")
                by[e] = staging
        out[(int(view.ls_batch[i]), int(view.ls_pass[i]), int(view.ls_layer[i]))] = by
    return out


def graded_proxy(view: LayerSteps, served: dict[tuple[int, int, int], dict[int, str]], table: SensitivityTable,
                 spec: ModelSpec) -> float:
    """The quality proxy of the decisions in ``served``, graded with ``table``: the driver's error
    table (:func:`drive.quality.error_table`) summed as the miss rule sums it (see :mod:`core.quality`)."""
    names = sorted({p for by in served.values() for p in by.values()} - {"host"})
    errors = error_table(spec, names, table)
    col = {n: errors.table[:, :, i] for i, n in enumerate(names)}
    col["host"] = np.asarray(errors.host)
    err = 0.0
    for i in range(view.layer_steps):
        by = served[(int(view.ls_batch[i]), int(view.ls_pass[i]), int(view.ls_layer[i]))]
        la = int(view.ls_layer[i])
        for j in range(int(view.offsets[i]), int(view.offsets[i + 1])):
            e = int(view.ex_expert[j])
            err += float(view.ex_gate[j]) * float(col[by[e]][la, e])
    return err / max(int(view.ls_tokens.sum()), 1)


def decide(policy: str, budget: str, trace: Path, profile: Path, paths: StudyPaths,
           extra: Sequence[str]) -> tuple[Engine, dict[str, Any]]:
    """Replay the workload under the policy with the serve log on; (engine, its summary info)."""
    cfg = compose_run(policy, budget, trace, profile, paths.calibration_table, extra)
    engine, info = build_engine(cfg, EngineOptions(served=True, fast=False))
    result = engine.run()
    stage = engine.policy.staging()
    info["served"] = served_log(engine.view, result, None if stage is None else stage.precision)
    result.info.update(info)
    info["tpot_ms"] = summarize(result)["tpot_ms_mean"]
    info["policy_metrics"] = policy_metrics(engine.policy)
    info["proxy_policy_table"] = float(result.err.sum() / max(int(result.ls_tokens.sum()), 1))
    info["precision_mix"] = _mix(result.act, result.precisions)
    return engine, info


def _mix(act: np.ndarray, precisions: list[str]) -> dict[str, float]:
    total = act.sum(axis=0)
    share = total / max(total.sum(), 1)
    return {p: round(float(s), 4) for p, s in zip([*precisions, "host"], share, strict=True) if s > 0}


def dynamo_overrides(calibration_report: dict[str, Any]) -> list[str]:
    """DynaMo's channel-mix significance share, measured on the calibration split."""
    share = round(float(calibration_report["dynamo_mix"]["significance_share_median"]), 3)
    return [f"policy.significance_share={share}"]


def mix_names(overrides: dict[str, list[str]]) -> list[str]:
    """Register the channel mixes the policies will serve (so the model can build them first)."""
    share = next((float(o.split("=")[1]) for o in overrides.get("dynamo", []) if "significance_share" in o), 0.5)
    return [register_channel_mix(ChannelMix("int2", "int8", 0.1, share))]


def read_table(path: Path) -> SensitivityTable:
    return read_sensitivity(path)


def trace_spec(path: Path) -> ModelSpec:
    return read_trace(path).meta.spec


# ---------------------------------------------------------------- the study
def profile_for(workload: str, traces_dir: Path, kind: str = "same") -> Path:
    """The CALIBRATION trace an offline policy learns from: of the workload's own kind (``same``)
    or of the other kind (``other``: a profile taken under distribution shift)."""
    split, own = workload.split("_", 1)
    if kind not in ("same", "other"):
        raise ValueError(f"profile kind must be 'same' or 'other', got {kind!r}")
    other = {"code": "prose", "prose": "code"}[own] if kind == "other" else own
    return traces_dir / f"calibration_{other}.parquet"


def run_study(paths: StudyPaths, policies: Sequence[str] = POLICIES, budgets: Sequence[str] = BUDGETS,
              workloads: Sequence[str] = WORKLOADS, progress: bool = True,
              profile_kind: str = "same") -> tuple[list[RunRow], dict[str, Any]]:
    """Every policy x budget x workload (see the module docstring); (rows, the study's facts)."""
    import json

    import torch
    from moebits.train import quality as tq
    from moebits.train import serve
    from moebits.train.cli_sensitivity import load_model
    from tqdm import tqdm

    torch.manual_seed(0)
    cal_report = json.loads(paths.calibration_table.with_suffix(".json").read_text())
    extra = {"dynamo": dynamo_overrides(cal_report)}
    eval_table = read_table(paths.evaluation_table)
    model = load_model(paths.model_dir)
    names = ["bf16", *UNIFORM_ORDER[1:], *mix_names(extra)]
    sig = _calibration_significance(model, paths)
    variants = serve.build_variants(model, names, sig)
    rows: list[RunRow] = []
    jobs = [(w, p, b) for w in workloads for b in budgets for p in policies]
    bar = tqdm(total=len(jobs), desc="quality runs", disable=not progress)
    for w in workloads:
        trace = paths.traces_dir / f"{w}.parquet"
        profile = profile_for(w, paths.traces_dir, profile_kind)
        spec = trace_spec(trace)
        wl = tq.workload(read_trace(trace), paths.data_dir)
        ctx, ref = tq.reference(model, wl, variants)
        for b in budgets:
            for p in policies:
                over = [*extra.get(p, []), *level_overrides(p, b, spec)]
                rows.append(_one(p, b, w, trace, profile, paths, over, model, wl, ctx, ref, variants, spec, eval_table))
                bar.update(1)
    bar.close()
    facts = {"dynamo_overrides": extra["dynamo"], "variants": variants.names, "profile_kind": profile_kind,
             "calibration_table": _rel(paths.calibration_table), "evaluation_table": _rel(paths.evaluation_table),
             "model": _rel(paths.model_dir), "traces": _rel(paths.traces_dir), "hardware": "h100_pcie5 (simulated time)",
             "bf16_bpb": {w: _bf16_bpb(model, paths, w, variants) for w in workloads}}
    return rows, facts


def _one(policy: str, budget: str, workload: str, trace: Path, profile: Path, paths: StudyPaths, over: list[str],
         model: Any, wl: Any, ctx: Any, ref: Any, variants: Any, spec: ModelSpec, eval_table: SensitivityTable) -> RunRow:
    from moebits.train import quality as tq

    row = RunRow(policy, budget, workload, overrides=over)
    try:
        engine, info = decide(policy, budget, trace, profile, paths, over)
    except ValueError as exc:
        row.status = f"infeasible: {str(exc).splitlines()[0][:160]}"
        return row
    served = info["served"]
    row.proxy = graded_proxy(engine.view, served, eval_table, spec)
    row.proxy_policy_table = info["proxy_policy_table"]
    row.precision_mix = info["precision_mix"]
    row.tpot_ms = float(info["tpot_ms"] or float("nan"))
    got = tq.measure(model, wl, ctx, ref, tq.assignment(wl, served, variants, spec.experts))
    row.kl_mean, row.kl_decode, row.bpb, row.bpb_decode = (got[k] for k in ("kl_mean", "kl_decode", "bpb", "bpb_decode"))
    return row


def _rel(path: Path) -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def _calibration_significance(model: Any, paths: StudyPaths) -> Any:
    """Channel significance ``[L, E, I]`` from a bf16 pass over both CALIBRATION traces' bytes."""
    import torch
    from moebits.train import quality as tq
    from moebits.train import serve

    plain = serve.build_variants(model, ["bf16"])
    parts = []
    for kind in ("code", "prose"):
        wl = tq.workload(read_trace(paths.traces_dir / f"calibration_{kind}.parquet"), paths.data_dir)
        ctx = serve.Served(plain, capture=True)
        serve.install(model, ctx)
        serve.logits(model, wl.tokens, ctx)
        parts.append(ctx.captured)
    captured = [(torch.cat([p[la][0] for p in parts]), torch.cat([p[la][1] for p in parts]),
                 torch.cat([p[la][2] for p in parts])) for la in range(len(parts[0]))]
    return serve.channel_significance(captured, plain)


def _bf16_bpb(model: Any, paths: StudyPaths, workload: str, variants: Any) -> float:
    from moebits.train import quality as tq

    wl = tq.workload(read_trace(paths.traces_dir / f"{workload}.parquet"), paths.data_dir)
    ctx, ref = tq.reference(model, wl, variants)
    return tq.measure(model, wl, ctx, ref, None)["bpb"]
