"""Where the graph runtime's host time goes on the per-layer seam, per measured run (a diagnosis).

Each ``CASE.measured.npz`` that ``moebits analysis validate`` wrote on the graph runtime keeps the host log's
sections per pass (``host_sec_*``, :class:`runtime.host_log.HostLog`). For every per-layer run this prints, per
decode layer step: the host probe, the distinct experts (entries), the host work outside waiting and observing
(inputs, launch, miss rule, records, marks: ``work``), that work's slope against the entries across passes, and the
host seconds per issued copy; all at the reference probe ``--probe-us`` (speed ~ probe ** ``--exponent``).

    python benchmarks/host_sections.py /tmp/val /tmp/cal [--probe-us 64.7 --exponent 0.8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WORK = ("inputs", "launch", "choose", "records", "mark", "boundary", "other")


def policy_of(case_json: Path) -> str:
    overrides = json.loads(case_json.read_text()).get("overrides", [])
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("policy=")), "?")


def row(npz: Path, probe_ref_s: float, exponent: float) -> str | None:
    z = np.load(npz, allow_pickle=True)
    if "host_sec_choose" not in z.files or not z["host_sec_choose"].any():
        return None   # a per-pass (whole-step) run: no per-layer sections
    passes = len(z["host_pass_s"])
    layers = len(z["ls_pass"]) // passes
    dec = slice(2, passes)   # prefill and the first decode pass left out (warm-up)
    speed = (float(z["host_probe_s"].mean()) / probe_ref_s) ** exponent
    work = sum(z[f"host_sec_{s}"][dec] for s in WORK if f"host_sec_{s}" in z.files) / layers / speed
    entries = z["requests"].reshape(passes, layers)[dec].mean(1)
    slope = np.polyfit(entries, work, 1)[0] if entries.std() > 0 else float("nan")
    copies = int(z["host_copies"][dec].sum())
    per_copy = z["host_sec_issue"][dec].sum() / speed / copies if copies else float("nan")
    case = npz.name.removesuffix(".measured.npz")
    return (f"{case:28s} {policy_of(npz.with_name(case + '.case.json')):16s} {layers:3d} "
            f"{z['host_probe_s'].mean() * 1e6:7.1f} {entries.mean():7.1f} {work.mean() * 1e6:8.1f} "
            f"{slope * 1e6:7.2f} {per_copy * 1e6:9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="folders of CASE.measured.npz (moebits analysis validate --out)")
    ap.add_argument("--probe-us", type=float, default=64.7, help="reference host probe, us (the profile's probe_s)")
    ap.add_argument("--exponent", type=float, default=0.8, help="host cost ~ probe ** exponent (the profile's)")
    args = ap.parse_args()
    print(f"{'case':28s} {'policy':16s} {'L':>3s} {'probe':>7s} {'entries':>7s} {'work_us':>8s} {'us/ent':>7s} "
          f"{'us/copy':>9s}")
    for d in args.dirs:
        for npz in sorted(d.glob("*.measured.npz")):
            line = row(npz, args.probe_us * 1e-6, args.exponent)
            if line:
                print(line)


if __name__ == "__main__":
    main()
