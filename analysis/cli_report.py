"""``moebits analysis report MULTIRUN_DIR [-o OUT_DIR]``: a sweep as tables, figures and report.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from moebits.analysis.report import write_report

EPILOG = """Reads every run below MULTIRUN_DIR (a folder with summary.json, error.txt or .hydra/)
and writes to OUT_DIR (default MULTIRUN_DIR/report):

  runs.parquet, runs.csv    one row per run: its overrides (policy, budget, hardware,
                            experiment/trace, ...), every summary.json key (nested ones as
                            activations.bf16, policy_metrics.prefetch_hit_rate, ...), and
                            derived columns: trace, status (ok/error/missing), error, tokens,
                            stall_share, h2d_bytes_per_token, bf16_share, latency_ms
                            (TPOT mean, or TTFT for prefill-only traces) and latency_kind
  quality_vs_budget.png     quality proxy vs budget per policy (filled: its Pareto front)
  quality_vs_latency.png    quality vs latency for every policy and budget, Pareto front
  latency_vs_budget.png     TPOT (or TTFT) vs budget, per GPU and trace
  stall_share.png           share of simulated time spent waiting for expert copies
  pcie_bytes_per_token.png  host-to-device MB per token
  oracle_gap.png            online policies' latency over the Belady oracle's
  precision_mix.png         precision mix over the passes of one dynamic-policy run
  report.md                 all of it, with per-trace policy x budget tables and the list of
                            failed (e.g. infeasible) runs

example: moebits analysis report multirun/seed_policies -o multirun/seed_policies/report"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tidy table (runs.parquet/csv), figures (PNG) and report.md of a moebits sim sweep",
        description="Turn a hydra multirun of moebits sim into one tidy table of runs, the "
        "figures a paper needs and a Markdown report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("multirun_dir", type=Path, help="the sweep's directory (hydra.sweep.dir)")
    p.add_argument("-o", "--out", type=Path, default=None, help="output directory (default: MULTIRUN_DIR/report)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = write_report(args.multirun_dir, args.out, progress=not args.no_progress)
    print(f"wrote {path} (and runs.parquet, runs.csv, figures) in {path.parent}")
    return 0
