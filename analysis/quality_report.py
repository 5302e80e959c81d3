"""Tables, figure and JSON of the measured-quality study (:mod:`analysis.quality`).

``gap_rows``: for every policy other than the two baselines, at each budget and workload, the
fraction of the baseline -> bf16 KL gap it recovers, measured (KL) and predicted (the proxy
graded with the EVALUATION table), against static uniform and against static frequency at the
same budget. ``spearman_of``: rank correlation of predicted vs measured KL over the feasible
runs. ``render``: docs/QUALITY.md's generated part.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from moebits.analysis.quality import RunRow

BASELINES = ("static_uniform", "static_frequency")


def frame(rows: Sequence[RunRow]) -> pd.DataFrame:
    return pd.DataFrame([dataclasses.asdict(r) for r in rows])


def recovered(base: float, value: float) -> float:
    """``(base - value) / (base - 0)``: the share of the base -> bf16 gap recovered (NaN if no gap)."""
    if not (math.isfinite(base) and math.isfinite(value)) or base <= 0:
        return float("nan")
    return (base - value) / base


def gap_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (workload, budget, policy): gap recovered vs each baseline, measured and predicted."""
    ok = df[df.status == "ok"].set_index(["workload", "budget", "policy"])
    out = []
    for (w, b, p), r in ok.iterrows():
        if p in BASELINES:
            continue
        row: dict[str, Any] = {"workload": w, "budget": b, "policy": p}
        for base in BASELINES:
            key = (w, b, base)
            kb = ok.loc[key] if key in ok.index else None
            row[f"measured_vs_{base}"] = recovered(kb.kl_mean, r.kl_mean) if kb is not None else float("nan")
            row[f"predicted_vs_{base}"] = recovered(kb.proxy, r.proxy) if kb is not None else float("nan")
        out.append(row)
    return pd.DataFrame(out)


def spearman_of(df: pd.DataFrame, x: str = "proxy", y: str = "kl_mean", nonzero: bool = False) -> tuple[float, int]:
    """Spearman of ``x`` vs ``y`` over the feasible runs (``nonzero``: only runs with KL > 0,
    i.e. without the runs that served everything at bf16)."""
    ok = df[(df.status == "ok") & np.isfinite(df[x]) & np.isfinite(df[y])]
    if nonzero:
        ok = ok[ok[y] > 0]
    if len(ok) < 3:
        return float("nan"), len(ok)
    return float(ok[x].rank().corr(ok[y].rank())), len(ok)


def to_json(df: pd.DataFrame, gaps: pd.DataFrame, facts: dict[str, Any], path: Path) -> Path:
    """``quality.json``: per run policy, budget, workload, proxy, kl_mean, bpb, gap_recovered, ..."""
    runs = []
    g = gaps.set_index(["workload", "budget", "policy"]) if len(gaps) else None
    for r in df.to_dict("records"):
        key = (r["workload"], r["budget"], r["policy"])
        gap = {} if g is None or key not in g.index else {k: _num(v) for k, v in g.loc[key].items()}
        runs.append({**{k: _num(v) for k, v in r.items()}, "gap_recovered": gap})
    rho, n = spearman_of(df)
    rho_nz, n_nz = spearman_of(df, nonzero=True)
    rho_self, _ = spearman_of(df, "proxy_policy_table")
    body = {"facts": facts, "spearman_proxy_vs_kl": {"rho": rho, "runs": n, "rho_kl_above_0": rho_nz,
                                                     "runs_kl_above_0": n_nz, "proxy_with_policy_table_rho": rho_self},
            "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def _num(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return None if not math.isfinite(float(v)) else round(float(v), 6)
    return v


def figure(df: pd.DataFrame, path: Path) -> Path:
    """Predicted (proxy x layers) vs measured KL, log-log, one marker per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[(df.status == "ok") & (df.kl_mean > 0)]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for p, sub in ok.groupby("policy"):
        ax.scatter(sub.proxy * 8, sub.kl_mean, label=p, s=22)
    lo, hi = ok.kl_mean.min() / 2, ok.kl_mean.max() * 2
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="y = x")
    ax.set(xscale="log", yscale="log", xlabel="predicted KL: proxy x 8 layers (EVALUATION table), nats",
           ylabel="measured KL vs bf16, nats/position", title="trained MoE, CPU: proxy vs measured KL")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float | np.floating):
        return "-" if not math.isfinite(float(v)) else f"{float(v):.{digits}g}"
    return str(v)


def markdown_table(df: pd.DataFrame, cols: Sequence[str], digits: int = 4) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df[list(cols)].itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, digits) for v in r) + " |")
    return lines


BEGIN, END = "<!-- generated by moebits analysis quality: begin -->", "<!-- generated: end -->"


def splice(path: Path, generated: str) -> Path:
    """Put ``generated`` between the markers of ``path`` (the whole file if it has none)."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + generated + END + rest.split(END, 1)[1]
    else:
        text = BEGIN + "\n" + generated + END + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def render(df: pd.DataFrame, gaps: pd.DataFrame, facts: dict[str, Any], figure_rel: str) -> str:
    """The generated part of docs/QUALITY.md."""
    rho, n = spearman_of(df)
    rho_nz, n_nz = spearman_of(df, nonzero=True)
    rho_self, _ = spearman_of(df, "proxy_policy_table")
    ratio = (df.proxy * 8 / df.kl_mean)[(df.status == "ok") & (df.kl_mean > 0)]
    runs = df.copy()
    runs["mix"] = runs.precision_mix.map(lambda m: " ".join(f"{k}:{v:.2f}" for k, v in (m or {}).items()))
    runs["pred_kl"] = runs.proxy * 8
    feasible = runs[runs.status == "ok"]
    infeasible = runs[runs.status != "ok"]
    lines = [
        f"Spearman(proxy graded with the EVALUATION table, measured KL) over **{n} runs: {rho:.3f}**; over the "
        f"{n_nz} runs with KL > 0 (leaving out those that served every expert at bf16): **{rho_nz:.3f}**. "
        f"The proxy graded with the policy's own CALIBRATION table: {rho_self:.3f}. Magnitude: predicted / "
        f"measured KL has median {ratio.median():.2f} (range {ratio.min():.2f}-{ratio.max():.2f}).",
        "",
        f"![proxy vs measured KL]({figure_rel})",
        "",
        "### Every run (measured on the EVALUATION workloads, CPU)",
        "",
        f"<details><summary>{len(feasible)} runs: click to open</summary>",
        "",
        "`pred_kl` = proxy x 8 layers (the EVALUATION table's unit makes it a KL estimate in nats); `kl_mean`, "
        "`kl_decode` = measured KL(bf16 || served) per position (all / decode positions); `bpb` = bits per byte "
        f"(bf16 model on the same bytes: {', '.join(f'{k} {v:.4f}' for k, v in facts['bf16_bpb'].items())}).",
        "",
        *markdown_table(feasible, ["workload", "budget", "policy", "pred_kl", "kl_mean", "kl_decode", "bpb",
                                   "bpb_decode", "tpot_ms", "mix"]),
        "",
        "</details>",
        "",
    ]
    if len(infeasible):
        lines += ["Infeasible at these budgets (the policy's configuration needs more bytes):", "",
                  *markdown_table(infeasible, ["workload", "budget", "policy", "status"]), ""]
    lines += ["### Gap recovered: measured (predicted)", "",
              "Share of the baseline -> bf16 KL gap a policy closes at the same budget, measured from KL, with the "
              "simulator's prediction (the same ratio of EVALUATION-graded proxies) in parentheses: 1 = bf16 "
              "quality, 0 = no better than the baseline, < 0 = worse. `-`: no gap to close (the baseline is "
              "bf16-exact) or a run was infeasible.", ""]
    lines += gap_pivots(gaps)
    return "\n".join(lines) + "\n"


def gap_pivots(gaps: pd.DataFrame) -> list[str]:
    """Per workload and baseline: policy x budget cells ``measured (predicted)``."""
    if not len(gaps):
        return []
    out: list[str] = []
    budgets = list(dict.fromkeys(gaps.budget))
    policies = list(dict.fromkeys(gaps.policy))
    for w in dict.fromkeys(gaps.workload):
        for base in BASELINES:
            part = gaps[gaps.workload == w].set_index(["policy", "budget"])
            out += [f"{w}, against {base}:", "", "| policy | " + " | ".join(budgets) + " |",
                    "|---|" + "---:|" * len(budgets)]
            for p in policies:
                cells = []
                for b in budgets:
                    if (p, b) not in part.index:
                        cells.append("-")
                        continue
                    m, pr = part.loc[(p, b), f"measured_vs_{base}"], part.loc[(p, b), f"predicted_vs_{base}"]
                    cells.append("-" if not math.isfinite(m) else f"{m:.2f} ({pr:.2f})")
                out.append(f"| {p} | " + " | ".join(cells) + " |")
            out.append("")
    return out
