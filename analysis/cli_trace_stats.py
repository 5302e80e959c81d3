"""``moebits analysis trace-stats``: skew, reuse and reuse-distance statistics of the study's workloads."""

from __future__ import annotations

import argparse
from pathlib import Path

from moebits.analysis.report import markdown_table
from moebits.analysis.tracestats import BUDGETS, stats_table, study_traces

EPILOG = f"""Each workload is exactly what the study replays: conf/experiment/trace/<name>.yaml
(its trace file in the cache of `moebits analysis prepare-traces`, batch and max_seqs cap).
Columns: top10_share (skew), step_reuse (same-layer reuse between consecutive steps),
cold_frac, median_distance_frac (median reuse distance over layers x experts), and per
budget kind ({', '.join(BUDGETS)}) the hit rate of an LRU cache of that many bf16 experts
(lru_hit, from the stack distances), of a static cache of the replay's most used experts
(freq_hit, in-sample) and of the held-out profile's most used experts (profile_hit).
Definitions: analysis/tracestats.py."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace-stats",
        help="skew, reuse and reuse-distance (LRU vs frequency hit rate) of the study's workloads",
        description="Statistics that explain cache-policy results: skew, reuse and the LRU hit "
        "rate from reuse (stack) distances against a frequency-ranked static cache.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("traces", nargs="*", help="study trace names (default: all of conf/experiment/trace/)")
    p.add_argument("-o", "--out", type=Path, default=None, help="also write the table here (.csv or .md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    df = stats_table(args.traces or study_traces())
    text = markdown_table(df.T)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".md":
            args.out.write_text(text + "\n")
        else:
            df.to_csv(args.out)
        print(f"wrote {args.out}")
    return 0
