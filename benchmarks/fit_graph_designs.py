"""Fit the graph path's whole-pass cost tables and host costs, and write a hardware profile.

Reads the JSON files of ``benchmarks/graph_designs.py`` (one model shape each) and fits one
:class:`core.hardware.GraphPassTable` per shape for decode and one for prefill passes
(:func:`runtime.pass_designs.fit_pass_table`), replacing the same shape's tables of ``--base``;
with ``--host-runs DIR`` (runs measured by ``moebits analysis validate`` on the synthetic cases of
``benchmarks/graph_cases_calibration.txt``) it also fits the host costs: ``host_costs``,
``layer_sync_s`` and ``stall_sync_s`` (:func:`analysis.hostcost.fit_host_costs`). No trace is read: the profile comes from synthetic
designs and workloads only, and is graded on traces elsewhere.

    python benchmarks/fit_graph_designs.py designs_*.json --host-runs val/ \\
        --base conf/hardware/calibrated_h200.yaml --out conf/hardware/calibrated_h200.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import yaml
from moebits.core.hardware import HardwareProfile
from moebits.core.model_spec import ModelSpec
from moebits.runtime.pass_designs import fit_tables


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("designs", nargs="*", type=Path, help="designs JSON files (benchmarks/graph_designs.py)")
    ap.add_argument("--host-runs", type=Path, default=None, help="measured synthetic calibration cases")
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    body = yaml.safe_load(args.base.read_text())
    defaults = body.pop("defaults", None)
    tables = {(t["hidden"], t["intermediate"], t["experts"], t["top_k"], t["prefill"], tuple(t.get("classes") or ())): t
              for t in body.get("graph_tables", []) or []}
    for path in args.designs:
        d = json.loads(path.read_text())
        spec = ModelSpec(**d["meta"]["model"])
        for t in fit_tables(d["rows"], d["meta"]["precisions"], spec):
            tables.pop((t.hidden, t.intermediate, t.experts, t.top_k, t.prefill, ()), None)  # superseded: measured per class set
            tables[(t.hidden, t.intermediate, t.experts, t.top_k, t.prefill, tuple(t.classes))] = dataclasses.asdict(t)
            print(f"{path.name} {'prefill' if t.prefill else 'decode'} {'+'.join(t.classes)}: {len(t.rows)} row counts, "
                  f"fit {t.fit}")
    hw = HardwareProfile.from_dict({**body, "graph_tables": list(tables.values())})
    if args.host_runs is not None:
        from moebits.analysis.hostcost import describe, fit_host_costs

        hw = fit_host_costs(hw, args.host_runs)
        print(describe(hw))
    out = hw.to_dict()
    if args.designs and "graph_tables fitted" not in out["source"]:
        out["source"] += "; graph_tables fitted to whole-pass designs (benchmarks/fit_graph_designs.py)"
    text = yaml.safe_dump(({"defaults": defaults} if defaults else {}) | out, sort_keys=False)
    args.out.write_text(f"# {out['source']}\n" + text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
