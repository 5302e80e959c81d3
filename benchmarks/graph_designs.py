"""Raw whole-pass timings of the graph path for synthetic designs (the calibration's data).

For one model shape (a ``conf/model`` preset, or the shape of a trace file) and each layer count
of ``--layers``, builds a fast model with every expert resident in every ``--precisions`` class
(:func:`runtime.pass_designs.mixed_model`), captures one whole-step graph per pass size and
times ``--designs`` random designs per (rows, context) (:mod:`runtime.pass_designs`): decode
rows ``--rows`` at KV positions ``--contexts``, prefill passes of ``--prefill`` rows, and the
decode designs of the first row count again with a 64 MiB host-to-device copy on a side stream
(copy/compute interference). Writes one JSON list of rows (``tag``: decode, prefill, copy).

    PYTHONPATH=... python benchmarks/graph_designs.py --model qwen3_30b_a3b --layers 2,8 --out raw.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from moebits.core.model_spec import ModelSpec
from moebits.runtime.pass_designs import DesignPlan, run_designs


def model_spec(model: str) -> ModelSpec:
    """A ``conf/model`` preset (file stem) or the spec of a trace file (``.parquet``)."""
    if model.endswith(".parquet"):
        from moebits.traces.format import read_trace

        return read_trace(Path(model)).spec
    import yaml
    from moebits.core.config import ModelConfig
    from moebits.drive.app import CONF_DIR

    body = yaml.safe_load((CONF_DIR / "model" / f"{model}.yaml").read_text())
    body.pop("defaults", None)
    spec = ModelConfig(**body).to_spec()
    assert spec is not None
    return spec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_30b_a3b", help="conf/model preset, or a trace .parquet (its shape)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="hidden and expert sizes x scale, rounded up to 128 (as runtime.scale)")
    ap.add_argument("--layers", default="2,8", help="layer counts (the fixed part per pass separates from per layer)")
    ap.add_argument("--precisions", default="bf16,int8,int4,int3,int2",
                    help="pool classes (kernels are specialised on them); a channel mix by its name, e.g. int2+int8@f0.1s0.5")
    ap.add_argument("--rows", default="1,2,4,8,16", help="decode rows per pass")
    ap.add_argument("--contexts", default="32,200,700", help="KV positions of decode rows")
    ap.add_argument("--prefill", default="32,512", help="prefill pass sizes (one sequence)")
    ap.add_argument("--designs", type=int, default=6, help="random designs per (rows, context)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = model_spec(args.model)
    if args.scale != 1.0:
        from moebits.runtime.runner import RuntimeConfig, scaled_spec

        full = scaled_spec(full, RuntimeConfig(layers=full.layers, scale=args.scale, vocab=full.vocab_size), dev)
    precisions = args.precisions.split(",")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    rows, ctxs, pre = ints(args.rows), ints(args.contexts), ints(args.prefill)
    plan = DesignPlan(tuple(ints(args.layers)), tuple(rows), tuple(ctxs), tuple(pre), args.designs, args.reps)
    out = run_designs(full, precisions, plan, dev, args.seed)
    meta = {"model": dataclasses.asdict(full) if dataclasses.is_dataclass(full) else str(full),
            "precisions": precisions, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": out}, default=str))
    print(f"wrote {args.out}: {len(out)} designs")


if __name__ == "__main__":
    main()
