"""``moebits traces info TRACE``: validate a trace and print its shape and provenance."""

from __future__ import annotations

import argparse

from moebits.traces.format import Phase, read_trace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="validate a trace file and print its shape and provenance")
    p.add_argument("trace", help="a moebits .parquet trace")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t = read_trace(args.trace)
    s = t.spec
    print(f"{args.trace}: valid moebits trace")
    print(f"  model      {s.name}: {s.layers} MoE layers x {s.experts} experts, top-{s.top_k}")
    print(f"  rows       {t.rows:,} (seq, step, layer) records, {t.num_seqs} sequences")
    print(f"  tokens     {t.tokens(Phase.PREFILL):,} prefill, {t.tokens(Phase.DECODE):,} decode")
    print(f"  gates      {'yes' if t.gate is not None else 'none'}")
    for key, value in sorted(t.meta.provenance.items()):
        print(f"  {key:<10} {value}")
    return 0
