"""A run's files and console table, for both engines: ``summary.json``, ``steps.parquet``, ``figure.png``.

``steps.parquet`` holds one row per forward pass (see :func:`drive.records.pass_table`); the
figure (:mod:`core.plotstyle`: ``figure.pdf`` and a 300-dpi ``figure.png``) shows pass latency
over the run's time on a labelled log axis with the median decode latency marked, and, when
the run served more than one precision, the precision mix of served activations.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from moebits.core.plotstyle import PAGE_IN, log_axis, paper_style, save
from moebits.drive.records import RunResult, pass_table

SUMMARY_ROWS = (
    ("ttft_ms", "TTFT (ms, mean)"),
    ("tpot_ms_p50", "TPOT p50 (ms)"),
    ("tpot_ms_p99", "TPOT p99 (ms)"),
    ("tokens_per_s", "decode tokens/s"),
    ("stall_s", "stall (s)"),
    ("hit_rate", "hit rate (demand)"),
    ("h2d_bytes", "host->device (GB)"),
    ("hbm_peak_bytes", "peak HBM for experts (GB)"),
    ("promotions", "promotions"),
    ("demotions", "demotions"),
    ("bypasses", "bypassed (streamed)"),
    ("quality_proxy", "quality proxy"),
    ("kl_mean", "KL vs bf16 (nats, mean)"),
    ("quality_table", "  from the table"),
    ("layer_steps", "layer steps"),
    ("wall_s", "wall (s)"),
    ("layer_steps_per_s", "layer steps / wall s"),
)


def _fmt(key: str, value: Any) -> str:
    """One number the same way everywhere: 4 significant digits, thousands separated, no
    exponent; whole counts as integers; byte counts in GB."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if key.endswith("_bytes"):
        value = value / 1e9
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def quality_source(table: Any) -> str:
    """Where the quality proxy's numbers come from, said plainly."""
    text = str(table or "analytic")
    if text.startswith("synthetic"):
        return f"{text}: a SYNTHETIC sensitivity table, not measured on real weights"
    if text == "analytic":
        return "analytic default (no sensitivity table)"
    return text


def headline(summary: dict[str, Any]) -> str:
    budget = summary.get("budget_gb")
    budget_txt = f"{budget:.4g} GB" if isinstance(budget, int | float) else "? GB"
    kind = summary.get("budget_kind")
    if kind and kind != "gb":
        budget_txt += f" ({kind})"
    where = summary.get("hardware", "?")
    if summary.get("engine") == "runtime":
        where = f"{summary.get('device', '?')} ({summary.get('mode', '?')})"
    return (f"{summary.get('policy', '?')} | {summary.get('model', '?')} on {where} | "
            f"budget {budget_txt} | batch {summary.get('batch', '?')}")


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the headline numbers."""
    head = headline(summary)
    rows = [(label, quality_source(summary.get(key)) if key == "quality_table" else _fmt(key, summary.get(key)))
            for key, label in SUMMARY_ROWS if key in summary]
    mix = summary.get("activations") or {}
    total = sum(mix.values()) or 1
    rows.append(("precision mix", ", ".join(f"{p} {n / total:.1%}" for p, n in mix.items() if n)))
    shown = {key for key, _ in SUMMARY_ROWS}
    rows += [(f"policy: {k}", _fmt(k, v)) for k, v in (summary.get("policy_metrics") or {}).items()
             if k not in shown or summary.get(k) != v]  # a counter the engine already printed, once
    width = max(len(r[0]) for r in rows)
    return "\n".join([head, *(f"  {label:<{width}}  {value}" for label, value in rows)])


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def write_summary(summary: dict[str, Any], path: Path) -> None:
    """Atomically: a half-written summary.json would make a resumed sweep skip a dead run."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_json_ready(summary), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _latency_panel(ax: Any, steps: pd.DataFrame) -> None:
    for phase, marker in (("decode", "."), ("prefill", "^")):
        part = steps[steps["phase"] == phase]
        ax.plot(part["end_s"], part["latency_s"] * 1e3, marker, ms=3, ls="", label=phase)
    decode = steps.loc[steps["phase"] == "decode", "latency_s"] * 1e3
    if len(decode):
        median = float(decode.median())
        ax.axhline(median, color="0.3", lw=0.8, ls="--", label=f"decode median\n{median:.4g} ms")
    log_axis(ax, "y", steps["latency_s"] * 1e3, min_span=3.0)
    ax.set_ylabel("pass latency (ms)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


def write_figure(steps: pd.DataFrame, precisions: list[str], path: Path, title: str = "") -> Path:
    """Pass latency over the run's time and, when more than one precision served, the precision
    mix of served activations; ``path``'s stem as PDF and PNG. Returns the PNG's path."""
    cols = [f"act_{p}" for p in [*precisions, "host"] if f"act_{p}" in steps and steps[f"act_{p}"].sum() > 0]
    mixed = len(cols) > 1
    with paper_style() as plt:
        fig, axes = plt.subplots(2 if mixed else 1, 1, figsize=(PAGE_IN, 4.6 if mixed else 2.6), sharex=True,
                                 squeeze=False)
        _latency_panel(axes[0][0], steps)
        if mixed:
            share = steps[cols].div(steps[cols].sum(axis=1).clip(lower=1), axis=0)
            ax2 = axes[1][0]
            ax2.stackplot(steps["end_s"], share.to_numpy().T, labels=[c[4:] for c in cols], step="post")
            ax2.set_ylabel("share of activations")
            ax2.set_ylim(0, 1)
            ax2.grid(False)
            ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        elif cols:
            title = f"{title} | every activation served at {cols[0][4:]}" if title else ""
        axes[-1][0].set_xlabel("run time (s)")
        if title:
            fig.suptitle(title)
        return save(fig, path)


def write_outputs(result: RunResult, summary: dict[str, Any], out_dir: Path, figure: bool = True) -> None:
    """steps.parquet, the figure, then summary.json last (its presence means 'finished')."""
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = pass_table(result)
    steps.to_parquet(out_dir / "steps.parquet", index=False)
    if figure and len(steps):
        write_figure(steps, result.precisions, out_dir / "figure", headline(summary))
    write_summary(summary, out_dir / "summary.json")
