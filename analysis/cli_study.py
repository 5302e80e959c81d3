"""``moebits analysis study``: the whole study from one command.

Imports the real traces into the cache (skipping those already there), runs the experiment's
hydra multirun (``moebits sim +experiment=NAME``: one progress bar and a tally; runs that
ended ok or infeasible with the same config are skipped, so a killed study resumes), then
writes the report of ``multirun/NAME``. When some runs failed, the report is still written
(it lists them with their reasons) and the exit status is 3.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

from moebits.analysis import cli_prepare, cli_report
from moebits.analysis.prepare import DEFAULT_SRC
from moebits.drive.sweep import RUNS_FAILED_EXIT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="prepare traces, run an experiment sweep and report it, in one command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", default="seed_policies", help="conf/experiment/<NAME>.yaml (default: seed_policies)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"folder of real traces (default: {DEFAULT_SRC})")
    p.add_argument("--out", type=Path, default=None, help="trace cache directory (default: $MOEBITS_TRACES or ~/.cache/moebits/traces)")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for the sweep, e.g. hydra.launcher.n_jobs=4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cli_prepare.run(Namespace(src=args.src, out=args.out, force=False))
    env = dict(os.environ)
    if args.out is not None:
        env["MOEBITS_TRACES"] = str(args.out.resolve())
    cmd = [sys.executable, "-m", "moebits.sim", f"+experiment={args.experiment}", *args.overrides]
    print("running:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode not in (0, RUNS_FAILED_EXIT):  # some runs failed (the tally named them): report anyway
        raise ValueError(f"the sweep exited with status {done.returncode}; fix the reported problem and re-run "
                         "(finished runs are kept)")
    cli_report.run(Namespace(multirun_dir=Path("multirun") / args.experiment, out=None, no_progress=False))
    return done.returncode
