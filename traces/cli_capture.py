"""``moebits traces capture``: record routing from a Hugging Face MoE model into a trace.

This module turns the arguments into a :class:`CaptureRequest` and runs it; the hooks, the
decode loop and the ModelSpec mapping live in :mod:`traces.capture`. torch and transformers
load only when the command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from moebits.traces import capture as cap
from moebits.traces.format import Phase, Trace, TraceError, write_trace

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")

DESCRIPTION = """\
Run a Hugging Face MoE causal LM (transformers 5.x) over prompts cut from a text file and record,
with forward hooks on its routers, every MoE layer's top-k expert ids and gate weights.

Prompts are SEQS non-overlapping windows of the text, exactly P tokens each (picked with
--seed; with a tokenizer that has a BOS token, BOS + P-1 text tokens), so batches need no padding. Each batch of B prompts runs one prefill pass, then greedy-decodes N tokens,
each fed back through the model: the trace holds P prefill steps (phase 0) and N decode steps
(phase 1) per sequence, one row per (seq, step, MoE layer). Gates are the weights the experts
were actually given (DeepSeek: normalized and times routed_scaling_factor).

--model-dir loads a local checkpoint (no network) and its tokenizer if the directory has one
(else UTF-8 bytes mod vocab). --tiny builds a random-weight model of the architecture with the
byte tokenization, for tests and plumbing checks.
"""


@dataclass(frozen=True)
class CaptureRequest:
    """What ``moebits traces capture`` asks for; exactly one of ``model_dir`` and ``tiny``."""

    text: Path
    model_dir: Path | None = None
    tiny: str | None = None
    batch: int = 8
    new_tokens: int = 32
    prompt_tokens: int = 128
    seqs: int = 16
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    progress: bool = True


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture", help="record routing from a Hugging Face MoE model (needs torch + transformers)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", type=Path, metavar="DIR", help="local Hugging Face model directory")
    src.add_argument("--tiny", metavar="ARCH", help=f"tiny random model of: {', '.join(cap.TINY_ARCHS)}")
    p.add_argument("--text", type=Path, required=True, metavar="FILE", help="UTF-8 text the prompts are cut from")
    p.add_argument("--batch", type=int, default=8, metavar="B", help="sequences per forward pass (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="greedy tokens per sequence (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="P", help="tokens per prompt (default 128)")
    p.add_argument("--seqs", type=int, default=16, metavar="S", help="number of sequences (default 16)")
    p.add_argument("--seed", type=int, default=0, help="picks the prompt windows and the --tiny weights (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.parquet", help="trace file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    req = CaptureRequest(
        text=args.text, model_dir=args.model_dir, tiny=args.tiny, batch=args.batch,
        new_tokens=args.max_new_tokens, prompt_tokens=args.prompt_tokens, seqs=args.seqs,
        seed=args.seed, device=args.device, dtype=args.dtype,
    )
    trace = capture_from_request(req)
    write_trace(trace, args.output)
    s = trace.spec
    print(
        f"wrote {args.output}: {s.name}, {s.layers} MoE layers x {s.experts} experts top-{s.top_k}; "
        f"{trace.num_seqs} sequences, {trace.tokens(Phase.PREFILL)} prefill + "
        f"{trace.tokens(Phase.DECODE)} decode tokens, {trace.rows} rows"
    )
    return 0


def capture_from_request(req: CaptureRequest) -> Trace:
    """Load the model, cut the prompts, capture; the returned trace is validated, not yet written."""
    text = cap.read_text(req.text)
    device, dtype = _device_and_dtype(req)
    model, tokenizer, name = _load(req, device, dtype)
    spec = cap.model_spec(model, name)
    tokens = cap.tokenize(text, tokenizer, spec.vocab_size)
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts = cap.cut_prompts(tokens, req.prompt_tokens, req.seqs, np.random.default_rng(req.seed), bos)
    provenance = {
        "model": str(req.model_dir.resolve()) if req.model_dir else f"tiny random {req.tiny} (seed {req.seed})",
        "dataset": Path(req.text).name,
        "tokenizer": (f"{type(tokenizer).__name__}, prompts start with BOS {bos}" if bos is not None else
                      type(tokenizer).__name__) if tokenizer is not None else f"utf-8 bytes mod {spec.vocab_size}",
        "seed": str(req.seed),
    }
    return cap.capture_trace(model, prompts, req.new_tokens, req.batch, spec, provenance, req.progress)


def _device_and_dtype(req: CaptureRequest) -> tuple[str, torch.dtype]:
    import torch

    device = req.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise TraceError(f"--device {device!r}: must be cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise TraceError("--device cuda: torch sees no CUDA device")
    if req.dtype not in DTYPES:
        raise TraceError(f"--dtype {req.dtype!r}: must be one of {', '.join(DTYPES)}")
    name = req.dtype if req.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, getattr(torch, name)


def _load(req: CaptureRequest, device: str, dtype: torch.dtype) -> tuple[Any, Any | None, str]:
    """(model, tokenizer or None, model name) for a request."""
    if req.tiny is not None and req.model_dir is None:
        model = cap.build_tiny_model(req.tiny, req.seed).to(device=device, dtype=dtype)
        return model, None, f"tiny-{req.tiny}"
    if req.model_dir is not None and req.tiny is None:
        model, tokenizer = cap.load_model_dir(req.model_dir, dtype, device)
        return model, tokenizer, Path(req.model_dir).resolve().name
    raise TraceError("give exactly one of --model-dir DIR and --tiny ARCH")
