"""``moebits train traces``: capture the trained model's routing on corpus text (workload traces)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moebits.traces.format import write_trace
from moebits.train import corpus
from moebits.train.cli_sensitivity import load_model
from moebits.train.model import DEFAULT_DIR
from moebits.train.workloads import WorkloadRequest, capture

DESCRIPTION = """\
Capture routing traces of a trained MoE (default: the embedded model) on the built corpus: for
each split (evaluation, calibration) and kind (code, prose), SEQS windows of P + N bytes at
seeded offsets, P prefill steps then N teacher-forced decode steps (the text's next bytes). The
EVALUATION traces are the workloads replayed and graded; the CALIBRATION traces are the profiles
offline policies learn from. Writes OUT/<split>_<kind>.parquet; the window offsets are in each
trace's provenance so the bytes can be recovered.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("traces", help="capture workload and profile traces from the trained model",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="built corpus (moebits train corpus)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the traces go")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, metavar="DIR", help="trained model (default: embedded)")
    p.add_argument("--seqs", type=int, default=8, help="windows per trace (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill bytes per window (default 128)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode bytes per window (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("evaluation", "calibration"):
        for kind in corpus.KINDS:
            req = WorkloadRequest(split, kind, args.seqs, args.prompt_tokens, args.decode_tokens, args.seed)
            trace = capture(model, corpus.load(args.data, req.name), req)
            path = write_trace(trace, args.out / f"{req.name}.parquet")
            print(f"{path}: {trace.rows} rows, {args.seqs} x ({args.prompt_tokens} prefill + {args.decode_tokens} decode)")
    return 0
