"""A run's files and console table, for both engines: ``summary.json``, ``steps.parquet``, ``figure.png``.

``steps.parquet`` holds one row per forward pass (see :func:`drive.records.pass_table`); the
figure shows pass latency and the precision mix of served activations over the run's time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from moebits.drive.records import RunResult, pass_table

SUMMARY_ROWS = (
    ("ttft_ms", "TTFT (ms, mean)"),
    ("tpot_ms_p50", "TPOT p50 (ms)"),
    ("tpot_ms_p99", "TPOT p99 (ms)"),
    ("tokens_per_s", "decode tokens/s"),
    ("stall_s", "stall (s)"),
    ("h2d_bytes", "host->device (GB)"),
    ("hbm_peak_bytes", "peak HBM for experts (GB)"),
    ("promotions", "promotions"),
    ("demotions", "demotions"),
    ("quality_proxy", "quality proxy"),
    ("kl_mean", "KL vs bf16 (nats, mean)"),
    ("layer_steps", "layer steps"),
    ("wall_s", "wall (s)"),
    ("layer_steps_per_s", "layer steps / wall s"),
)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{value / 1e9:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


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
    rows = [(label, _fmt(key, summary.get(key))) for key, label in SUMMARY_ROWS if key in summary]
    mix = summary.get("activations") or {}
    total = sum(mix.values()) or 1
    rows.append(("precision mix", ", ".join(f"{p} {n / total:.1%}" for p, n in mix.items() if n)))
    rows += [(f"policy: {k}", _fmt(k, v)) for k, v in (summary.get("policy_metrics") or {}).items()]
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


def write_figure(steps: pd.DataFrame, precisions: list[str], path: Path, title: str = "") -> None:
    """Pass latency over simulated time, and the precision mix of served activations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for phase, marker in (("decode", "."), ("prefill", "^")):
        part = steps[steps["phase"] == phase]
        ax1.plot(part["end_s"], part["latency_s"] * 1e3, marker, ms=3, ls="", label=phase)
    ax1.set_ylabel("pass latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right")
    cols = [f"act_{p}" for p in [*precisions, "host"] if steps[f"act_{p}"].sum() > 0]
    share = steps[cols].div(steps[cols].sum(axis=1).clip(lower=1), axis=0)
    ax2.stackplot(steps["end_s"], share.to_numpy().T, labels=[c[4:] for c in cols], step="post")
    ax2.set_ylabel("share of activations")
    ax2.set_xlabel("run time (s)")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: RunResult, summary: dict[str, Any], out_dir: Path, figure: bool = True) -> None:
    """steps.parquet, the figure, then summary.json last (its presence means 'finished')."""
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = pass_table(result)
    steps.to_parquet(out_dir / "steps.parquet", index=False)
    if figure and len(steps):
        write_figure(steps, result.precisions, out_dir / "figure.png", headline(summary))
    write_summary(summary, out_dir / "summary.json")
