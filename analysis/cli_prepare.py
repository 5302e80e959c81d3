"""``moebits analysis prepare-traces``: the real traces as Parquet workloads in a cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from moebits.analysis.prepare import DEFAULT_CACHE, DEFAULT_SRC, ENV_VAR, prepare_traces

EPILOG = f"""The cache is --out, else ${ENV_VAR}, else {DEFAULT_CACHE}. The study configs
(conf/experiment/trace/*.yaml) read ${{oc.env:{ENV_VAR},{DEFAULT_CACHE}}}/<name>.parquet, so
set {ENV_VAR} for both steps if you use another place. Files already present are kept
(--force rewrites them). Written per trace folder: <folder>.parquet (the whole import) and
<folder>.profile.parquet (the second half of its sequences, a held-out profile for offline
policies; not for the batch-level Qwen1.5 trace), plus llama4maverick_mmlu_small.parquet
(Maverick's routing on Qwen3-30B-A3B-sized experts) and default.profile.parquet."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-traces",
        help="import the real traces (../shared/traces/real) into a cache dir, once",
        description="Import each real-trace folder with traces.importers into a cache directory "
        "outside the repository, skipping those already imported, and write the held-out "
        "profiling splits the study uses.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"folder of real traces (default: {DEFAULT_SRC})")
    p.add_argument("--out", type=Path, default=None, help=f"cache directory (default: ${ENV_VAR} or {DEFAULT_CACHE})")
    p.add_argument("--force", action="store_true", help="re-import and rewrite files that exist")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for item in prepare_traces(args.src, args.out, force=args.force):
        state = "wrote" if item.written else "kept "
        print(f"{state} {item.path}" + (f"  ({item.note})" if item.note and item.written else ""))
    return 0
