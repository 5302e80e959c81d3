"""``moebits train sensitivity``: measure a sensitivity table of a trained model on one split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moebits.train import corpus
from moebits.train.model import DEFAULT_DIR
from moebits.train.sensitivity import TableRequest, measure, write

DESCRIPTION = """\
Measure the per-expert x precision sensitivity table of a trained MoE (default: the embedded
model) on one split of the built corpus, code and prose windows, on the CPU. Columns: error
(what the quality proxy sums: estimated KL per unit gate), output_error (measured relative error
of the expert's output), kl_measured (measured KL when only that expert changes, on a seeded
sample of rows), kl_estimate (the validated per-layer curvature estimate of that KL, every row),
frequency per dataset (code, prose), router_norm, router_norm_change (from the model's
training.json), max_intra_neuron_variance. Writes OUT (.parquet or .csv) and OUT's .json report
(the estimate's validation and DynaMo's measured channel-mix significance share).
Policies read the CALIBRATION table; runs are graded with the EVALUATION table.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="measure a sensitivity table (CPU)", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="built corpus (moebits train corpus)")
    p.add_argument("--split", choices=("calibration", "evaluation"), required=True)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, metavar="DIR", help="trained model (default: embedded)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="table to write (.parquet or .csv)")
    p.add_argument("--windows", type=int, default=4, help="windows per kind (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="bytes per window (default 256)")
    p.add_argument("--kl-samples", type=int, default=64, help="rows whose KL is measured (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def load_model(model_dir: Path) -> object:
    """The trained model in fp32 on the CPU, in eval mode."""
    import torch
    from moebits.traces.capture import load_model_dir

    model, _ = load_model_dir(model_dir, torch.float32, "cpu")
    return model


def run(args: argparse.Namespace) -> int:
    req = TableRequest(split=args.split, windows=args.windows, seq_len=args.seq_len, kl_samples=args.kl_samples,
                       seed=args.seed)
    splits = {k: corpus.load(args.data, f"{args.split}_{k}") for k in corpus.KINDS}
    training_path = args.model_dir / "training.json"
    training = json.loads(training_path.read_text()) if training_path.is_file() else None
    table, report = measure(load_model(args.model_dir), splits, req, training, progress=not args.no_progress)
    write(table, report, args.out)
    v = report["validation"]
    print(f"{args.split} table: {len(table.precision)} rows -> {args.out}; KL estimate vs measured on "
          f"{v['rows']} held-out rows: Spearman {v['spearman']:.3f}, median |log ratio| {v['median_abs_log_ratio']:.2f}")
    return 0
