"""``moebits runtime``: the live run, with the simulator's config groups and result files.

Composes ``conf/runtime.yaml`` (the same ``model/``, ``hardware/``, ``policy/``, ``workload/``
and ``budget/`` groups as ``moebits sim``, plus ``runtime.*``), runs it (:mod:`runtime.runner`)
and writes to the hydra run directory ``summary.json`` (the simulator's keys, plus ``kl_mean``,
``kl_p99`` and the device) and ``steps.parquet`` (the simulator's columns, plus ``kl``), so that
analysis reads simulated and measured runs alike. Sweeps (``-m``) resume like the simulator's.

Bad settings stop with one line ``error: ...`` and exit status 2; ``HYDRA_FULL_ERROR=1`` shows
the traceback instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from moebits.core.config import GROUPS, one_line, register_schemas, unknown_preset
from moebits.core.slabs import PoolError
from moebits.drive.records import RuntimeRecords, pass_table
from moebits.policies.base import policy_configs
from moebits.runtime.runner import RuntimeRunConfig, execute
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_NAME = "runtime"
USER_ERRORS = (ValueError, OmegaConfBaseException, PoolError)
SUMMARY_ROWS = (
    ("ttft_ms", "TTFT (ms, mean)"), ("tpot_ms_p50", "TPOT p50 (ms)"), ("tpot_ms_p99", "TPOT p99 (ms)"),
    ("tokens_per_s", "decode tokens/s"), ("stall_s", "stall (s)"), ("h2d_bytes", "host->device (GB)"),
    ("hbm_peak_bytes", "peak HBM for experts (GB)"), ("promotions", "promotions"), ("demotions", "demotions"),
    ("quality_proxy", "quality proxy"), ("kl_mean", "KL vs bf16 (nats, mean)"), ("layer_steps", "layer steps"),
    ("wall_s", "wall (s)"), ("layer_steps_per_s", "layer steps / wall s"),
)


def register_configs() -> None:
    """The runtime's primary schema plus the shared group schemas (idempotent)."""
    register_schemas(RuntimeRunConfig, policy_configs(), schema_name="runtime_schema")


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_compose(args: list[str]) -> str | None:
    """Compose the run's config as hydra will; the first problem in one line."""
    if any(a.startswith("-") for a in args):
        return None
    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            OmegaConf.to_object(compose(CONFIG_NAME, overrides=overrides))
    except Exception as exc:  # hydra and OmegaConf raise many types; all are the user's input
        return one_line(exc)
    return None


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{value / 1e9:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_summary(s: dict[str, Any]) -> str:
    """A two-column table of the headline numbers."""
    head = (f"{s.get('policy')} | {s.get('model')} ({s.get('mode')}) on {s.get('device')} | "
            f"budget {s.get('budget_gb', 0):.4g} GB | batch {s.get('batch')}")
    rows = [(label, _fmt(key, s.get(key))) for key, label in SUMMARY_ROWS]
    mix = s.get("activations") or {}
    total = sum(mix.values()) or 1
    rows.append(("precision mix", ", ".join(f"{p} {n / total:.1%}" for p, n in mix.items() if n)))
    width = max(len(r[0]) for r in rows)
    return "\n".join([head, *(f"  {label:<{width}}  {value}" for label, value in rows)])


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def write_outputs(rec: RuntimeRecords, summary: dict[str, Any], out_dir: Path) -> None:
    """steps.parquet, then summary.json (atomically, last: its presence means 'finished')."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pass_table(rec).to_parquet(out_dir / "steps.parquet", index=False)
    tmp = out_dir / f"summary.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(_json_ready(summary), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / "summary.json")


def run_task(cfg: DictConfig) -> None:
    """One run: resume check, execute, write files, print the table."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    if cfg.resume and (out_dir / "summary.json").exists():
        print(f"skip {out_dir}: summary.json exists (resume=true)")
        return
    try:
        run_cfg = OmegaConf.to_object(cfg)
        assert isinstance(run_cfg, RuntimeRunConfig)
        rec, summary = execute(run_cfg)
    except USER_ERRORS as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        msg = one_line(exc)
        if not sweep:
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "error.txt").write_text(msg + "\n")
        print(f"error: {out_dir}: {msg}", file=sys.stderr)
        return
    write_outputs(rec, summary, out_dir)
    print(format_summary(summary))
    print(f"results: {out_dir}")


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")(run_task)


def main() -> None:
    """Entry point: register the schemas, catch bad overrides in one line, then run hydra."""
    register_configs()
    args = sys.argv[1:]
    problem = unknown_preset(args, {g: presets(g) for g in GROUPS}) or check_compose(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()
