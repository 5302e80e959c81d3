"""``moebits analysis fidelity DIR``: the fidelity table of ``DIR/fidelity.json`` as Markdown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moebits.analysis.fidelity import (
    by_policy,
    collect_passes,
    error_vs_spread,
    policy_plot,
    scatter,
    spread_plot,
    summary_md,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fidelity", help="render DIR/fidelity.json (moebits analysis validate) as a Markdown table",
                       description="Print the fidelity table of the rows `moebits analysis validate` wrote, with "
                       "the aggregate errors against the targets and every decision divergence.")
    p.add_argument("dir", type=Path, help="a folder holding fidelity.json, or the JSON file itself")
    p.add_argument("-o", "--out", type=Path, default=None, help="also write the Markdown here")
    p.add_argument("--plot", type=Path, default=None, help="one scatter of every case's passes (simulated vs measured)")
    p.add_argument("--passes", type=Path, default=None, help="every case's passes in one CSV (with a case column)")
    p.add_argument("--spread-plot", type=Path, default=None,
                   help="per case measured in two device calls (CASE, CASE_s2): the simulator's error against the "
                   "two measurements' mean vs how far the two differ")
    p.add_argument("--policy-plot", type=Path, default=None,
                   help="per policy: the simulator's mean |TPOT error| beside the mean two-call spread of its cases")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = args.dir / "fidelity.json" if args.dir.is_dir() else args.dir
    if not path.exists():
        raise ValueError(f"{path} does not exist (run moebits analysis validate first)")
    rows = json.loads(path.read_text())
    text = summary_md(rows)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.spread_plot:
        pts = error_vs_spread(rows)
        if not pts:
            raise ValueError(f"{path} has no case measured in two device calls (CASE and CASE_s2): nothing to plot")
        spread_plot(pts, args.spread_plot, title=f"simulator error vs the measurement's own spread, {len(pts)} cases")
    if args.policy_plot:
        stats = by_policy(rows)
        if not stats:
            raise ValueError(f"{path} has no validation rows (only calibration cases or repeats): nothing to plot")
        policy_plot(stats, args.policy_plot, title=f"fidelity per policy, {sum(q['runs'] for q in stats)} runs")
    if args.plot or args.passes:
        passes = collect_passes(path.parent)
        if args.plot:
            scatter(passes, args.plot, title="simulated vs measured step latency, every case")
        if args.passes:
            passes.to_csv(args.passes, index=False)
    return 0
