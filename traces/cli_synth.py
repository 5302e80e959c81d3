"""``moebits traces synth``: write a synthetic trace, optionally fitted to a real one.

Knobs come from (later wins): the built-in defaults, ``--knobs FILE.json`` or a fit to
``--like TRACE``, then the single-knob options. The fit and the generation draw from separate
streams of the ``--seed`` generator, so ``--like`` and ``--knobs`` with the knobs that fit
printed give the same rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from moebits.core.model_spec import ModelSpec, find_preset
from moebits.traces.fit import fit_knobs, targets_from_trace
from moebits.traces.format import Trace, read_trace, write_trace
from moebits.traces.synth import Shape, SynthKnobs, generate

FIT_ROWS_MAX = 1_000_000

HELP = """\
knobs (see traces/synth.py):
  skew               per-layer log-normal popularity spread (0 = uniform; ~0.3: top-10% share ~0.17)
  reuse_prob         a token keeps each expert slot of the previous token of its sequence (same layer)
  cross_layer        a fresh expert follows the token's same-slot expert at the previous layer
                     through a fixed random successor map
  switch_every_seqs  draw new hot experts every N sequences (a workload switch; 0 = never)
  gate_alpha         Dirichlet concentration of the gate weights (sorted descending)
  gate_sum           scale of the gate weights (1 = renormalised top-k)

--like TRACE fits skew (per layer: top-10% share), reuse_prob (reuse), cross_layer
(next-layer predictability) and the gate knobs (entropy, sum) to TRACE's dominant phase, on
calibration samples of the output's shape (at most ~1M rows). TRACE is a moebits .parquet
trace or a public trace file or folder (imported on the fly). Of another model, its per-layer
targets are interpolated by relative depth.

examples:
  moebits traces synth --model qwen3_30b_a3b --seqs 16 --prompt-len 64 --steps 256 -o q.parquet
  moebits traces synth --seqs 4 --steps 150 --like mixtral.parquet -o m.parquet   # Mixtral's model, from the trace
  moebits traces synth --model olmoe_1b_7b --seqs 4 --steps 150 --like mixtral.parquet -o o.parquet
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic trace with explicit knobs, optionally fitted to a real trace",
        description="Generate a synthetic routing trace (prefill then decode tokens per sequence).",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="model preset (conf/model/ name, e.g. qwen3_30b_a3b); "
                   "default with --like: the trace's own model")
    p.add_argument("--seqs", type=int, required=True, help="number of sequences")
    p.add_argument("--steps", type=int, required=True, help="decode tokens per sequence")
    p.add_argument("--prompt-len", type=int, default=0, help="prefill tokens per sequence (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the numpy generator (default 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--like", metavar="TRACE", help="fit the knobs to this real trace")
    src.add_argument("--knobs", metavar="FILE.json", help="read the knobs from a JSON file")
    p.add_argument("--target-reuse", type=float, help="with --like: fit to this reuse instead of TRACE's")
    p.add_argument("--fit-iterations", type=int, default=6, help="calibration samples for --like (default 6)")
    p.add_argument("--skew", type=float, help="set every layer's skew")
    p.add_argument("--reuse", type=float, help="set reuse_prob")
    p.add_argument("--cross-layer", type=float, help="set cross_layer")
    p.add_argument("--switch-every", type=int, help="set switch_every_seqs (workload switch)")
    p.add_argument("--gate-alpha", type=float, help="set gate_alpha")
    p.add_argument("--gate-sum", type=float, help="set gate_sum")
    p.add_argument("--no-gates", action="store_true", help="write no gate weights")
    p.add_argument("--knobs-out", metavar="FILE.json", help="also write the knobs used to this JSON file")
    p.add_argument("--note", help="a free-text note stored in the trace's provenance")
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace file to write")
    p.set_defaults(func=run)


def load_like(path: str) -> Trace:
    """A moebits trace, or a public trace file/folder through the importers."""
    if Path(path).suffix == ".parquet":
        return read_trace(path)
    from moebits.traces.importers import import_source

    return import_source(Path(path))


def fit_shape(shape: Shape, layers: int) -> Shape:
    """The output's shape, with fewer sequences (and then shorter ones) to stay ~FIT_ROWS_MAX rows."""
    rows_per_seq = shape.tokens_per_seq * layers
    seqs = max(1, min(shape.seqs, FIT_ROWS_MAX // max(rows_per_seq, 1)))
    scale = min(1.0, FIT_ROWS_MAX / (seqs * rows_per_seq))
    if scale >= 1.0:
        return Shape(seqs, shape.prompt_len, shape.steps)
    prompt, steps = int(shape.prompt_len * scale), int(shape.steps * scale)
    return Shape(seqs, prompt, max(steps, 1 if prompt == 0 else 0))


def _overrides(knobs: SynthKnobs, args: argparse.Namespace, spec: ModelSpec) -> SynthKnobs:
    if args.skew is not None:
        knobs.skew = [args.skew] * len(knobs.skew)
    if args.reuse is not None:
        knobs.reuse_prob = args.reuse
    if args.cross_layer is not None:
        knobs.cross_layer = args.cross_layer
    if args.switch_every is not None:
        knobs.switch_every_seqs = args.switch_every
    if args.gate_alpha is not None:
        knobs.gate_alpha = args.gate_alpha
    if args.gate_sum is not None:
        knobs.gate_sum = args.gate_sum
    if args.no_gates:
        knobs.gates = False
    knobs.validate(spec)
    return knobs


def _read_knobs(path: str, spec: ModelSpec) -> SynthKnobs:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read knobs JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: knobs JSON must be an object")
    return SynthKnobs.from_dict(data, spec)


def _fit(args: argparse.Namespace, real: Trace, spec: ModelSpec, shape: Shape,
         rng: np.random.Generator) -> tuple[SynthKnobs, dict]:
    targets = targets_from_trace(real, spec)
    if args.target_reuse is not None:
        targets = dataclasses.replace(targets, reuse=args.target_reuse)
    n_layers = len(targets.layers)
    result = fit_knobs(targets, spec, fit_shape(shape, n_layers), rng, iterations=args.fit_iterations)
    summary = result.summary()
    print(f"fitted to {args.like}: {targets.source}")
    for key, value in summary.items():
        if isinstance(value, dict):
            tgt, got = value["target"], value["fitted"]
            line = "-" if tgt is None or got is None else f"target {tgt:.4f}  fitted sample {got:.4f}"
            print(f"  {key:<26} {line}")
    return result.knobs, summary


def pick_model(model: str | None, like: Trace | None) -> ModelSpec:
    """``--model``'s preset (either spelling, with a hint for the other), else ``--like``'s model."""
    if model is None:
        if like is None:
            raise ValueError("give --model PRESET, or --like TRACE to take the model from that trace")
        return like.spec
    spec, hint = find_preset(model)
    if hint:
        print(f"note: {hint}", file=sys.stderr)
    return spec


def run(args: argparse.Namespace) -> int:
    real = load_like(args.like) if args.like else None
    spec = pick_model(args.model, real)
    shape = Shape(args.seqs, args.prompt_len, args.steps)
    if args.target_reuse is not None and not args.like:
        raise ValueError("--target-reuse needs --like")
    fit_rng, gen_rng = (np.random.default_rng([args.seed, stream]) for stream in (1, 0))
    provenance = {"source": "synthetic", "generator": "moebits traces synth", "seed": str(args.seed)}
    if args.note:
        provenance["note"] = args.note
    if args.like:
        assert real is not None
        knobs, summary = _fit(args, real, spec, shape, fit_rng)
        provenance.update(like=str(args.like), fit=json.dumps(summary, sort_keys=True))
    elif args.knobs:
        knobs = _read_knobs(args.knobs, spec)
    else:
        knobs = SynthKnobs.for_spec(spec)
    knobs = _overrides(knobs, args, spec)
    provenance["knobs"] = knobs.to_json()
    print(f"knobs: {knobs.to_json()}")
    trace = generate(spec, knobs, shape, gen_rng, provenance={**provenance, "model": spec.name})
    try:
        if args.knobs_out:
            Path(args.knobs_out).write_text(json.dumps(knobs.to_dict(), indent=1, sort_keys=True) + "\n")
        write_trace(trace, args.output)
    except OSError as exc:
        raise ValueError(f"cannot write {exc.filename or args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output}: {trace.rows:,} rows, {shape.seqs} sequences x "
          f"({shape.prompt_len} prefill + {shape.steps} decode) tokens, {len(knobs.skew)} layers")
    return 0
