"""A sweep directory -> one tidy table, one row per run.

A *run* is a folder holding ``summary.json`` (finished), ``error.txt`` (failed: infeasible
or broken) or only hydra's ``.hydra/`` (started, never finished: ``status`` ``missing``).
Its row holds:

- the run's overrides from ``.hydra/overrides.yaml`` (``policy``, ``budget``, ``hardware``,
  ``experiment/trace``, ``policy.low_precision``, ...: the key without ``+``/``~``);
- every ``summary.json`` key; nested dicts are flattened with a dot (``activations.bf16``,
  ``policy_metrics.prefetch_hit_rate``, ``policy_config.alpha``); lists become JSON text;
- derived columns: ``trace`` (the ``experiment/trace`` choice, else the workload file's stem),
  ``label`` (the policy, plus the values of any other swept override, e.g. ``dynaexq int8/int2``
  for ``policy.high_precision=int8 policy.low_precision=int2``: what one line of a figure is),
  ``tokens`` / ``prefill_tokens`` / ``decode_tokens`` (from ``steps.parquet``),
  ``stall_share`` (stall over simulated time), ``h2d_bytes_per_token``, ``bf16_share`` (share
  of activations served in bf16), ``latency_ms`` (TPOT mean where the run decodes, else TTFT
  mean, named by ``latency_kind``), ``status``, ``error`` and ``run_dir``.

Missing values (a prefill-only trace has no TPOT) are NaN; nothing is dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

STATUS_OK, STATUS_ERROR, STATUS_MISSING = "ok", "error", "missing"
MARKERS = ("summary.json", "error.txt", ".hydra")


def find_runs(root: Path) -> list[Path]:
    """Run folders under ``root`` (itself included), sorted."""
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory (give the sweep's directory, e.g. multirun/seed_policies)")
    found = {p.parent for marker in MARKERS for p in root.rglob(marker)}
    found = {d for d in found if d.name != ".hydra"}  # a .hydra/ inside .hydra/ is no run
    if not found:
        raise ValueError(f"{root}: no runs found (no summary.json, error.txt or .hydra/ below it); "
                         "is this a moebits sim output directory?")
    return sorted(found)


def read_overrides(run: Path) -> dict[str, str]:
    """The run's hydra overrides as ``{key: value}`` (experiment selections included)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = np.nan if value is None else value


def read_summary(run: Path) -> dict[str, Any]:
    """``summary.json`` flattened (see the module docstring); {} when absent."""
    path = run / "summary.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    out: dict[str, Any] = {}
    _flatten("", data, out)
    return out


def step_tokens(run: Path) -> dict[str, float]:
    """Prefill, decode and total tokens of a finished run (from ``steps.parquet``)."""
    path = run / "steps.parquet"
    if not path.exists():
        return {}
    steps = pd.read_parquet(path, columns=["phase", "tokens"])
    by_phase = steps.groupby("phase")["tokens"].sum()
    pre, dec = float(by_phase.get("prefill", 0)), float(by_phase.get("decode", 0))
    return {"prefill_tokens": pre, "decode_tokens": dec, "tokens": pre + dec}


def run_row(run: Path, root: Path) -> dict[str, Any]:
    """One run's row (see the module docstring)."""
    row: dict[str, Any] = {"run_dir": str(run.relative_to(root)) or "."}
    row.update(read_overrides(run))
    summary = read_summary(run)
    row.update(summary)
    if summary:
        row["status"], row["error"] = STATUS_OK, ""
        row.update(step_tokens(run))
    elif (run / "error.txt").exists():
        lines = (run / "error.txt").read_text().strip().splitlines()
        row["status"], row["error"] = STATUS_ERROR, lines[0] if lines else "(empty error.txt)"
    else:
        row["status"], row["error"] = STATUS_MISSING, ""
    return row


def _trace_label(row: pd.Series) -> str:
    choice = row.get("experiment/trace")
    if isinstance(choice, str) and choice:
        return choice
    src = row.get("workload")
    if isinstance(src, str) and src:
        return Path(src).stem if src.endswith(".parquet") else src
    return "?"


STUDY_KEYS = {"policy", "budget", "hardware", "experiment", "experiment/trace"}


def _label(row: pd.Series, extra: list[str]) -> str:
    policy = row.get("policy")
    name = policy if isinstance(policy, str) and policy else "?"
    values = [str(row[k]) for k in extra if isinstance(row.get(k), str) and row[k]]
    return f"{name} {'/'.join(values)}" if values else name


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    return num / den.where(den > 0)


def add_derived(df: pd.DataFrame, overrides: set[str] | None = None) -> pd.DataFrame:
    """The derived columns of the module docstring (``overrides``: the swept keys)."""
    overrides = {k for k in (overrides or set()) if k in df}
    df = df.copy()
    for col in ("stall_s", "sim_time_s", "h2d_bytes", "tokens", "tpot_ms_mean", "ttft_ms", "quality_proxy"):
        if col not in df:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["trace"] = df.apply(_trace_label, axis=1)
    extra = sorted(k for k in overrides if k not in STUDY_KEYS and df[k].nunique(dropna=True) > 1)
    df["label"] = df.apply(_label, axis=1, extra=extra)
    df["stall_share"] = _ratio(df["stall_s"], df["sim_time_s"])
    df["h2d_bytes_per_token"] = _ratio(df["h2d_bytes"], df["tokens"])
    act = [c for c in df.columns if c.startswith("activations.")]
    ok = df["status"] == STATUS_OK
    for col in act:  # a precision missing from a finished run's pool served nothing
        df[col] = pd.to_numeric(df[col], errors="coerce").where(~ok, lambda c: c.fillna(0))
    total = df[act].sum(axis=1, min_count=1) if act else np.nan
    bf16 = df["activations.bf16"] if "activations.bf16" in df else pd.Series(0.0, index=df.index).where(ok)
    df["bf16_share"] = _ratio(bf16, total)
    decodes = df["tpot_ms_mean"].notna()
    df["latency_ms"] = df["tpot_ms_mean"].where(decodes, df["ttft_ms"])
    df["latency_kind"] = np.where(decodes, "tpot", np.where(df["ttft_ms"].notna(), "ttft", ""))
    return df


def _tidy_types(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding mixed values become text, so Parquet can store them."""
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col] if not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1 or (kinds and not kinds <= {str}):
                df[col] = df[col].map(lambda v: "" if isinstance(v, float) and math.isnan(v) else str(v))
    return df


def collect_runs(root: str | Path, progress: bool = False) -> pd.DataFrame:
    """Every run under ``root`` as one row (see the module docstring)."""
    from tqdm import tqdm

    root = Path(root)
    runs = find_runs(root)
    rows = [run_row(r, root) for r in tqdm(runs, desc="runs", unit="run", disable=not progress)]
    swept = {k for r in runs for k in read_overrides(r)}
    df = add_derived(pd.DataFrame(rows), swept)
    first = ["run_dir", "status", "trace", "hardware", "budget", "policy", "label"]
    cols = [c for c in first if c in df] + sorted(c for c in df if c not in first)
    return _tidy_types(df[cols].reset_index(drop=True))
