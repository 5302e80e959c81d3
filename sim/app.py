"""``moebits sim``: the hydra app that replays a workload under a policy and writes results.

Each run writes to its hydra run directory: ``summary.json``, ``steps.parquet`` (one row per
forward pass), ``figure.pdf/png``, ``outcome.json``, ``app.log`` and hydra's ``.hydra/`` (the
config used). Sweeps (``-m policy=a,b seed=0,1``) write one folder per override set under their
own sweep folder; bad settings, failing sweep runs, the tally and resuming behave as
:mod:`drive.app` and :mod:`drive.sweep` say (shared with ``moebits runtime``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moebits.drive.app import CONF_DIR, App, presets
from moebits.drive.records import RunResult
from moebits.sim.config import RunConfig, register_configs
from moebits.sim.engine import EngineOptions
from moebits.sim.runner import simulate

__all__ = ["APP", "CONF_DIR", "main", "presets", "run_config"]


def execute(cfg: RunConfig) -> tuple[RunResult, dict[str, Any]]:
    """Simulate ``cfg``: the run's arrays and its summary."""
    return simulate(cfg, EngineOptions(check=cfg.check, progress=cfg.progress))


APP = App("config", RunConfig, register_configs, execute)


def run_config(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Simulate ``cfg`` and write its files to ``out_dir``; returns the summary."""
    return APP.run_config(cfg, out_dir)


def main() -> None:
    """Entry point of ``moebits sim``."""
    APP.main()
