"""``moebits train fit``: train the default MoE (and its dense twin) on the built corpus."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

from moebits.train.fit import FitRequest, fit
from moebits.train.loop import SMOKE_TRAIN, TrainConfig

DESCRIPTION = """\
Train a byte-level Qwen3-MoE (8 layers x 32 experts, top-4; --size smoke: 2 x 8, top-2, for
tests) on the TRAIN split of a built corpus (moebits train corpus), then a dense model of the
same active size the same way, and evaluate both in bf16 on the EVALUATION split (code and
prose). Writes the MoE checkpoint (bf16 safetensors, config.json), training.json (router-row
norms at init and through training, tokens per expert, bits per byte) and README.md (the model
card) into OUT. --steps 0 trains as many steps as fit --time-budget-s (timed on the first steps)
and records the count; rerun with --steps N to repeat the run.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train the MoE and a dense model of its active size", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="built corpus (moebits train corpus)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--size", choices=("default", "smoke"), default="default", help="model and run size")
    p.add_argument("--steps", type=int, help="training steps (0: fit the time budget)")
    p.add_argument("--time-budget-s", type=float, help="seconds of MoE training when --steps is 0")
    p.add_argument("--seed", type=int, help="seed of init and data order (default 0)")
    p.add_argument("--batch", type=int, help="windows per step")
    p.add_argument("--seq-len", type=int, help="bytes per window")
    p.add_argument("--eval-bytes", type=int, help="bytes of each evaluation split to score (0: all)")
    p.add_argument("--experts-impl", help="transformers experts implementation (auto: the fastest that trains)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-dense", action="store_true", help="skip the dense comparison model")
    p.add_argument("--commit", help="commit recorded in the card (default: git rev-parse HEAD, if any)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> TrainConfig:
    base = SMOKE_TRAIN if args.size == "smoke" else TrainConfig()
    over = {"steps": args.steps, "time_budget_s": args.time_budget_s, "seed": args.seed, "batch": args.batch,
            "seq_len": args.seq_len, "eval_bytes": args.eval_bytes, "experts_impl": args.experts_impl}
    return dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    command = "moebits train " + shlex.join(sys.argv[1:])
    req = FitRequest(data_dir=args.data, out_dir=args.out, cfg=cfg, device=args.device, dense=not args.no_dense,
                     command=command.strip(), commit=args.commit or _commit(), progress=not args.no_progress)
    summary = fit(req)
    for kind, r in summary["records"].items():
        bpb = ", ".join(f"{k} {v:.4f}" for k, v in r["eval_bpb"].items())
        print(f"{kind:<6} {r['steps']} steps, {r['wall_s']:.0f} s, held-out bits per byte: {bpb}")
    print(f"checkpoint, training.json and README.md in {args.out}")
    return 0
