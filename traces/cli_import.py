"""``moebits traces import SRC -o OUT.parquet``: convert a public routing trace to moebits."""

from __future__ import annotations

import argparse

from moebits.traces.format import Phase, write_trace
from moebits.traces.importers import FORMATS, import_source

EPILOG = """formats:
  mixtral-jsonl  Mixtral-8x7B vLLM-profiler JSON lines (*_routing.jsonl decode-only,
                 routing_raw.jsonl prefill+decode); sequences = (dataset, problem_id)
  sglang-json    Llama-4-Maverick SGLang per-request JSON; a folder = one sequence per file
  hf-csv         DeepSeek-V2-Lite per-prompt CSV (prefill only); a folder = one sequence per file
  vllm-logger    Qwen1.5-MoE per-layer vLLM logs; a folder = all logged layers, batched requests

SRC may be a file or a folder (searched recursively; other files such as prompts or READMEs
are ignored). The format is detected from the files' contents unless --format is given.
What the importer dropped or repaired is recorded in the trace's provenance ("repairs");
see it with `moebits traces info OUT.parquet`."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="convert a public routing trace (file or folder) to a moebits .parquet trace",
        description="Convert a public MoE routing trace (a file, or a folder of files) into one "
        "moebits Parquet trace, validated and written atomically.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="source file or folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace file to write")
    p.add_argument(
        "--format", choices=list(FORMATS), default=None, help="source format (default: auto-detect)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trace = import_source(args.src, args.format)
    out = write_trace(trace, args.output)
    fmt = trace.meta.provenance.get("format", "?")
    print(
        f"{out}: {trace.rows:,} rows, {trace.num_seqs} sequences, "
        f"{trace.tokens(Phase.PREFILL):,} prefill + {trace.tokens(Phase.DECODE):,} decode tokens "
        f"({fmt}, {trace.spec.name})"
    )
    return 0
