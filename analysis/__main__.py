"""``moebits analysis``: prepare the study's traces, describe them, and report a sweep.

Subcommands (each a module ``analysis/cli_<name>.py`` with ``register(subparsers)``):

- ``prepare-traces``: import the real traces into a cache outside the repo (once);
- ``trace-stats``: skew, reuse and reuse-distance statistics of the study's workloads;
- ``report``: a multirun directory -> runs.parquet/csv, figures and report.md;
- ``study``: all three of prepare, the experiment's sweep and its report, in one command;
- ``quality``: measured KL / bits per byte of every policy x budget on the trained MoE.
- ``validate``: one trace through the runtime and the simulator, compared (:mod:`analysis.fidelity`);
- ``fidelity``: the table of those comparisons;
- ``calibrate-host``: the graph runtime's host costs, measured on synthetic runs and fitted into a profile.

A ``ValueError`` (bad input: a missing directory, no runs, an unreadable trace) prints one
line ``error: ...`` and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from moebits.analysis import (
    cli_calibrate_host,
    cli_fidelity,
    cli_prepare,
    cli_quality,
    cli_report,
    cli_study,
    cli_trace_stats,
    cli_validate,
)
from moebits.core.cli import run_subcommand, subcommand_parser
from moebits.traces.format import TraceError

COMMANDS = (cli_prepare, cli_trace_stats, cli_report, cli_study, cli_quality, cli_validate, cli_fidelity,
            cli_calibrate_host)


def build_parser() -> argparse.ArgumentParser:
    return subcommand_parser(
        "moebits analysis",
        "moebits results -> tidy tables and figures: prepare the real traces as "
        "workloads, describe them, and report a hydra multirun of python -m moebits.sim.",
        COMMANDS,
    )


def main(argv: list[str] | None = None) -> int:
    return run_subcommand(build_parser(), argv, (TraceError,))


if __name__ == "__main__":
    sys.exit(main())
