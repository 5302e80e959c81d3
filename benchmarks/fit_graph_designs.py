"""Fit the graph path's whole-pass cost tables to timed designs and write a hardware profile.

Reads the JSON files of ``benchmarks/graph_designs.py`` (one model shape each) and the per-layer
turnaround runs of ``benchmarks/h200_graph_fidelity.sh`` (``turnaround.json``: a synthetic
workload, static int4 policy, per-layer graphs vs whole-step graphs, same model), fits one
:class:`core.hardware.GraphPassTable` per shape for decode and one for prefill passes
(:func:`runtime.pass_designs.fit_pass_table`), sets ``layer_sync_s`` (per-layer TPOT minus the
fitted whole-step pass, per layer) and writes ``--base`` with them as ``--out``. No trace is
read: the profile is fitted to synthetic designs only and graded on traces elsewhere.

    python benchmarks/fit_graph_designs.py designs_*.json --turnaround turnaround.json \\
        --base conf/hardware/calibrated_h200.yaml --out conf/hardware/calibrated_h200.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from moebits.core.hardware import GraphPassTable, HardwareProfile
from moebits.core.model_spec import ModelSpec
from moebits.runtime.pass_designs import fit_pass_table


def turnaround_s(runs: dict[str, Any], table: GraphPassTable, layers: int) -> float:
    """Per layer step: per-layer-graph TPOT minus the fitted whole pass (int4, one row, mean context)."""
    ctx = 32 + 32  # the synthetic workload: 32-token prompts, 64 decode tokens (mean position)
    k = table.top_k
    whole = (table.at(table.fixed_s, 1)[()] + layers * (table.at(table.layer_s, 1)[()] + ctx * table.at(table.layer_ctx_s, 1)[()]
             + k * (table.at(table.token_s["int4"], 1)[()] + table.at(table.expert_s["int4"], 1)[()])))
    return max(0.0, (runs["0"]["tpot_ms_mean"] * 1e-3 - float(whole)) / layers)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("designs", nargs="+", type=Path)
    ap.add_argument("--turnaround", type=Path, default=None)
    ap.add_argument("--turnaround-layers", type=int, default=8)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    body = yaml.safe_load(args.base.read_text())
    defaults = body.pop("defaults", None)
    tables: list[GraphPassTable] = []
    for path in args.designs:
        d = json.loads(path.read_text())
        spec = ModelSpec(**d["meta"]["model"])
        for prefill in (False, True):
            t = fit_pass_table(d["rows"], d["meta"]["precisions"], spec, prefill)
            tables.append(t)
            print(f"{path.name} {'prefill' if prefill else 'decode'}: {len(t.rows)} row counts, fit {t.fit}")
    hw = HardwareProfile.from_dict({**body, "graph_tables": [t.__dict__ for t in tables]})
    if args.turnaround is not None:
        runs = json.loads(args.turnaround.read_text())
        hw.layer_sync_s = turnaround_s(runs, tables[0], args.turnaround_layers)
        print(f"layer_sync_s {hw.layer_sync_s * 1e6:.1f} us")
    out = hw.to_dict()
    out["source"] = (body.get("source", "") + "; graph_tables fitted to whole-pass designs "
                     f"({', '.join(p.name for p in args.designs)})").lstrip("; ")
    text = yaml.safe_dump(({"defaults": defaults} if defaults else {}) | out, sort_keys=False)
    args.out.write_text(f"# {out['source']}\n" + text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
