"""What a runtime run measured, in the simulator's result format (analysis reads both alike).

The runtime may not import ``sim``, so this module rebuilds ``sim.metrics``' tables from the
runtime's own records with the same definitions, column names and summary keys (a test checks
that they stay equal): one row per forward pass (``steps.parquet``) and the run summary
(``summary.json``). Times are measured, not modelled: each layer step's end is a CUDA event on
the compute stream (wall clock on CPU), relative to the run's start.

Definitions (as in the simulator):

- latency of a pass: from the end of the previous pass to the end of this one (the end of a
  pass is the end of its last MoE layer);
- TTFT of a batch: from its first layer step's start to the end of its prefill pass;
  TPOT: the latency of each decode pass;
- tokens/s: decode tokens over decode time; stall: time a layer waited for expert copies;
  host wait: time spent computing experts on the host (``MissRule.HOST``);
- quality proxy: gate-weighted expert error per (token, layer) (see :mod:`core.quality`).

The runtime adds real quality where it generates: ``kl`` per pass (mean KL divergence of the
next-token distributions from the bf16 model's, nats) and ``kl_mean`` / ``kl_p99`` in the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

COUNTERS = ("h2d_bytes", "d2h_bytes", "h2d_weight_bytes", "promotions", "prefetches", "demotions", "refusals",
            "hbm_used_bytes", "hbm_peak_bytes")


@dataclass
class RuntimeRecords:
    """Per-layer-step lists the engine appends to, and counter snapshots at pass ends."""

    precisions: list[str]
    ls_batch: list[int] = field(default_factory=list)
    ls_pass: list[int] = field(default_factory=list)
    ls_tokens: list[int] = field(default_factory=list)
    end_s: list[float] = field(default_factory=list)
    stall_s: list[float] = field(default_factory=list)
    host_wait_s: list[float] = field(default_factory=list)
    err: list[float] = field(default_factory=list)
    act: list[int] = field(default_factory=list)  # P + 1 per step: tokens per precision, then host
    snaps: list[tuple[int, ...]] = field(default_factory=list)
    kl: dict[tuple[int, int], float] = field(default_factory=dict)  # (batch, pass) -> mean KL
    wall_s: float = 0.0  # wall time from the run's start to its end

    @property
    def layer_steps(self) -> int:
        return len(self.end_s)

    def arrays(self) -> dict[str, np.ndarray]:
        P = len(self.precisions)
        return {
            "ls_batch": np.asarray(self.ls_batch, np.int64), "ls_pass": np.asarray(self.ls_pass, np.int64),
            "ls_tokens": np.asarray(self.ls_tokens, np.int64), "end_s": np.asarray(self.end_s, np.float64),
            "stall_s": np.asarray(self.stall_s, np.float64), "host_wait_s": np.asarray(self.host_wait_s, np.float64),
            "err": np.asarray(self.err, np.float64), "act": np.asarray(self.act, np.int64).reshape(-1, P + 1),
            "snaps": np.asarray(self.snaps, np.int64).reshape(-1, len(COUNTERS)),
        }


def _pass_starts(batch: np.ndarray, passes: np.ndarray) -> np.ndarray:
    key = batch * (int(passes.max(initial=0)) + 1) + passes
    if key.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, key[1:] != key[:-1]])


def pass_table(rec: RuntimeRecords) -> pd.DataFrame:
    """One row per forward pass: the simulator's ``steps.parquet`` columns, plus ``kl``."""
    a = rec.arrays()
    starts = _pass_starts(a["ls_batch"], a["ls_pass"])
    if starts.size == 0:
        return pd.DataFrame()
    n = a["end_s"].shape[0]
    ends = np.r_[starts[1:], n] - 1
    t_start = np.r_[0.0, a["end_s"]][starts]
    token_layers = np.add.reduceat(a["ls_tokens"], starts)
    df = pd.DataFrame({
        "batch": a["ls_batch"][starts].astype(np.int32),
        "pass": a["ls_pass"][starts].astype(np.int32),
        "phase": np.where(a["ls_pass"][starts] == 0, "prefill", "decode"),
        "tokens": a["ls_tokens"][starts].astype(np.int32),
        "start_s": t_start,
        "end_s": a["end_s"][ends],
        "latency_s": a["end_s"][ends] - t_start,
        "stall_s": np.add.reduceat(a["stall_s"], starts),
        "host_wait_s": np.add.reduceat(a["host_wait_s"], starts),
    })
    snaps = a["snaps"]
    diffs = np.diff(np.vstack([np.zeros((1, len(COUNTERS)), np.int64), snaps]), axis=0)
    for k, name in enumerate(COUNTERS):
        df[name] = snaps[:, k] if name.startswith("hbm_") else diffs[:, k]
    act = np.add.reduceat(a["act"], starts, axis=0)
    for k, p in enumerate([*rec.precisions, "host"]):
        df[f"act_{p}"] = act[:, k]
    df["quality_proxy"] = np.add.reduceat(a["err"], starts) / np.maximum(token_layers, 1)
    df["kl"] = [rec.kl.get((int(b), int(p)), math.nan) for b, p in zip(df["batch"], df["pass"], strict=True)]
    return df


def _ms(x: float) -> float | None:
    return None if not math.isfinite(x) else x * 1e3


def summarize(rec: RuntimeRecords, wall_s: float, info: dict[str, Any]) -> dict[str, Any]:
    """The run summary (``summary.json``), with the simulator's keys plus ``kl_mean`` / ``kl_p99``."""
    df = pass_table(rec)
    a = rec.arrays()
    dec = df[df["phase"] == "decode"] if len(df) else df
    first = df.groupby("batch", sort=True).first() if len(df) else df
    pre = first[first["pass"] == 0] if len(df) else df
    ttft = (pre["end_s"] - pre["start_s"]).to_numpy() if len(df) else np.zeros(0)
    tpot = dec["latency_s"].to_numpy() if len(dec) else np.zeros(0)
    dec_time = float(tpot.sum())
    last = a["snaps"][-1] if a["snaps"].shape[0] else np.zeros(len(COUNTERS), np.int64)
    counters = {name: int(last[k]) for k, name in enumerate(COUNTERS)}
    counters.pop("hbm_used_bytes")
    kl = np.asarray([v for v in rec.kl.values() if math.isfinite(v)], np.float64)
    steps = rec.layer_steps
    out: dict[str, Any] = {
        "ttft_ms": _ms(float(ttft.mean())) if ttft.size else None,
        "ttft_ms_p99": _ms(float(np.percentile(ttft, 99))) if ttft.size else None,
        "tpot_ms_p50": _ms(float(np.percentile(tpot, 50))) if tpot.size else None,
        "tpot_ms_p99": _ms(float(np.percentile(tpot, 99))) if tpot.size else None,
        "tpot_ms_mean": _ms(float(tpot.mean())) if tpot.size else None,
        "tokens_per_s": float(dec["tokens"].sum() / dec_time) if dec_time > 0 else 0.0,
        "stall_s": float(a["stall_s"].sum()),
        "host_wait_s": float(a["host_wait_s"].sum()),
        **counters,
        "quality_proxy": float(a["err"].sum() / max(int(a["ls_tokens"].sum()), 1)),
        "activations": {p: int(n) for p, n in zip([*rec.precisions, "host"], a["act"].sum(axis=0), strict=True)},
        "sim_time_s": float(a["end_s"][-1]) if steps else 0.0,
        "passes": int(len(df)),
        "layer_steps": steps,
        "wall_s": wall_s,
        "layer_steps_per_s": steps / wall_s if wall_s > 0 else None,
        "kl_mean": float(kl.mean()) if kl.size else None,
        "kl_p99": float(np.percentile(kl, 99)) if kl.size else None,
    }
    out.update(info)
    return out
