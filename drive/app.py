"""The hydra app both command lines share (``moebits sim``, ``moebits runtime``).

An engine's app is an :class:`App`: its primary config (``conf/<config_name>.yaml``), how to
register its schemas, and how to run one converted config (``execute(cfg) -> (RunResult,
summary)``). Everything else is here, once: bad overrides stop before running with one line
``error: ...`` and exit status 2 (a sweep's first run is composed up front, so a misspelled key
of a sweep is one line too); each run writes to its hydra run directory ``steps.parquet``,
``figure.pdf/png`` (where asked), ``summary.json``, ``outcome.json`` last and ``app.log`` (what
it logged; :mod:`drive.report`, :mod:`drive.outcome`). A sweep (``-m``) runs in its own folder
(``multirun/<date>_<time>`` or the experiment's name) and skips runs that ended ok or
infeasible with the same fully composed config (``resume=true``; finished jobs whose
:mod:`drive.footprint` is unchanged are skipped without composing them); a failing run of a sweep
writes ``error.txt`` and ``outcome.json`` (infeasible: the budget cannot hold the run; failed:
anything else) and the sweep goes on, ending with a tally and exit status 3 when a run failed
(:class:`drive.sweep.SweepCallback`). ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from moebits.core.config import GROUPS, model_choice_spelling, one_line, unknown_preset
from moebits.core.slabs import InfeasibleError
from moebits.drive import footprint
from moebits.drive.outcome import Outcome, Status, clear_outcome, config_hash, reusable, write_outcome
from moebits.drive.overrides import first_of_sweep, launcher_hint
from moebits.drive.records import RunResult
from moebits.drive.report import format_summary, write_outputs
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
USER_ERRORS = (ValueError, OmegaConfBaseException)
Execute = Callable[[Any], tuple[RunResult, dict[str, Any]]]
log = logging.getLogger(__name__)


def presets(group: str) -> list[str]:
    """The YAML presets of a config group (file stems)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_compose(config_name: str, args: list[str]) -> str | None:
    """Compose a single run's config as hydra will (a sweep's first run), and report the first
    problem in one line."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None  # --help, --cfg ...: hydra handles those
    args = [a for a in args if a not in ("-m", "--multirun")]
    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra.")]
    try:
        overrides = first_of_sweep(overrides)  # a sweep: its first run stands for all
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            OmegaConf.to_object(compose(config_name, overrides=overrides))
    except Exception as exc:  # hydra and OmegaConf raise many types; all are the user's input
        return launcher_hint(str(exc)) or one_line(exc)
    return None


def record_failure(out_dir: Path, exc: Exception, msg: str) -> None:
    """A failed sweep run: ``error.txt`` holds the one-line message (and, for an error that
    is not the user's input, ``internal error`` and the traceback below it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = msg + "\n"
    if not isinstance(exc, USER_ERRORS):
        text = f"internal error: {type(exc).__name__}: {msg}\n\n" + "".join(traceback.format_exception(exc))
    (out_dir / "error.txt").write_text(text)
    log.error(f"error: {out_dir}: {text.splitlines()[0]}")


def written_files(out_dir: Path) -> list[str]:
    """The files a run left in its folder (named in its last log line)."""
    return sorted(p.name for p in out_dir.iterdir() if p.is_file())


@dataclass
class App:
    """One engine's command line: see the module docstring."""

    config_name: str
    schema: type
    register: Callable[[], None]
    execute: Execute

    def run_config(self, cfg: Any, out_dir: Path) -> dict[str, Any]:
        """Run ``cfg`` (the converted dataclass) and write its files to ``out_dir``; the summary."""
        result, summary = self.execute(cfg)
        write_outputs(result, summary, out_dir, figure=getattr(cfg, "figure", False))
        return summary

    def run_task(self, cfg: DictConfig) -> tuple[Outcome, bool]:
        """One run: resume check, run, write files, log the table. Returns the run's outcome and
        whether it was reused from an earlier run (for :class:`drive.sweep.SweepCallback`)."""
        hc = HydraConfig.get()
        out_dir = Path(hc.runtime.output_dir)
        in_sweep = hc.mode == RunMode.MULTIRUN
        digest = config_hash(cfg)
        done = reusable(out_dir, digest) if cfg.resume else None
        if done is not None:
            log.info(f"skip {out_dir}: ended {done.status.value} with the same config (resume=true)")
            if in_sweep:  # what it is made of now: the next resume skips it without composing
                done = replace(done, footprint=footprint.of_job(cfg, OmegaConf.to_object(cfg), [self.register.__module__]))
                write_outcome(out_dir, done)
            return done, True
        clear_outcome(out_dir)
        fp = None
        try:
            run_cfg = OmegaConf.to_object(cfg)
            assert isinstance(run_cfg, self.schema)
            if in_sweep:
                fp = footprint.of_job(cfg, run_cfg, [self.register.__module__])
            summary = self.run_config(run_cfg, out_dir)
        except Exception as exc:  # noqa: BLE001 - a sweep records every failure and goes on
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (in_sweep or isinstance(exc, USER_ERRORS)):
                raise
            msg = one_line(exc)
            if not in_sweep:
                print(f"error: {msg}", file=sys.stderr)
                sys.exit(2)
            record_failure(out_dir, exc, msg)
            status = Status.INFEASIBLE if isinstance(exc, InfeasibleError) else Status.FAILED
            outcome = Outcome(status, msg, digest, fp)
            write_outcome(out_dir, outcome)
            return outcome, False
        log.info(format_summary(summary))
        outcome = Outcome(Status.OK, "", digest, fp)
        write_outcome(out_dir, outcome)  # last: its presence means 'finished' to a resumed sweep
        log.info(f"results in {out_dir}: {', '.join(written_files(out_dir))}")
        return outcome, False

    def main(self) -> None:
        """Entry point: register the schemas, catch bad overrides in one line, then run hydra."""
        self.register()
        args, hints = model_choice_spelling(sys.argv[1:])
        for hint in hints:
            print(hint, file=sys.stderr)
        sys.argv[1:] = args  # hydra reads sys.argv
        problem = unknown_preset(args, {g: presets(g) for g in GROUPS}) or check_compose(self.config_name, args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        hydra.main(config_path=str(CONF_DIR), config_name=self.config_name, version_base="1.3")(self.run_task)()
