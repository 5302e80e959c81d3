"""The seed study's results table (``docs/results/seed_study_h200.csv``) from sweep reports.

Each argument is a ``moebits analysis report`` folder (its ``runs.parquet``) of a seed-study sweep,
optionally ``FOLDER:ROUTE_LAG`` when the sweep set ``route_lag`` on the command line (the runs table
records the swept parameters only). The rows of the CSV with the same (hardware, route_lag) as the
new rows are replaced; the others are kept, so one profile's sweep can be redone alone:

    moebits analysis report multirun/seed_h200_v7 -o multirun/seed_h200_v7/report
    python benchmarks/seed_study_csv.py multirun/seed_h200_v7/report multirun/seed_h200_v7_pass2/report:2 \\
        --csv docs/results/seed_study_h200.csv
    python benchmarks/seed_study_csv.py - --csv docs/results/seed_study_h200.csv --tables all_int4,bf16_50pct

``--tables``: TPOT (DeepSeek: TTFT) in ms per policy and trace, ``h100_pcie5 -> calibrated_h200`` on the
per-layer seam and ``[calibrated_h200 on the per-pass seam]``, as docs/FINDINGS.md section 5 shows them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

COLUMNS = ["trace", "budget", "budget_gb", "policy", "hardware", "route_lag", "status", "tpot_ms", "ttft_ms", "stall_s",
           "stall_share", "h2d_bytes", "quality_proxy", "hit_rate", "bf16_share", "promotions", "error"]


def study_rows(report: Path, route_lag: int) -> pd.DataFrame:
    """The study's columns of one report's runs table."""
    runs = pd.read_parquet(report / "runs.parquet").rename(columns={"tpot_ms_mean": "tpot_ms"})
    runs["route_lag"] = runs["config.route_lag"] if "config.route_lag" in runs else route_lag
    missing = [c for c in COLUMNS if c not in runs]
    if missing:
        raise ValueError(f"{report}/runs.parquet lacks {missing}: is it a seed-study report (moebits analysis report)?")
    return runs[COLUMNS]


TRACES = ["synthetic", "mixtral", "llama4_small", "deepseek", "qwen15"]
POLICIES = ["static_uniform", "static_frequency", "routernorm", "mxmoe", "dynamo", "dynaexq", "dymoe", "hobbit",
            "lru_offload", "lfu_offload", "oracle"]


def table_md(study: pd.DataFrame, budget: str, base: str = "h100_pcie5", hw: str = "calibrated_h200") -> str:
    """TPOT (DeepSeek: TTFT), ms, ``base`` -> ``hw`` on the per-layer seam, [``hw`` on the per-pass seam]."""
    def cell(trace: str, policy: str) -> str:
        metric = "ttft_ms" if trace == "deepseek" else "tpot_ms"
        vals = []
        for h, lag in ((base, 0), (hw, 0), (hw, 2)):
            row = study[(study.trace == trace) & (study.budget == budget) & (study.policy == policy)
                        & (study.hardware == h) & (study.route_lag == lag)]
            ok = row[row.status == "ok"]
            vals.append(f"{ok[metric].iloc[0]:.3g}" if len(ok) else ("-" if row.empty else "inf."))
        return f"{vals[0]} → {vals[1]}" + (f" [{vals[2]}]" if vals[2] != "-" else "")
    lines = ["| policy | " + " | ".join(TRACES) + " |", "|---" * (len(TRACES) + 1) + "|"]
    lines += [f"| {p} | " + " | ".join(cell(t, p) for t in TRACES) + " |" for p in POLICIES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="report folders, each optionally :ROUTE_LAG (default 0)")
    ap.add_argument("--csv", type=Path, required=True, help="the study table to update (created if absent)")
    ap.add_argument("--tables", default="", help="print the Markdown tables of these budgets (comma-separated) after")
    args = ap.parse_args(argv)
    if args.reports == ["-"]:   # tables only
        for b in filter(None, args.tables.split(",")):
            print(f"{b}:\n\n{table_md(pd.read_csv(args.csv), b)}\n")
        return
    new = []
    for spec in args.reports:
        folder, _, lag = spec.partition(":")
        new.append(study_rows(Path(folder), int(lag or 0)))
    fresh = pd.concat(new, ignore_index=True)
    old = pd.read_csv(args.csv) if args.csv.exists() else pd.DataFrame(columns=COLUMNS)
    redone = set(zip(fresh["hardware"], fresh["route_lag"].astype(int), strict=True))
    keep = old[[(h, int(r)) not in redone for h, r in zip(old["hardware"], old["route_lag"], strict=True)]]
    out = pd.concat([keep, fresh], ignore_index=True).sort_values(["trace", "budget", "policy", "hardware", "route_lag"])
    args.csv.write_text(out.to_csv(index=False))
    print(f"{args.csv}: {len(fresh)} rows replaced or added for {sorted(redone)}, {len(keep)} kept")
    for b in filter(None, args.tables.split(",")):
        print(f"\n{b}:\n\n{table_md(out, b)}")


if __name__ == "__main__":
    main()
