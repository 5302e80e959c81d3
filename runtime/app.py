"""``moebits runtime``: the live run, with the simulator's config groups, app and result files.

Composes ``conf/runtime.yaml`` (the same ``model/``, ``hardware/``, ``policy/``, ``workload/``
and ``budget/`` groups as ``moebits sim``, plus ``runtime.*``), runs it (:mod:`runtime.runner`)
and writes to the hydra run directory ``summary.json`` and ``steps.parquet`` in the
simulator's format (:mod:`drive.records`; plus ``kl`` / ``kl_mean`` / ``kl_p99`` where it
measures KL, and the device), so that analysis reads simulated and measured runs alike. Bad
settings, sweeps and resuming behave as :mod:`drive.app` says (shared with ``moebits sim``).
``moebits runtime calibrate [--help]`` writes a hardware profile (:mod:`runtime.calibrate`).
"""

from __future__ import annotations

import sys

from moebits.core.config import register_schemas
from moebits.drive.app import CONF_DIR, App, check_compose, presets
from moebits.policies.base import policy_configs
from moebits.runtime.runner import RuntimeRunConfig, execute

__all__ = ["APP", "CONF_DIR", "check_compose", "main", "presets", "register_configs"]

CONFIG_NAME = "runtime"


def register_configs() -> None:
    """The runtime's primary schema plus the shared group schemas (idempotent)."""
    register_schemas(RuntimeRunConfig, policy_configs(), schema_name="runtime_schema")


APP = App(CONFIG_NAME, RuntimeRunConfig, register_configs, execute)


def main() -> None:
    """Entry point of ``moebits runtime``; ``moebits runtime calibrate ...`` measures this machine
    (:mod:`runtime.calibrate`)."""
    if sys.argv[1:2] == ["calibrate"]:
        from moebits.runtime import calibrate

        calibrate.main(sys.argv[2:])
        return
    APP.main()
