"""The copy bubble's figures (``docs/results/copy_bubble_h200.json``) from a ``benchmarks/copy_bubble.sh`` folder.

Per variant (case ``cb_<variant>``): decode passes after a boundary that issued expert copies against those
after one that issued none, measured and simulated (the simulation of ``moebits analysis validate``, or of
``--resim`` with another profile when ``--graded`` names its output folder), and the run's TPOT errors.

    python benchmarks/copy_bubble_summary.py OUT/val --machine "NVIDIA H200 ..." -o docs/results/copy_bubble_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from moebits.drive.records import load_run


def variant(measured: Path, graded: Path, case: str, row: dict) -> dict:
    run = load_run(measured / f"{case}.measured.npz")
    passes = pd.read_csv(graded / f"{case}.passes.csv")
    copies = run.host["copies"][: len(passes)]
    passes = passes.iloc[: len(copies)].assign(copies=copies)
    decode = passes[passes.phase == "decode"]
    after, none = decode[decode.copies > 0], decode[decode.copies == 0]
    ms = lambda x: round(float(x.mean()) * 1e3, 4)   # noqa: E731
    return {"decode_passes": len(decode), "passes_after_copies": len(after),
            "after_copies_ms_measured": ms(after.measured_s), "after_copies_ms_simulated": ms(after.simulated_s),
            "no_copies_ms_measured": ms(none.measured_s), "no_copies_ms_simulated": ms(none.simulated_s),
            **{k: round(row[k], 4) for k in ("tpot_ms_measured", "tpot_ms_simulated", "tpot_err", "tpot_p50_err",
                                              "step_err_p95")}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measured", type=Path, help="the folder copy_bubble.sh measured into (OUT/val)")
    ap.add_argument("--graded", type=Path, default=None, help="a --resim output folder (default: MEASURED itself)")
    ap.add_argument("--machine", default="", help="the GPU, driver and date the measurement ran on")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    graded = args.graded or args.measured
    rows = {r["case"]: r for r in json.loads((graded / "fidelity.json").read_text())}
    cases = sorted(c for c in rows if c.startswith("cb_"))
    if not cases:
        raise SystemExit(f"no cb_* case in {graded}/fidelity.json: run benchmarks/copy_bubble.sh first")
    first = rows[cases[0]]
    out = {"what": f"benchmarks/copy_bubble.sh: {first['overrides']}; simulated with {first['hardware']}",
           "machine": args.machine,
           "variants": {c.removeprefix("cb_"): variant(args.measured, graded, c, rows[c]) for c in cases}}
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["variants"], indent=1))


if __name__ == "__main__":
    main()
