"""The study's figures from the tidy run table of :mod:`analysis.runs`, in the project's one
style (:mod:`core.plotstyle`: colour-blind-safe colours and a marker per policy, >= 8 pt fonts
at a paper's page width, each figure as a vector PDF and a 300-dpi PNG).

Every figure is a set of panels, one per (GPU, trace) or (budget, trace), at most three
across; within a panel, one line or point set per ``label`` (the policy plus any other swept
setting, e.g. ``dynaexq int8/int2``) and the legend below the panels, never over the data.
The x axis of the per-budget figures is the expert budget, one tick per budget (per-model
presets such as ``all_int4``, or plain ``16 GB``), in order of its bytes. Only finished runs
(``status == "ok"``) are drawn. Latency is TPOT (mean ms per decode pass) where a trace
decodes and TTFT where it is prefill-only; the axis label says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from moebits.core.plotstyle import (
    COLUMN_IN,
    PAGE_IN,
    POLICY_ORDER,
    log_axis,
    paper_style,
    policy_style,
    save,
)
from moebits.core.quality import table_kind

ONLINE = ("lru_offload", "lfu_offload", "dynaexq", "dynamo", "dymoe", "hobbit")
MAX_COLS = 3
Styles = dict[str, dict[str, Any]]
Drawer = Callable[[Any, pd.DataFrame, Styles], None]
__all__ = ["ONLINE", "POLICY_ORDER", "draw_all", "ordered", "pareto_mask", "primary_hardware", "oracle_ratio"]


def ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    """``values`` (distinct) in ``order`` first, the rest sorted after."""
    seen = list(dict.fromkeys(v for v in values if isinstance(v, str)))
    return [v for v in order if v in seen] + sorted(v for v in seen if v not in order)


def budget_order(df: pd.DataFrame) -> list[str]:
    """Budget labels in order of their bytes (median over models; unknown sizes last)."""
    gb = df.groupby("budget")["budget_gb"].median()
    return sorted(gb.index, key=lambda b: (not np.isfinite(gb[b]), gb[b] if np.isfinite(gb[b]) else 0, b))


def primary_hardware(df: pd.DataFrame) -> str:
    """The GPU with the most finished runs (h100_pcie5 on ties)."""
    ok = df[df["status"] == "ok"]
    counts = ok["hardware"].value_counts()
    if counts.empty:
        raise ValueError("no finished runs to plot")
    best = counts[counts == counts.max()].index.tolist()
    return "h100_pcie5" if "h100_pcie5" in best else sorted(best)[0]


def _budget_ticks(ax: Any, order: list[str]) -> None:
    ax.set_xticks(range(len(order)), order, rotation=30 if len(order) > 3 else 0,
                  ha="right" if len(order) > 3 else "center")
    ax.set_xlim(-0.4, max(len(order) - 1, 0) + 0.4)
    ax.set_xlabel("expert budget")


def panels(df: pd.DataFrame, rows: list[tuple[str, str]], title: str, draw: Drawer, path: Path,
           legend: Sequence[str] | None = None) -> Path:
    """One panel per (column, value) filter in ``rows`` x trace; ``draw(ax, runs, styles)`` fills each.
    ``rows`` is a list of (column, value) pairs (e.g. ("hardware", "h100_pcie5")); writes PDF + PNG."""
    traces = ordered(df["trace"].tolist(), ())
    cells = [(col, val, tr) for col, val in rows for tr in traces]
    labels = ordered(df["label"].tolist(), POLICY_ORDER) if legend is None else list(legend)
    styles = policy_style(labels)
    ncols = min(MAX_COLS, len(cells))
    nrows = math.ceil(len(cells) / ncols)
    width = COLUMN_IN if ncols == 1 else PAGE_IN
    with paper_style() as plt:
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, 2.1 * nrows + 0.9), squeeze=False)
        for ax, (col, val, trace) in zip(axes.flat, cells, strict=False):
            part = df[(df[col] == val) & (df["trace"] == trace)]
            if part.empty:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
            else:
                draw(ax, part, styles)
            ax.set_title(f"{trace}\n{val}" if len(rows) > 1 or col != "hardware" else trace)
        for ax in axes.flat[len(cells):]:
            ax.set_visible(False)
        handles = [plt.Line2D([], [], label=name, **s) for name, s in styles.items()]
        fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(2 if ncols == 1 else 4, len(handles))))
        fig.suptitle(title)
        return save(fig, path)


def _lines(column: str, ylabel: str, log: bool = False, ref: float | None = None) -> Drawer:
    """A panel drawer: ``column`` over the budget, one line per label."""

    def draw(ax: Any, part: pd.DataFrame, styles: Styles) -> None:
        order = budget_order(part)
        pos = {b: i for i, b in enumerate(order)}
        for label, runs in part.groupby("label"):
            runs = runs.dropna(subset=[column]).sort_values("budget_gb")
            if len(runs) and str(label) in styles:
                ax.plot(runs["budget"].map(pos), runs[column], **styles[str(label)])
        if ref is not None:
            ax.axhline(ref, color="0.3", lw=0.8, ls="--")
        if log:
            log_axis(ax, "y", part[column])
        kind = part["latency_kind"].dropna().unique() if column == "latency_ms" else []
        ax.set_ylabel(ylabel.format(kind="/".join(k.upper() for k in kind if k) or "latency"))
        _budget_ticks(ax, order)

    return draw


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where no other point is at least as good on both (lower x, lower y) and better on one."""
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        keep[i] = not dominated.any()
    return keep


def _proxy_name(part: pd.DataFrame) -> str:
    """``quality proxy (synthetic table)``: the proxy named with the kind(s) of table its runs used."""
    tables = part["quality_table"] if "quality_table" in part else pd.Series(dtype=str)
    kinds = sorted({table_kind(t) for t in tables.fillna("").astype(str)}) or ["synthetic"]
    return f"quality proxy ({'/'.join(kinds)} table)"


def _quality_budget(ax: Any, part: pd.DataFrame, styles: Styles) -> None:
    order = budget_order(part)
    pos = {b: i for i, b in enumerate(order)}
    for label, runs in part.groupby("label"):
        runs = runs.dropna(subset=["quality_proxy"]).sort_values("budget_gb")
        if runs.empty or str(label) not in styles:
            continue
        s = styles[str(label)]
        x = runs["budget"].map(pos).to_numpy()
        q = runs["quality_proxy"].to_numpy()
        front = pareto_mask(runs["budget_gb"].to_numpy(), q)
        ax.plot(x[front], q[front], **s)
        ax.plot(x[~front], q[~front], ls="", mfc="none", marker=s["marker"], color=s["color"])
    ax.set_ylabel(f"{_proxy_name(part)} (lower is better)")
    _budget_ticks(ax, order)


def _pareto(ax: Any, part: pd.DataFrame, styles: Styles) -> None:
    """Latency vs quality proxy of every policy at one trace and budget; the front dashed grey."""
    part = part.dropna(subset=["latency_ms", "quality_proxy"])
    for label, runs in part.groupby("label"):
        s = styles.get(str(label))
        if s is not None:
            ax.plot(runs["latency_ms"], runs["quality_proxy"], ls="", marker=s["marker"], color=s["color"])
    if len(part):
        x, y = part["latency_ms"].to_numpy(), part["quality_proxy"].to_numpy()
        front = pareto_mask(x, y)
        order = np.argsort(x[front])
        ax.step(x[front][order], y[front][order], where="post", color="0.45", lw=0.8, ls="--", zorder=0)
    log_axis(ax, "x", part["latency_ms"])
    kind = "/".join(k.upper() for k in part["latency_kind"].unique() if k) or "latency"
    ax.set_xlabel(f"{kind} (ms)")
    ax.set_ylabel(_proxy_name(part))


def _precision_mix(steps: pd.DataFrame, cols: list[str], title: str, path: Path) -> Path:
    share = steps[cols].div(steps[cols].sum(axis=1).clip(lower=1), axis=0)
    with paper_style() as plt:
        fig, ax = plt.subplots(figsize=(PAGE_IN, 2.6))
        ax.stackplot(np.arange(len(steps)), share.to_numpy().T, labels=[c[4:] for c in cols], step="post")
        ax.set_xlabel("forward pass (prefill, then decode; batches in order)")
        ax.set_ylabel("share of activations")
        ax.set_ylim(0, 1)
        ax.grid(False)
        fig.legend(loc="outside right upper")
        ax.set_title(title)
        return save(fig, path)


def mix_columns(steps: pd.DataFrame) -> list[str]:
    """The ``act_<precision>`` columns of a step table that served anything."""
    return [c for c in steps.columns if c.startswith("act_") and steps[c].sum() > 0]


def pick_mix_run(df: pd.DataFrame, hardware: str, root: Path) -> tuple[pd.Series, pd.DataFrame] | None:
    """A run worth showing the precision mix of, and its steps: a dynamic policy on the primary
    GPU that served at least two precisions, the trace with the most passes, its largest budget."""
    ok = df[(df["status"] == "ok") & (df["hardware"] == hardware)]
    for policy in ("dynaexq", "dynamo", "dymoe", "hobbit"):
        for _, run in ok[ok["policy"] == policy].sort_values(["passes", "budget_gb"], ascending=False).iterrows():
            path = root / str(run["run_dir"]) / "steps.parquet"
            if path.exists():
                steps = pd.read_parquet(path)
                if len(mix_columns(steps)) >= 2:
                    return run, steps
    return None


def oracle_ratio(df: pd.DataFrame, column: str = "latency_ms") -> pd.DataFrame:
    """``column`` of each run over the oracle's at the same trace, GPU and budget (distance to
    the oracle; NaN where no oracle ran)."""
    ok = df[df["status"] == "ok"]
    keys = ["trace", "hardware", "budget"]
    ref = ok[ok["label"] == "oracle"].groupby(keys)[column].first().rename("oracle_value")
    out = ok.join(ref, on=keys)
    out["oracle_ratio"] = out[column] / out["oracle_value"].where(out["oracle_value"] > 0)
    return out


def draw_all(df: pd.DataFrame, root: Path, out: Path) -> dict[str, Path]:
    """Every figure of the report (PDF + PNG each); returns name -> PNG path."""
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df["status"] == "ok"]
    hw = primary_hardware(df)
    gpus = [("hardware", g) for g in ordered(ok["hardware"].tolist(), ("h100_pcie5", "a6000", "rtx5090"))]
    on_hw = ok[ok["hardware"] == hw]
    budgets = [("budget", b) for b in budget_order(on_hw)]
    figs = {
        "quality_vs_budget": panels(ok, [("hardware", hw)], f"Quality proxy vs expert budget on {hw} "
                                    "(filled: the policy's Pareto front)", _quality_budget, out / "quality_vs_budget"),
        "pareto_latency_quality": panels(on_hw, budgets, f"Latency vs quality per trace and budget on {hw} "
                                         "(dashed: Pareto front)", _pareto, out / "pareto_latency_quality"),
        "latency_vs_budget": panels(ok, gpus, "Latency vs expert budget", _lines("latency_ms", "{kind} (ms)", log=True),
                                    out / "latency_vs_budget"),
        "stall_share": panels(ok, gpus, "Time waiting for expert copies / simulated time",
                              _lines("stall_share", "stall share"), out / "stall_share"),
        "pcie_bytes_per_token": panels(ok.assign(h2d_mb_per_token=ok["h2d_bytes_per_token"] / 1e6), gpus,
                                       "Host-to-device traffic per token",
                                       _lines("h2d_mb_per_token", "PCIe MB / token", log=True),
                                       out / "pcie_bytes_per_token"),
    }
    ratio = oracle_ratio(df)
    online = ratio[ratio["policy"].isin(ONLINE) & ratio["oracle_ratio"].notna()]
    if len(online):
        figs["oracle_gap"] = panels(online, gpus, "Distance to the oracle: latency / oracle's at the same trace, "
                                    "GPU and budget", _lines("oracle_ratio", "latency / oracle", log=True, ref=1.0),
                                    out / "oracle_gap")
    picked = pick_mix_run(df, hw, root)
    if picked is not None:
        run, steps = picked
        title = f"Precision mix over time: {run['policy']}, {run['trace']}, {run['hardware']}, {run['budget']}"
        figs["precision_mix"] = _precision_mix(steps, mix_columns(steps), title, out / "precision_mix")
    return figs
