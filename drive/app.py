"""The hydra app both command lines share (``moebits sim``, ``moebits runtime``).

An engine's app is an :class:`App`: its primary config (``conf/<config_name>.yaml``), how to
register its schemas, and how to run one converted config (``execute(cfg) -> (RunResult,
summary)``). Everything else is here, once: bad overrides stop before running with one line
``error: ...`` and exit status 2; each run writes to its hydra run directory ``steps.parquet``,
``figure.png`` (where asked) and ``summary.json`` last (:mod:`drive.report`); a sweep (``-m``)
skips runs whose ``summary.json`` exists (``resume=true``), and a failing run of a sweep (bad
settings, an infeasible budget, or a bug) writes ``error.txt`` in its folder and the sweep goes
on. ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from moebits.core.config import GROUPS, one_line, unknown_preset
from moebits.drive.records import RunResult
from moebits.drive.report import format_summary, write_outputs
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
USER_ERRORS = (ValueError, OmegaConfBaseException)
Execute = Callable[[Any], tuple[RunResult, dict[str, Any]]]


def presets(group: str) -> list[str]:
    """The YAML presets of a config group (file stems)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_compose(config_name: str, args: list[str]) -> str | None:
    """Compose a single run's config as hydra will, and report the first problem in one line."""
    if any(a.startswith("-") for a in args):
        return None  # --help, --cfg, -m ...: hydra handles those
    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra.")]
    try:
        if any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides)):
            return None  # a sweep (hydra.mode=MULTIRUN set by an experiment): each run checks itself
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            OmegaConf.to_object(compose(config_name, overrides=overrides))
    except Exception as exc:  # hydra and OmegaConf raise many types; all are the user's input
        return one_line(exc)
    return None


def record_failure(out_dir: Path, exc: Exception, msg: str) -> None:
    """A failed sweep run: ``error.txt`` holds the one-line message (and, for an error that
    is not the user's input, ``internal error`` and the traceback below it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = msg + "\n"
    if not isinstance(exc, USER_ERRORS):
        text = f"internal error: {type(exc).__name__}: {msg}\n\n" + "".join(traceback.format_exception(exc))
    (out_dir / "error.txt").write_text(text)
    print(f"error: {out_dir}: {text.splitlines()[0]}", file=sys.stderr)


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

    def run_task(self, cfg: DictConfig) -> None:
        """One run: resume check, run, write files, print the table."""
        hc = HydraConfig.get()
        out_dir = Path(hc.runtime.output_dir)
        sweep = hc.mode == RunMode.MULTIRUN
        if cfg.resume and (out_dir / "summary.json").exists():
            print(f"skip {out_dir}: summary.json exists (resume=true)")
            return
        try:
            run_cfg = OmegaConf.to_object(cfg)
            assert isinstance(run_cfg, self.schema)
            summary = self.run_config(run_cfg, out_dir)
        except Exception as exc:  # noqa: BLE001 - a sweep records every failure and goes on
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (sweep or isinstance(exc, USER_ERRORS)):
                raise
            msg = one_line(exc)
            if not sweep:
                print(f"error: {msg}", file=sys.stderr)
                sys.exit(2)
            record_failure(out_dir, exc, msg)
            return
        print(format_summary(summary))
        print(f"results: {out_dir}")

    def main(self) -> None:
        """Entry point: register the schemas, catch bad overrides in one line, then run hydra."""
        self.register()
        args = sys.argv[1:]
        problem = unknown_preset(args, {g: presets(g) for g in GROUPS}) or check_compose(self.config_name, args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        hydra.main(config_path=str(CONF_DIR), config_name=self.config_name, version_base="1.3")(self.run_task)()
