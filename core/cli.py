"""The one shape of every ``moebits PACKAGE COMMAND`` line (traces, analysis, train).

Each package lists its sub-command modules; each module exposes ``register(subparsers)`` and
sets ``func`` on its parser. Bad input (the package's own error types, ``ValueError``,
``FileNotFoundError``) prints one ``error: ...`` line to stderr and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType


def subcommand_parser(prog: str, description: str, commands: Sequence[ModuleType]) -> argparse.ArgumentParser:
    """A parser whose sub-commands are registered by ``commands`` in order."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in commands:
        module.register(sub)
    return parser


def run_subcommand(parser: argparse.ArgumentParser, argv: list[str] | None,
                   errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv`` and run the chosen sub-command; ``errors`` are reported as one line, exit 2."""
    args = parser.parse_args(argv)
    caught: tuple[type[BaseException], ...] = (*errors, ValueError, FileNotFoundError)
    try:
        return int(args.func(args) or 0)
    except caught as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
