"""``moebits analysis quality``: measured quality of every policy x budget on the trained MoE."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moebits.analysis import quality as q
from moebits.analysis import quality_report as qr

TRAIN_DATA = Path(__file__).resolve().parents[1] / "train" / "data"

DESCRIPTION = """\
Replay the trained model's EVALUATION workloads (code, prose) under every policy x budget in the
simulator (policies read the CALIBRATION sensitivity table and CALIBRATION profiles), then
measure on the CPU what each run's decisions cost: next-byte KL against bf16 and bits per byte,
the model teacher-forced over the workload's bytes with every routed expert served at the
logged precision. Beside each measured figure: the simulator's quality proxy graded with the
EVALUATION table. Writes the per-run JSON, the figure and the generated Markdown (for
docs/QUALITY.md). Needs the built corpus (moebits train corpus).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quality", help="measured KL / bpb of every policy x budget on the trained MoE (CPU)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="built corpus (moebits train corpus)")
    p.add_argument("--model-dir", type=Path, default=TRAIN_DATA / "model", metavar="DIR")
    p.add_argument("--traces", type=Path, default=TRAIN_DATA / "traces", metavar="DIR")
    p.add_argument("--tables", type=Path, default=TRAIN_DATA / "sensitivity", metavar="DIR",
                   help="holds calibration.parquet and evaluation.parquet")
    p.add_argument("--policies", nargs="+", default=list(q.POLICIES))
    p.add_argument("--budgets", nargs="+", default=list(q.BUDGETS))
    p.add_argument("--workloads", nargs="+", default=list(q.WORKLOADS))
    p.add_argument("--json", type=Path, default=Path("docs/results/quality.json"))
    p.add_argument("--figure", type=Path, default=Path("docs/figures/quality_proxy_vs_kl.png"))
    p.add_argument("--markdown", type=Path, default=Path("docs/QUALITY.md"),
                   help="the generated tables go between its markers (the whole file if it has none)")
    p.add_argument("--profile-kind", choices=("same", "other"), default="same",
                   help="offline policies' CALIBRATION profile: of the workload's kind, or of the other kind")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    paths = q.StudyPaths(args.data, args.model_dir, args.traces, args.tables / "calibration.parquet",
                         args.tables / "evaluation.parquet")
    rows, facts = q.run_study(paths, args.policies, args.budgets, args.workloads, progress=not args.no_progress,
                              profile_kind=args.profile_kind)
    df = qr.frame(rows)
    gaps = qr.gap_rows(df)
    qr.to_json(df, gaps, facts, args.json)
    qr.figure(df, args.figure)
    rel = os.path.relpath(args.figure.resolve(), args.markdown.resolve().parent)
    qr.splice(args.markdown, qr.render(df, gaps, facts, rel))
    rho, n = qr.spearman_of(df)
    print(f"{len(df)} runs ({n} feasible); Spearman(proxy, measured KL) = {rho:.3f}; "
          f"wrote {args.json}, {args.figure}, {args.markdown}")
    return 0
