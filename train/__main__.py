"""``moebits train``: the project's own trained MoE, from text to measured quality.

Sub-commands (each in ``train/cli_<name>.py`` with ``register(subparsers)``): ``corpus`` builds
the standard-library text splits, ``fit`` trains the MoE and its dense twin, ``sensitivity``
measures a sensitivity table on one split, ``traces`` captures workload and profile traces. Bad input prints
one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from moebits.core.cli import run_subcommand, subcommand_parser
from moebits.train import cli_corpus, cli_fit, cli_sensitivity, cli_traces
from moebits.train.corpus import CorpusError

COMMANDS = (cli_corpus, cli_fit, cli_sensitivity, cli_traces)


def build_parser() -> argparse.ArgumentParser:
    return subcommand_parser(
        "moebits train",
        "Build the Python-stdlib corpus (TRAIN / CALIBRATION / EVALUATION splits), train the "
        "project's byte-level Qwen3-MoE and a dense model of its active size, and measure its quality.",
        COMMANDS,
    )


def main(argv: list[str] | None = None) -> int:
    return run_subcommand(build_parser(), argv, (CorpusError,))


if __name__ == "__main__":
    sys.exit(main())
