"""Transfer time per promotion: one expert copy, timed as the expert mover issues it, against the profile.

For each precision, the packed bytes of one expert of the model (``--model``) are copied from
pinned host memory into a device slab on a side stream (as :mod:`runtime.expert_mover` does), one
at a time and back to back (``--burst`` copies queued at once, as a boundary issues them), timed
with CUDA events; the profile's ``h2d`` curve (``LinkCurve.time_s``) predicts the same. Prints a
table and writes ``--out`` JSON.

    PYTHONPATH=... python benchmarks/copy_check.py --hardware conf/hardware/calibrated_h200.yaml --out copy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from moebits.analysis.cli_validate import load_hardware
from moebits.core.model_spec import get_model_spec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hardware", default="calibrated_h200")
    ap.add_argument("--model", default="Qwen3-30B-A3B")
    ap.add_argument("--precisions", default="bf16,int8,int4,int3,int2")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA device")
    hw, spec, dev = load_hardware(args.hardware), get_model_spec(args.model), torch.device("cuda")
    stream = torch.cuda.Stream(dev)
    rows = []
    for p in args.precisions.split(","):
        nbytes = spec.expert_bytes(p)
        src = torch.empty(args.burst, nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(args.burst, nbytes, dtype=torch.uint8, device=dev)
        single, burst = [], []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                a.record(stream)
                dst[0].copy_(src[0], non_blocking=True)
                b.record(stream)
            b.synchronize()
            single.append(a.elapsed_time(b) / 1e3)
            with torch.cuda.stream(stream):
                a.record(stream)
                for i in range(args.burst):
                    dst[i].copy_(src[i], non_blocking=True)
                b.record(stream)
            b.synchronize()
            burst.append(a.elapsed_time(b) / 1e3 / args.burst)
        pred = hw.h2d.time_s(nbytes)
        m1, mb = float(np.median(single)), float(np.median(burst))
        rows.append({"precision": p, "bytes": nbytes, "measured_s": m1, "measured_in_burst_s": mb, "predicted_s": pred,
                     "err": (pred - m1) / m1, "err_in_burst": (pred - mb) / mb})
        print(f"{p:5s} {nbytes / 2**20:7.2f} MiB  one {m1 * 1e6:8.1f} us  in a burst {mb * 1e6:8.1f} us  profile "
              f"{pred * 1e6:8.1f} us  err {100 * (pred - m1) / m1:+.1f}% / {100 * (pred - mb) / mb:+.1f}%", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(dev), "hardware": hw.name,
                                              "model": spec.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
