"""``moebits traces``: import, inspect, synthesize and capture routing traces.

Each subcommand lives in its own module (``traces/cli_<name>.py``) exposing
``register(subparsers)``; they share one error path: a :class:`TraceError` or ``ValueError``
prints one line to stderr and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from moebits.traces import cli_cache, cli_capture, cli_import, cli_info, cli_stats, cli_synth
from moebits.traces.format import TraceError

COMMANDS = (cli_import, cli_stats, cli_synth, cli_capture, cli_info, cli_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moebits traces",
        description="Routing traces for moebits: import public formats, show statistics, "
        "synthesize traces fitted to real ones, capture routing from Hugging Face MoE models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (TraceError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
