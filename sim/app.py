"""``moebits sim``: the hydra app that replays a workload under a policy and writes results.

Each run writes to its hydra run directory: ``summary.json``, ``steps.parquet`` (one row per
forward pass), ``figure.png`` and hydra's ``.hydra/`` (the config used). Sweeps
(``-m policy=a,b seed=0,1``) write one folder per override set under ``multirun/``; re-running
a sweep skips the runs whose ``summary.json`` exists (``resume=false`` reruns them).

Bad settings stop before simulating with one line ``error: ...`` and exit status 2. In a
sweep, a failing run (bad settings, an infeasible budget, or a bug) writes ``error.txt`` in
its folder and the sweep goes on; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from moebits.core.config import one_line
from moebits.sim.config import GROUPS, RunConfig, register_configs
from moebits.sim.engine import EngineOptions
from moebits.sim.report import format_summary, write_outputs
from moebits.sim.runner import simulate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
USER_ERRORS = (ValueError, OmegaConfBaseException)


def presets(group: str) -> list[str]:
    """The YAML presets of a config group (file stems)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_choices(args: list[str]) -> str | None:
    """An error for ``group=value`` overrides naming no preset, else None."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS or "(" in value:
            continue
        known = presets(key)
        for v in value.split(","):
            if v.strip() not in known:
                return f"unknown {key} preset {v.strip()!r}; known: {', '.join(known)}"
    return None


def check_compose(args: list[str]) -> str | None:
    """Compose a single run's config as hydra will, and report the first problem in one line."""
    if any(a.startswith("-") for a in args):
        return None  # --help, --cfg, -m ...: hydra handles those
    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra.")]
    try:
        if any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides)):
            return None  # a sweep (hydra.mode=MULTIRUN set by an experiment): each run checks itself
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
            OmegaConf.to_object(cfg)
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


def run_config(cfg: RunConfig, out_dir: Path) -> dict:
    """Simulate ``cfg`` and write its files to ``out_dir``; returns the summary."""
    opts = EngineOptions(check=cfg.check, progress=cfg.progress)
    result, summary = simulate(cfg, opts)
    write_outputs(result, summary, out_dir, figure=cfg.figure)
    return summary


def run_task(cfg: DictConfig) -> None:
    """One run: resume check, simulate, write files, print the table."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    if cfg.resume and (out_dir / "summary.json").exists():
        print(f"skip {out_dir}: summary.json exists (resume=true)")
        return
    try:
        run_cfg = OmegaConf.to_object(cfg)
        assert isinstance(run_cfg, RunConfig)
        opts = EngineOptions(check=run_cfg.check, progress=run_cfg.progress)
        result, summary = simulate(run_cfg, opts)
    except Exception as exc:  # noqa: BLE001 - a sweep records every failure and goes on
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (sweep or isinstance(exc, USER_ERRORS)):
            raise
        msg = one_line(exc)
        if not sweep:
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        record_failure(out_dir, exc, msg)
        return
    write_outputs(result, summary, out_dir, figure=run_cfg.figure)
    print(format_summary(summary))
    print(f"results: {out_dir}")


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(run_task)


def main() -> None:
    """Entry point: register the schemas, catch bad overrides in one line, then run hydra."""
    register_configs()
    args = sys.argv[1:]
    problem = check_choices(args) or check_compose(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()
