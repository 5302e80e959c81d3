"""``report.md``: a sweep's tables and figures as one Markdown page.

Sections: what was swept (counts of ok, infeasible, failed and unfinished runs), the figures,
per trace the policy x budget tables of latency, quality proxy and stall share on the primary
GPU, each online policy's distance to the oracle (when an oracle ran), the policies' own
counters (``policy_metrics``), and every run that did not finish, with its status and reason.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from moebits.analysis.figures import (
    ONLINE,
    POLICY_ORDER,
    budget_order,
    oracle_ratio,
    ordered,
    primary_hardware,
)
from moebits.core.quality import table_kind


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | np.floating):  # one format: no exponents, thousands separated
        x = float(value)
        if abs(x) >= 10.0**digits:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
    return str(value).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, index: bool = True, digits: int = 3) -> str:
    """``df`` as a GitHub Markdown table (NaN as ``-``)."""
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, row in df.iterrows():
        cells = ([_cell(key)] if index else []) + [_cell(v, digits) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Policy x budget of ``value`` (policies in study order, budgets by their bytes)."""
    table = df.pivot_table(index="label", columns="budget", values=value, aggfunc="first")
    table = table.reindex(index=ordered(table.index.tolist(), POLICY_ORDER),
                          columns=[b for b in budget_order(df) if b in table.columns])
    table.index.name = "policy"
    return table


def _geomean(x: pd.Series) -> float:
    x = x[(x > 0) & np.isfinite(x)]
    return float(np.exp(np.log(x).mean())) if len(x) else float("nan")


def oracle_table(df: pd.DataFrame) -> pd.DataFrame:
    """Geometric mean over GPUs and budgets of latency / oracle latency, online policy x trace."""
    ratio = oracle_ratio(df)
    ratio = ratio[ratio["policy"].isin(ONLINE)]
    table = ratio.pivot_table(index="label", columns="trace", values="oracle_ratio", aggfunc=_geomean)
    table = table.reindex(index=ordered(table.index.tolist(), POLICY_ORDER))
    table.index.name = "policy"
    return table


def metrics_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Mean of each ``policy_metrics.*`` counter per policy and trace (finished runs)."""
    cols = [c for c in df.columns if c.startswith("policy_metrics.")]
    ok = df[df["status"] == "ok"]
    if not cols or ok.empty:
        return None
    table = ok.groupby(["label", "trace"])[cols].mean(numeric_only=True).dropna(how="all")
    table.columns = [c.removeprefix("policy_metrics.") for c in table.columns]
    table = table.reset_index().set_index("label")
    return table.dropna(axis=1, how="all")


def failures_table(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that did not end ok: status (infeasible, failed, unfinished), where, and the reason."""
    bad = df[df["status"] != "ok"]
    cols = [c for c in ("status", "trace", "hardware", "budget", "label", "error", "run_dir") if c in bad]
    table = bad[cols].sort_values(cols[:5]).reset_index(drop=True)
    return table.rename(columns={"error": "reason"})


def _section_trace(ok: pd.DataFrame, trace: str) -> list[str]:
    part = ok[ok["trace"] == trace]
    kind = "/".join(k.upper() for k in part["latency_kind"].unique() if k) or "latency"
    model = part["model"].iloc[0] if "model" in part and len(part) else "?"
    out = [f"### {trace} ({model})", ""]
    tables = sorted({table_kind(t) for t in part.get("quality_table", pd.Series(dtype=str)).fillna("").astype(str)})
    proxy = f"quality proxy ({'/'.join(tables)} table)"
    for value, label in (("latency_ms", f"{kind} (ms, mean)"), ("quality_proxy", proxy),
                         ("stall_share", "stall share"), ("bf16_share", "share of activations served in bf16")):
        out += [f"{label}:", "", markdown_table(pivot(part, value)), ""]
    return out


def build_report(df: pd.DataFrame, root: Path, figures: dict[str, Path], out: Path) -> str:
    """The Markdown text of ``report.md`` (figure links relative to ``out``)."""
    counts = df["status"].value_counts()
    hw = primary_hardware(df)
    ok = df[df["status"] == "ok"]
    tables = sorted(set(ok.get("quality_table", pd.Series(dtype=str)).dropna().astype(str)))
    synthetic = [t for t in tables if t.startswith("synthetic")]
    lines = [
        f"# Sweep report: {root}", "",
        f"{len(df)} runs: {counts.get('ok', 0)} ok, {counts.get('infeasible', 0)} infeasible, "
        f"{counts.get('failed', 0)} failed, {counts.get('unfinished', 0)} unfinished. Traces: {', '.join(ordered(df['trace'].tolist(), ()))}. "
        f"GPUs: {', '.join(ordered(df['hardware'].dropna().tolist(), ()))}. "
        f"Policies: {', '.join(ordered(df['policy'].dropna().tolist(), POLICY_ORDER))}.", "",
        "Latency is TPOT (mean ms per decode pass) where the trace decodes and TTFT (mean ms) where it is "
        "prefill-only. The quality proxy is the gate-weighted expert quantization error per token and layer "
        "(lower is better; bf16 is 0), from the run's sensitivity table "
        f"({', '.join(tables)})" + (": a SYNTHETIC table (seeded), not measured on real weights, so it ranks "
                                    "policies only as far as that table is realistic." if synthetic else "."),
        "Tables: runs.parquet / runs.csv (one row per run).", "", "## Figures", "",
    ]
    for name, path in figures.items():
        lines += [f"![{name}]({path.relative_to(out)})", ""]
    lines += [f"## Per trace, on {hw}", ""]
    for trace in ordered(ok["trace"].tolist(), ()):
        lines += _section_trace(ok[ok["hardware"] == hw], trace)
    lines += ["## Distance to the oracle", ""]
    if (ok["policy"] == "oracle").any():
        lines += ["Latency over the Belady oracle's (bf16 cache) at the same trace, GPU and budget; geometric mean "
                  "over GPUs and budgets where both ran. Below 1: faster than the oracle's bf16 cache (by serving "
                  "lower precision).", "", markdown_table(oracle_table(df)), ""]
    else:
        lines += ["No oracle run finished in this sweep (add policy=oracle to compare against the bound).", ""]
    metrics = metrics_table(df)
    if metrics is not None and len(metrics):
        lines += ["## Policy counters (policy_metrics, mean over runs)", "", markdown_table(metrics), ""]
    fails = failures_table(df)
    lines += [f"## Infeasible, failed or unfinished runs ({len(fails)})", "",
              "infeasible: the budget cannot hold the run (recorded, never retried); failed: an error "
              "(re-run the sweep to retry; error.txt in the run folder); unfinished: interrupted.", ""]
    lines += [markdown_table(fails, index=False) if len(fails) else "None.", ""]
    return "\n".join(lines)


def write_report(root: str | Path, out: str | Path | None = None, progress: bool = True) -> Path:
    """Collect the runs under ``root``, write runs.parquet/csv, the figures and report.md to
    ``out`` (default ``root/report``); returns the report's path."""
    from moebits.analysis.figures import draw_all
    from moebits.analysis.runs import collect_runs

    root = Path(root)
    out_dir = Path(out) if out else root / "report"
    df = collect_runs(root, progress=progress)
    if not (df["status"] == "ok").any():
        raise ValueError(f"{root}: none of its {len(df)} runs finished (no summary.json); nothing to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out_dir / "runs.parquet", index=False)
    df.to_csv(out_dir / "runs.csv", index=False)  # the same table as text
    figures = draw_all(df, root, out_dir)
    path = out_dir / "report.md"
    path.write_text(build_report(df, root, figures, out_dir))
    return path
