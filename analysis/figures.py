"""The study's figures (matplotlib, Agg, PNG) from the tidy run table of :mod:`analysis.runs`.

Every figure is a grid of panels, one column per trace and (where the hardware matters) one
row per GPU; within a panel, one line per policy (``label``: the policy plus any other swept
setting, e.g. ``dynaexq int8/int2``) over the expert budget (x: budget in GB,
ticks named by budget kind). Only finished runs (``status == "ok"``) are drawn. Latency is
TPOT (mean ms per decode pass) where a trace decodes and TTFT where it is prefill-only; the
panel's axis label says which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

POLICY_ORDER = ("static_uniform", "static_frequency", "mxmoe", "routernorm", "lru_offload", "lfu_offload",
                "oracle", "dynaexq", "dynamo", "dymoe", "hobbit")
ONLINE = ("lru_offload", "lfu_offload", "dynaexq", "dynamo", "dymoe", "hobbit")
MARKERS = "os^vDP*Xhp<>"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    """``values`` (distinct) in ``order`` first, the rest sorted after."""
    seen = list(dict.fromkeys(v for v in values if isinstance(v, str)))
    return [v for v in order if v in seen] + sorted(v for v in seen if v not in order)


def style(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A colour, marker and line style per line label, the same in every figure.

    Plain policies take fixed colours (by POLICY_ORDER). Labels of swept variants
    (``policy variant``) take one colour per variant and one marker and line style per policy,
    so that the same variant of two policies shares a colour."""
    import matplotlib

    tab20, tab10 = matplotlib.colormaps["tab20"], matplotlib.colormaps["tab10"]
    names = list(dict.fromkeys(labels))
    policies = ordered([*POLICY_ORDER, *(n.split(" ")[0] for n in names)], POLICY_ORDER)
    variants = sorted({n.partition(" ")[2] for n in names if " " in n})
    varied = ordered([n.split(" ")[0] for n in names if " " in n], POLICY_ORDER)
    out: dict[str, dict[str, Any]] = {}
    for name in ordered(names, POLICY_ORDER):
        policy, _, variant = name.partition(" ")
        i = policies.index(policy)
        if variant:
            out[name] = {"color": tab10(variants.index(variant) % 10), "marker": MARKERS[i % len(MARKERS)],
                         "ls": ("-", "--", ":", "-.")[varied.index(policy) % 4]}
        else:
            out[name] = {"color": tab20(i % 20), "marker": MARKERS[i % len(MARKERS)], "ls": "-"}
    return out


def budget_positions(part: pd.DataFrame) -> dict[str, int]:
    """Budget kinds of a panel, numbered in order of their bytes (the panel's x axis)."""
    gb = part.groupby("budget_kind")["budget_gb"].median().sort_values()
    return {kind: i for i, kind in enumerate(gb.index)}


def primary_hardware(df: pd.DataFrame) -> str:
    """The GPU with the most finished runs (h100_pcie5 on ties)."""
    ok = df[df["status"] == "ok"]
    counts = ok["hardware"].value_counts()
    if counts.empty:
        raise ValueError("no finished runs to plot")
    best = counts[counts == counts.max()].index.tolist()
    return "h100_pcie5" if "h100_pcie5" in best else sorted(best)[0]


def _budget_ticks(ax: Any, part: pd.DataFrame) -> None:
    gb = part.groupby("budget_kind")["budget_gb"].median()
    pos = budget_positions(part)
    ax.set_xticks(list(pos.values()))
    ax.set_xticklabels([f"{k}\n{gb[k]:.3g} GB" for k in pos], fontsize=6)
    ax.set_xlim(-0.4, max(pos.values(), default=0) + 0.4)
    ax.set_xlabel("expert budget", fontsize=7)


def log_axis(ax: Any, which: str, values: pd.Series) -> None:
    """A log axis with plain-number labels at 1, 2, 5 x 10^n; linear when the data span < 4x."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    v = values[(values > 0) & np.isfinite(values)]
    if v.empty or v.max() / v.min() < 4:
        return
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(NullFormatter())


def grid(df: pd.DataFrame, rows: list[str], title: str,
         draw: Callable[[Any, pd.DataFrame, dict[str, dict[str, Any]]], None], path: Path) -> Path:
    """Panels hardware x trace; ``draw(ax, runs_of_panel, styles)`` fills each."""
    plt = _plt()
    traces = ordered(df["trace"].tolist(), ())
    styles = style(df["label"].tolist())
    fig, axes = plt.subplots(len(rows), len(traces), figsize=(3.1 * len(traces) + 1.6, 2.6 * len(rows) + 0.6),
                             squeeze=False)
    for i, hw in enumerate(rows):
        for j, trace in enumerate(traces):
            ax = axes[i][j]
            part = df[(df["hardware"] == hw) & (df["trace"] == trace)]
            if part.empty:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes, fontsize=7)
            else:
                draw(ax, part, styles)
            ax.set_title(f"{trace} | {hw}", fontsize=8)
            ax.tick_params(labelsize=6)
    handles = [plt.Line2D([], [], ms=5, label=p, **s) for p, s in styles.items()]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _lines(column: str, ylabel: str, log: bool = False, policies: Sequence[str] | None = None,
           ref: float | None = None) -> Callable[[Any, pd.DataFrame, dict[str, dict[str, Any]]], None]:
    """A panel drawer: ``column`` over the budget, one line per policy."""

    def draw(ax: Any, part: pd.DataFrame, styles: dict[str, dict[str, Any]]) -> None:
        pos = budget_positions(part)
        for label, runs in part.groupby("label"):
            if policies is not None and runs["policy"].iloc[0] not in policies:
                continue
            runs = runs.dropna(subset=[column]).sort_values("budget_gb")
            if len(runs):
                ax.plot(runs["budget_kind"].map(pos), runs[column], lw=1, ms=4, **styles[str(label)])
        if ref is not None:
            ax.axhline(ref, color="0.4", lw=0.8, ls="--")
        if log:
            log_axis(ax, "y", part[column].dropna())
        kind = part["latency_kind"].dropna().unique() if column == "latency_ms" else []
        ax.set_ylabel(ylabel.format(kind="/".join(k.upper() for k in kind if k) or "latency"), fontsize=7)
        _budget_ticks(ax, part)

    return draw


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where no other point is at least as good on both (lower x, lower y) and better on one."""
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        keep[i] = not dominated.any()
    return keep


def _quality_budget(ax: Any, part: pd.DataFrame, styles: dict[str, dict[str, Any]]) -> None:
    pos = budget_positions(part)
    for label, runs in part.groupby("label"):
        runs = runs.dropna(subset=["quality_proxy"]).sort_values("budget_gb")
        if runs.empty:
            continue
        s = styles[str(label)]
        x = runs["budget_kind"].map(pos).to_numpy()
        q = runs["quality_proxy"].to_numpy()
        front = pareto_mask(runs["budget_gb"].to_numpy(), q)
        ax.plot(x[front], q[front], lw=1, ms=4, **s)
        ax.plot(x[~front], q[~front], ls="", ms=4, mfc="none", marker=s["marker"], color=s["color"])
    ax.set_ylabel("quality proxy (lower is better)", fontsize=7)
    _budget_ticks(ax, part)


def _quality_latency(ax: Any, part: pd.DataFrame, styles: dict[str, dict[str, Any]]) -> None:
    part = part.dropna(subset=["latency_ms", "quality_proxy"])
    sizes = part["budget_gb"].rank(method="dense")
    for label, runs in part.groupby("label"):
        ax.scatter(runs["latency_ms"], runs["quality_proxy"], s=8 + 8 * sizes[runs.index], alpha=0.8,
                   color=styles[str(label)]["color"], marker=styles[str(label)]["marker"], lw=0)
    if len(part):
        x, y = part["latency_ms"].to_numpy(), part["quality_proxy"].to_numpy()
        front = pareto_mask(x, y)
        order = np.argsort(x[front])
        ax.step(x[front][order], y[front][order], where="post", color="k", lw=0.8)
    log_axis(ax, "x", part["latency_ms"])
    kind = "/".join(k.upper() for k in part["latency_kind"].unique() if k) or "latency"
    ax.set_xlabel(f"{kind} (ms); marker size: budget", fontsize=7)
    ax.set_ylabel("quality proxy", fontsize=7)


def _precision_mix(steps: pd.DataFrame, title: str, path: Path) -> Path:
    plt = _plt()
    cols = [c for c in steps.columns if c.startswith("act_") and steps[c].sum() > 0]
    share = steps[cols].div(steps[cols].sum(axis=1).clip(lower=1), axis=0)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.stackplot(np.arange(len(steps)), share.to_numpy().T, labels=[c[4:] for c in cols], step="post")
    ax.set_xlabel("forward pass (prefill, then decode; batches in order)")
    ax.set_ylabel("share of activations")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def pick_mix_run(df: pd.DataFrame, hardware: str) -> pd.Series | None:
    """A run worth showing the precision mix of: a dynamic mixed-precision policy on the
    primary GPU, the trace with the most decode passes, its largest feasible budget."""
    ok = df[(df["status"] == "ok") & (df["hardware"] == hardware)]
    for policy in ("dynaexq", "dynamo", "dymoe", "hobbit"):
        runs = ok[ok["policy"] == policy]
        if len(runs):
            return runs.sort_values(["passes", "budget_gb"], ascending=False).iloc[0]
    return ok.iloc[0] if len(ok) else None


def oracle_ratio(df: pd.DataFrame, column: str = "latency_ms") -> pd.DataFrame:
    """``column`` of each run over the oracle's at the same trace, GPU and budget."""
    ok = df[df["status"] == "ok"]
    keys = ["trace", "hardware", "budget_gb"]
    ref = ok[ok["label"] == "oracle"].groupby(keys)[column].first().rename("oracle_value")
    out = ok.join(ref, on=keys)
    out["oracle_ratio"] = out[column] / out["oracle_value"].where(out["oracle_value"] > 0)
    return out


def draw_all(df: pd.DataFrame, root: Path, out: Path) -> dict[str, Path]:
    """Every figure of the report; returns name -> PNG path."""
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df["status"] == "ok"]
    hw = primary_hardware(df)
    gpus = ordered(ok["hardware"].tolist(), ("h100_pcie5", "a6000", "rtx5090"))
    figs = {
        "quality_vs_budget": grid(ok, [hw], "Quality proxy vs expert budget (filled: the policy's Pareto front)",
                                  _quality_budget, out / "quality_vs_budget.png"),
        "quality_vs_latency": grid(ok, [hw], "Quality vs latency, every policy and budget (black: Pareto front)",
                                   _quality_latency, out / "quality_vs_latency.png"),
        "latency_vs_budget": grid(ok, gpus, "Latency vs expert budget", _lines("latency_ms", "{kind} (ms)",
                                  log=True), out / "latency_vs_budget.png"),
        "stall_share": grid(ok, gpus, "Stall share: time waiting for expert copies / simulated time",
                            _lines("stall_share", "stall share"), out / "stall_share.png"),
        "pcie_bytes_per_token": grid(ok.assign(h2d_mb_per_token=ok["h2d_bytes_per_token"] / 1e6), gpus,
                                     "Host-to-device traffic per token",
                                     _lines("h2d_mb_per_token", "PCIe MB / token", log=True),
                                     out / "pcie_bytes_per_token.png"),
    }
    ratio = oracle_ratio(df)
    figs["oracle_gap"] = grid(ratio[ratio["policy"].isin(ONLINE)], gpus,
                              "Online policies: latency / oracle's at the same trace, GPU and budget",
                              _lines("oracle_ratio", "latency / oracle", log=True, policies=ONLINE, ref=1.0),
                              out / "oracle_gap.png")
    run = pick_mix_run(df, hw)
    if run is not None and (root / run["run_dir"] / "steps.parquet").exists():
        steps = pd.read_parquet(root / run["run_dir"] / "steps.parquet")
        title = f"precision mix over time: {run['policy']} | {run['trace']} | {run['hardware']} | {run['budget_kind']}"
        figs["precision_mix"] = _precision_mix(steps, title, out / "precision_mix.png")
    return figs
