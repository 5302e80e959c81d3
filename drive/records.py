"""What a run measured, for both engines: per-layer-step records, per-pass rows, the summary.

An engine (simulated or real) fills a :class:`Recorder` as it goes (plain lists, cheap appends)
and turns it into a :class:`RunResult` of numpy arrays. From that, :func:`pass_table` builds
one row per forward pass (the rows of ``steps.parquet``, one schema for both engines) and
:func:`summarize` the run's ``summary.json`` (one format). Times are the engine's: modelled in
the simulator, measured in the runtime (CUDA events, or the wall clock on a CPU).

Definitions:

- latency of a pass: from the end of the previous pass to the end of this one;
- TTFT of a batch: from its first layer step's start to the end of its prefill pass;
  TPOT: the latency of each decode pass (each sequence of the batch gets one token per pass);
- tokens/s: decode tokens over decode time (0 when the workload has no decode);
- busy (whole-step graphs, both engines): the device's own seconds of a pass, from its graph's start on
  the compute stream to its end: the latency less any time the device waited for the host, and less the
  pass's input and routing copies (``busy_s``; a ``busy_s`` column where timed);
- stall: time a layer waited for expert copies; host wait: time a layer waited for experts
  computed on the host beyond its device compute;
- hit rate: demand hits / demand requests; a layer step requests each distinct expert it
  needs once, and a request hits if that expert had a READY copy (any precision) when the
  step's routing was known (before the policy acted). ``bypasses``: experts streamed through
  a staging slab instead of being cached (their copies count in ``h2d_bytes``);
- quality proxy: gate-weighted expert error summed over all routed (token, expert) pairs,
  divided by the (token, layer) pairs (see :mod:`core.quality`);
- ``kl`` (the runtime, where it generates): mean KL divergence of each pass's next-token
  distributions from the bf16 model's (nats): a ``kl`` column and ``kl_mean`` / ``kl_p99``.
  Runs without it (the simulator) have neither.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from moebits.core.routing import LayerSteps
from moebits.drive.driver import COUNTS

LINK_COUNTERS = ("h2d_bytes", "d2h_bytes", "h2d_weight_bytes")  # the mechanism's traffic
POOL_COUNTERS = ("hbm_used_bytes", "hbm_peak_bytes")  # the mechanism's occupancy
COUNTERS = (*LINK_COUNTERS, *COUNTS, *POOL_COUNTERS)  # COUNTS: the driver's (drive.driver)


def snapshot(link: tuple[int, int, int], counts: dict[str, int], pool: tuple[int, int]) -> tuple[int, ...]:
    """Counters in :data:`COUNTERS` order: the mechanism's traffic, the driver's counts, occupancy."""
    return (*link, *(counts[k] for k in COUNTS), *pool)


@dataclass
class Recorder:
    """Per-layer-step lists the engine appends to, and counter snapshots at pass ends."""

    precisions: list[str]
    end_s: Any = field(default_factory=list)  # lists, or arrays from the vectorized path
    stall_s: Any = field(default_factory=list)
    host_wait_s: Any = field(default_factory=list)
    err: Any = field(default_factory=list)
    act: Any = field(default_factory=list)  # P + 1 per step: tokens per precision, then host
    hits: Any = field(default_factory=list)  # requests that hit, per step
    requests: Any = field(default_factory=list)  # distinct experts needed, per step
    snaps: list[tuple[int, ...]] = field(default_factory=list)  # COUNTERS at each pass end
    kl: dict[tuple[int, int], float] | None = None  # (batch, pass) -> mean KL, where measured
    served: list[tuple[tuple[int, int, str], ...]] | None = None  # per step (expert, tokens, precision), if asked
    busy_s: list[float] = field(default_factory=list)  # per pass, where the engine times it: see RunResult


@dataclass
class StepIndex:
    """Batch, pass and tokens of each layer step, appended as a live run goes (the runtime)."""

    ls_batch: list[int] = field(default_factory=list)
    ls_pass: list[int] = field(default_factory=list)
    ls_tokens: list[int] = field(default_factory=list)

    def append(self, batch: int, pass_index: int, tokens: int) -> None:
        self.ls_batch.append(batch)
        self.ls_pass.append(pass_index)
        self.ls_tokens.append(tokens)


@dataclass
class RunResult:
    """Arrays of one replay (S layer steps, P pool precisions, N passes)."""

    precisions: list[str]
    ls_batch: np.ndarray  # [S]
    ls_pass: np.ndarray  # [S]
    ls_tokens: np.ndarray  # [S]
    end_s: np.ndarray  # [S] float64
    stall_s: np.ndarray  # [S]
    host_wait_s: np.ndarray  # [S]
    err: np.ndarray  # [S] gate-weighted error sum
    act: np.ndarray  # [S, P+1] activations per precision, last column host
    snaps: np.ndarray  # [N, len(COUNTERS)] counters at each pass end
    hits: np.ndarray  # [S] requests that hit
    requests: np.ndarray  # [S] distinct experts needed
    wall_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    kl: dict[tuple[int, int], float] | None = None
    served: list[tuple[tuple[int, int, str], ...]] | None = None  # see Recorder
    host: dict[str, np.ndarray] = field(default_factory=dict)  # the runtime's host timings (runtime.host_log)
    # [N] or empty: per pass, the device's own seconds of the pass's captured work (whole-step graphs: from the
    # graph's start on its stream to its end; no host gap, no input or routing copy), where the engine times it
    busy_s: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def from_recorder(cls, rec: Recorder, steps: LayerSteps | StepIndex, wall_s: float,
                      info: dict[str, Any]) -> RunResult:
        """Arrays of ``rec``; ``steps`` gives each layer step's batch, pass and tokens."""
        P = len(rec.precisions)
        return cls(
            precisions=list(rec.precisions),
            ls_batch=np.asarray(steps.ls_batch),
            ls_pass=np.asarray(steps.ls_pass),
            ls_tokens=np.asarray(steps.ls_tokens),
            end_s=np.asarray(rec.end_s, dtype=np.float64),
            stall_s=np.asarray(rec.stall_s, dtype=np.float64),
            host_wait_s=np.asarray(rec.host_wait_s, dtype=np.float64),
            err=np.asarray(rec.err, dtype=np.float64),
            act=np.asarray(rec.act, dtype=np.int64).reshape(-1, P + 1),
            snaps=np.asarray(rec.snaps, dtype=np.int64).reshape(-1, len(COUNTERS)),
            hits=np.asarray(rec.hits, dtype=np.int64),
            requests=np.asarray(rec.requests, dtype=np.int64),
            wall_s=wall_s,
            info=info,
            kl=rec.kl,
            served=rec.served,
            busy_s=np.asarray(rec.busy_s, dtype=np.float64),
        )

    @property
    def layer_steps(self) -> int:
        return int(self.end_s.shape[0])

    def host_probe_s(self) -> float | None:
        """The host speed the run was measured at (mean of the runtime's ``runtime.host_log.host_probe_s``
        around its timed loop, seconds); None for a run without probes (simulated, or measured before them)."""
        p = self.host.get("probe_s")
        return float(np.mean(p)) if p is not None and np.size(p) else None

    def pass_starts(self) -> np.ndarray:
        """Index of the first layer step of every pass."""
        key = self.ls_batch.astype(np.int64) * (int(self.ls_pass.max(initial=0)) + 1) + self.ls_pass
        if key.size == 0:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.r_[True, key[1:] != key[:-1]])


def pass_table(r: RunResult) -> pd.DataFrame:
    """One row per forward pass: timing, traffic, occupancy, precision mix and quality."""
    starts = r.pass_starts()
    if starts.size == 0:
        return pd.DataFrame()
    ends = np.r_[starts[1:], r.layer_steps] - 1
    t_start = np.r_[0.0, r.end_s][starts]
    token_layers = np.add.reduceat(r.ls_tokens.astype(np.int64), starts)
    df = pd.DataFrame({
        "batch": r.ls_batch[starts].astype(np.int32),
        "pass": r.ls_pass[starts].astype(np.int32),
        "phase": np.where(r.ls_pass[starts] == 0, "prefill", "decode"),
        "tokens": r.ls_tokens[starts].astype(np.int32),
        "start_s": t_start,
        "end_s": r.end_s[ends],
        "latency_s": r.end_s[ends] - t_start,
        "stall_s": np.add.reduceat(r.stall_s, starts),
        "host_wait_s": np.add.reduceat(r.host_wait_s, starts),
        "hits": np.add.reduceat(r.hits, starts),
        "requests": np.add.reduceat(r.requests, starts),
    })
    diffs = np.diff(np.vstack([np.zeros((1, len(COUNTERS)), np.int64), r.snaps]), axis=0)
    for k, name in enumerate(COUNTERS):
        df[name] = r.snaps[:, k] if name.startswith("hbm_") else diffs[:, k]
    act = np.add.reduceat(r.act, starts, axis=0)
    for k, p in enumerate([*r.precisions, "host"]):
        df[f"act_{p}"] = act[:, k]
    df["quality_proxy"] = np.add.reduceat(r.err, starts) / np.maximum(token_layers, 1)
    if r.busy_s.size == len(df):
        df["busy_s"] = r.busy_s
    if r.kl is not None:
        kl = r.kl
        df["kl"] = [kl.get((int(b), int(p)), math.nan) for b, p in zip(df["batch"], df["pass"], strict=True)]
    return df


def _ms(x: float) -> float | None:
    return None if not math.isfinite(x) else x * 1e3


def _ttft_s(df: pd.DataFrame) -> np.ndarray:
    """Per batch with a prefill pass: end of prefill minus the batch's start."""
    first = df.groupby("batch", sort=True).first()
    pre = first[first["pass"] == 0]
    return (pre["end_s"] - pre["start_s"]).to_numpy()


def summarize(r: RunResult) -> dict[str, Any]:
    """The run summary (``summary.json``); times in ms where the key says so."""
    df = pass_table(r)
    dec = df[df["phase"] == "decode"] if len(df) else df
    ttft = _ttft_s(df) if len(df) else np.zeros(0)
    tpot = dec["latency_s"].to_numpy() if len(dec) else np.zeros(0)
    dec_time = float(tpot.sum())
    total_act = r.act.sum(axis=0)
    last = r.snaps[-1] if r.snaps.shape[0] else np.zeros(len(COUNTERS), np.int64)
    counters = {name: int(last[k]) for k, name in enumerate(COUNTERS)}
    counters.pop("hbm_used_bytes")
    sim_s = float(r.end_s[-1]) if r.layer_steps else 0.0
    out: dict[str, Any] = {
        "ttft_ms": _ms(float(ttft.mean())) if ttft.size else None,
        "ttft_ms_p99": _ms(float(np.percentile(ttft, 99))) if ttft.size else None,
        "tpot_ms_p50": _ms(float(np.percentile(tpot, 50))) if tpot.size else None,
        "tpot_ms_p99": _ms(float(np.percentile(tpot, 99))) if tpot.size else None,
        "tpot_ms_mean": _ms(float(tpot.mean())) if tpot.size else None,
        "tokens_per_s": float(dec["tokens"].sum() / dec_time) if dec_time > 0 else 0.0,
        "stall_s": float(r.stall_s.sum()),
        "host_wait_s": float(r.host_wait_s.sum()),
        "hit_rate": float(r.hits.sum() / r.requests.sum()) if r.requests.sum() else None,
        "hits": int(r.hits.sum()),
        "requests": int(r.requests.sum()),
        **counters,
        "quality_proxy": float(r.err.sum() / max(int(r.ls_tokens.sum()), 1)),
        "activations": {p: int(n) for p, n in zip([*r.precisions, "host"], total_act, strict=True)},
        "sim_time_s": sim_s,
        "passes": int(len(df)),
        "layer_steps": r.layer_steps,
        "wall_s": r.wall_s,
        "layer_steps_per_s": r.layer_steps / r.wall_s if r.wall_s > 0 else None,
    }
    if r.kl is not None:
        kl = np.asarray([v for v in r.kl.values() if math.isfinite(v)], np.float64)
        out["kl_mean"] = float(kl.mean()) if kl.size else None
        out["kl_p99"] = float(np.percentile(kl, 99)) if kl.size else None
    out.update(r.info)
    return out


_ARRAYS = ("ls_batch", "ls_pass", "ls_tokens", "end_s", "stall_s", "host_wait_s", "err", "act", "snaps", "hits",
           "requests")


def save_run(r: RunResult, path: Path) -> None:
    """Write ``r``'s arrays, precisions, wall time, info, host timings and pass device times to ``path``
    (``.npz``; no KL, no served list)."""
    meta = {"precisions": r.precisions, "wall_s": r.wall_s, "info": r.info}
    arrays = {k: getattr(r, k) for k in _ARRAYS} | {f"host_{k}": v for k, v in r.host.items()} | {"busy_s": r.busy_s}
    np.savez_compressed(path, meta=np.array(json.dumps(meta, default=str)), **arrays)


def load_run(path: Path) -> RunResult:
    """A :class:`RunResult` written by :func:`save_run`."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        host = {k[5:]: z[k] for k in z.files if k.startswith("host_") and k not in _ARRAYS}
        busy = z["busy_s"] if "busy_s" in z.files else np.zeros(0)   # runs saved before pass device times
        return RunResult(precisions=meta["precisions"], wall_s=meta["wall_s"], info=meta["info"], host=host,
                         busy_s=busy, **{k: z[k] for k in _ARRAYS})
