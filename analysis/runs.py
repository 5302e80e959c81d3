"""A sweep directory -> one tidy table, one row per run.

A *run* is a folder holding ``summary.json`` (finished), ``error.txt`` (ended without a
result) or only hydra's ``.hydra/`` (started, never finished). Its ``status`` is ``ok``,
``infeasible`` (the budget cannot hold the run: a fact about the config), ``failed`` (anything
else; from ``outcome.json``, see :mod:`drive.outcome`; an ``error.txt`` without one counts as
failed) or ``unfinished`` (interrupted). Its row holds:

- the run's overrides from ``.hydra/overrides.yaml`` (``policy``, ``budget``, ``hardware``,
  ``experiment/trace``, ``policy.low_precision``, ...: the key without ``+``/``~``; numbers
  and booleans typed as YAML reads them);
- the group choices of the run (``policy``, ``model``, ``hardware``, ``workload``, from
  ``.hydra/hydra.yaml``), so a failed run is still placed;
- every field of the fully composed config (``.hydra/config.yaml``) that differs between the
  runs of the sweep, as ``config.<path>`` (``config.policy.alpha``, ``config.workload.seqs``);
- every ``summary.json`` key; nested dicts are flattened with a dot (``activations.bf16``,
  ``policy_metrics.prefetch_hit_rate``, ``policy_config.alpha``); lists become JSON text;
- derived columns: ``trace`` (the ``experiment/trace`` choice, else the workload file's stem),
  ``label`` (the policy, plus the values of any other swept override, e.g. ``dynaexq int8/int2``
  for ``policy.high_precision=int8 policy.low_precision=int2``: what one line of a figure is),
  ``tokens`` / ``prefill_tokens`` / ``decode_tokens`` (from ``steps.parquet``),
  ``stall_share`` (stall over simulated time), ``h2d_bytes_per_token``, ``bf16_share`` (share
  of activations served in bf16), ``latency_ms`` (TPOT mean where the run decodes, else TTFT
  mean, named by ``latency_kind``), ``status``, ``error`` (the reason) and ``run_dir``;
- the budget: ``budget_kind`` (``gb`` or the per-model preset: ``all_int4``, ``bf16_25pct``),
  ``budget_gb`` (the expert budget in GB: resolved by the run, else the config's
  ``budget_gb`` for kind ``gb``) and ``budget``, the budget as a figure or table names it:
  the preset for per-model budgets, ``16 GB`` for a plain ``budget_gb``.

Missing values (a prefill-only trace has no TPOT, a failed run no latency) are NaN; nothing
is dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from moebits.drive.outcome import read_outcome

STATUS_OK, STATUS_INFEASIBLE, STATUS_FAILED, STATUS_UNFINISHED = "ok", "infeasible", "failed", "unfinished"
MARKERS = ("summary.json", "error.txt", ".hydra")
GROUP_CHOICES = ("policy", "model", "hardware", "workload", "budget")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except (OSError, yaml.YAMLError):
        return None


def _typed(value: str) -> Any:
    """An override's value as YAML reads it (``8`` -> 8, ``true`` -> True), text otherwise."""
    try:
        out = yaml.load(value, Loader=_Loader)
    except yaml.YAMLError:
        return value
    return out if isinstance(out, int | float | bool) and not isinstance(out, str) else value


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
    for item in yaml.load(path.read_text(), Loader=_Loader) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = _typed(value)
    return out


def read_choices(run: Path) -> dict[str, str]:
    """The run's config-group choices (``policy: dynaexq``, ``budget: all_int4``...)."""
    data = _yaml(run / ".hydra" / "hydra.yaml")
    try:
        choices = data["hydra"]["runtime"]["choices"]
    except (TypeError, KeyError):
        return {}
    return {k: str(v) for k, v in choices.items() if k in GROUP_CHOICES or k.startswith("experiment")}


def read_config(run: Path) -> dict[str, Any]:
    """The run's composed config (``.hydra/config.yaml``) flattened as ``config.<path>``."""
    data = _yaml(run / ".hydra" / "config.yaml")
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        _flatten("config", data, out)
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


def run_status(run: Path, finished: bool) -> tuple[str, str]:
    """``(status, reason)`` of a run (see the module docstring)."""
    outcome = read_outcome(run)
    if outcome is not None and not (finished and outcome.status.value != STATUS_OK):
        return outcome.status.value, outcome.reason
    if finished:
        return STATUS_OK, ""
    if (run / "error.txt").exists():
        lines = (run / "error.txt").read_text().strip().splitlines()
        return STATUS_FAILED, lines[0] if lines else "(empty error.txt)"
    return STATUS_UNFINISHED, "started, never finished (interrupted?)"


def run_row(run: Path, root: Path) -> dict[str, Any]:
    """One run's row (see the module docstring)."""
    row: dict[str, Any] = {"run_dir": str(run.relative_to(root)) or "."}
    row.update(read_config(run))
    row.update(read_choices(run))
    row.update(read_overrides(run))
    summary = read_summary(run)
    row.update(summary)
    row["status"], row["error"] = run_status(run, bool(summary))
    if summary:
        row.update(step_tokens(run))
    return row


def _trace_label(row: pd.Series) -> str:
    choice = row.get("experiment/trace")
    if isinstance(choice, str) and choice:
        return choice
    for key in ("workload", "config.workload.path"):  # the summary's source, else the configured file
        src = row.get(key)
        if isinstance(src, str) and src:
            return Path(src).stem if src.endswith(".parquet") else src.split("(")[0]
    kind = row.get("config.workload.kind")
    return str(kind).lower() if isinstance(kind, str) and kind else "?"


# swept keys that place a run (panel, axis, trace) rather than name a line of a figure
STUDY_KEYS = {"policy", "budget", "budget_gb", "hardware", "model", "workload", "workload.path",
              "experiment", "experiment/trace"}


def _present(value: Any) -> bool:
    return value is not None and value != "" and not (isinstance(value, float) and math.isnan(value))


def _label(row: pd.Series, extra: list[str]) -> str:
    policy = row.get("policy")
    name = policy if isinstance(policy, str) and policy else "?"
    values = [f"{k.split('.')[-1]}={row[k]}" if not isinstance(row[k], str) else row[k]
              for k in extra if _present(row.get(k))]
    return f"{name} {'/'.join(values)}" if values else name


def _budget_kind(row: pd.Series) -> str:
    kind = row.get("budget_kind")
    if isinstance(kind, str) and kind:
        return kind
    all_at = row.get("config.budget.all_at")
    if not isinstance(all_at, str) or not all_at:
        return "gb"
    fraction = row.get("config.budget.fraction", 1.0)
    fraction = 1.0 if not isinstance(fraction, int | float) or math.isnan(fraction) else float(fraction)
    return f"all_{all_at}" if fraction == 1.0 else f"{all_at}_{fraction * 100:g}pct"


def add_budget(df: pd.DataFrame) -> pd.DataFrame:
    """``budget_kind``, ``budget_gb`` (numeric) and the ``budget`` label of the module docstring."""
    df["budget_kind"] = df.apply(_budget_kind, axis=1)
    gb = pd.to_numeric(df["budget_gb"], errors="coerce") if "budget_gb" in df else pd.Series(np.nan, index=df.index)
    if "config.budget_gb" in df:
        asked = pd.to_numeric(df["config.budget_gb"], errors="coerce")
        gb = gb.where(gb.notna() | (df["budget_kind"] != "gb"), asked)
    df["budget_gb"] = gb
    df["budget"] = [f"{g:g} GB" if k == "gb" and np.isfinite(g) else k for k, g in zip(df["budget_kind"], gb, strict=True)]
    return df


def varying_config(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the ``config.*`` columns whose values differ between runs (the sweep's settings)."""
    cols = [c for c in df.columns if c.startswith("config.")]
    same = [c for c in cols if df[c].map(repr).nunique() <= 1]
    return df.drop(columns=same)


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    return num / den.where(den > 0)


def add_derived(df: pd.DataFrame, overrides: set[str] | None = None) -> pd.DataFrame:
    """The derived columns of the module docstring (``overrides``: the swept keys)."""
    overrides = {k for k in (overrides or set()) if k in df}
    df = add_budget(df.copy())
    for col in ("stall_s", "sim_time_s", "h2d_bytes", "tokens", "tpot_ms_mean", "ttft_ms", "quality_proxy"):
        if col not in df:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["trace"] = df.apply(_trace_label, axis=1)
    extra = sorted(k for k in overrides if k not in STUDY_KEYS and df[k].nunique(dropna=False) > 1)
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
    df = varying_config(add_derived(pd.DataFrame(rows), swept))
    first = ["run_dir", "status", "error", "trace", "hardware", "budget", "budget_gb", "policy", "label"]
    cols = [c for c in first if c in df] + sorted(c for c in df if c not in first)
    return _tidy_types(df[cols].reset_index(drop=True))
