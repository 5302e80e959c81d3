"""``moebits traces``: import, inspect, synthesize and capture routing traces.

Each subcommand lives in its own module (``traces/cli_<name>.py``) exposing
``register(subparsers)``; they share one error path: a :class:`TraceError` or ``ValueError``
prints one line to stderr and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from moebits.core.cli import run_subcommand, subcommand_parser
from moebits.traces import cli_cache, cli_capture, cli_import, cli_info, cli_stats, cli_synth
from moebits.traces.format import TraceError

COMMANDS = (cli_import, cli_stats, cli_synth, cli_capture, cli_info, cli_cache)


def build_parser() -> argparse.ArgumentParser:
    return subcommand_parser(
        "moebits traces",
        "Routing traces for moebits: import public formats, show statistics, "
        "synthesize traces fitted to real ones, capture routing from Hugging Face MoE models.",
        COMMANDS,
    )


def main(argv: list[str] | None = None) -> int:
    return run_subcommand(build_parser(), argv, (TraceError,))


if __name__ == "__main__":
    sys.exit(main())
