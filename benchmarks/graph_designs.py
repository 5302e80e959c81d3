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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moebits.core.model_spec import ModelSpec
from moebits.runtime.calibrate_graph import attn_shape, random_weights
from moebits.runtime.fused_ops import triton_usable
from moebits.runtime.pass_designs import DesignTimer, layers_of, measure_designs, mixed_model, random_design


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


def background_copy(device: torch.device, nbytes: int = 64 << 20) -> Any:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)

    def start() -> None:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
    return start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_30b_a3b", help="conf/model preset, or a trace .parquet (its shape)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="hidden and expert sizes x scale, rounded up to 128 (as runtime.scale)")
    ap.add_argument("--layers", default="2,8", help="layer counts (the fixed part per pass separates from per layer)")
    ap.add_argument("--precisions", default="bf16,int8,int4,int3,int2")
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
    rng = np.random.default_rng(args.seed)
    out: list[dict[str, Any]] = []
    for L in ints(args.layers):
        t0 = time.perf_counter()
        spec = layers_of(full, L)
        shape = attn_shape(spec)
        mm = mixed_model(spec, precisions, random_weights(spec, shape, dev), shape, dev, triton_usable(dev),
                         max_seqs=max(rows), max_len=max([*ctxs, *pre]) + 2)
        timer = DesignTimer(mm, reps=args.reps)
        P = len(precisions)
        for t in rows:
            for c in ctxs:
                out += measure_designs(timer, [random_design(rng, spec, t, c, P) for _ in range(args.designs)],
                                       tag="decode")
        for t in pre:
            out += measure_designs(timer, [random_design(rng, spec, t, 0, P, prefill=True)
                                           for _ in range(args.designs)], tag="prefill")
        if dev.type == "cuda":
            bg = background_copy(dev)
            out += measure_designs(timer, [random_design(rng, spec, rows[0], ctxs[0], P) for _ in range(args.designs)],
                                   background=bg, tag="copy")
        print(f"{full.name} x{L} layers: {len(out)} rows so far, {time.perf_counter() - t0:.1f}s", flush=True)
        del mm, timer
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    meta = {"model": dataclasses.asdict(full) if dataclasses.is_dataclass(full) else str(full),
            "precisions": precisions, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": out}, default=str))
    print(f"wrote {args.out}: {len(out)} designs")


if __name__ == "__main__":
    main()
