"""Whole-pass timing designs: what a captured step costs for a given routing and residency.

Dimension legend: L layers, T rows of a pass, k experts per row, E experts, P precisions.

The graph path's cost model is calibrated on the thing it serves: one captured whole-step graph
per pass size ``T`` (:class:`runtime.graph_serve.StepRunner`, ``GraphMode.WHOLE``) of a
:class:`runtime.fast_model.FastModel` whose every expert is resident in every calibrated
precision at once. A *design* is a synthetic routing (``ids``/``weights [L, T, k]``: each layer
routes its rows over a random subset of ``n`` experts, ``n`` drawn per layer between ``k`` and
``E``) plus a residency (each expert served from one precision, drawn with per-design shares)
at a KV-cache position ``context``; half the designs are drawn like a policy's, with skewed routing and the
hottest experts at the highest precision (:func:`random_design`: without them the tables over-priced the
frequency-placed pools of real traces by 5-7%, docs/FIDELITY.md session 6). Writing a design is writing the step's buffers and the
residency table; the graph is replayed unchanged and timed with CUDA events (median of
``reps``), each timed replay queued behind another so that its launch is hidden as in serving. No trace is involved: calibration never sees the traces it is validated on.

Per design the features of the cost model are kept per layer: tokens (``tok [L, P]``, the
(row, expert) pairs served at each precision) and distinct experts (``cnt [L, P]``).
:func:`measure_designs` returns one row per design (T, context, layers, seconds and the
features summed over layers; the per-layer arrays in ``per_layer``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from moebits.core.hardware import GraphPassTable
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import channel_mix_of, get_channel_mix
from moebits.core.slabs import SlabClass, SlabLedger
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights, StepBuffers
from moebits.runtime.graph_serve import GraphMode, StepRunner
from moebits.runtime.host_store import random_weights as random_expert_weights
from moebits.runtime.pool import DevicePool
from moebits.runtime.residency import ResidencyTable, load_layer

SLACK_BYTES = 64 << 20


@dataclass
class MixedModel:
    """A fast model with every expert resident in every precision; ``codes[p] [L, E]`` per precision."""

    model: FastModel
    precisions: list[str]
    codes: dict[str, np.ndarray]


def mixed_model(spec: ModelSpec, precisions: list[str], weights: FastWeights, shape: AttnShape,
                device: torch.device, use_triton: bool, max_seqs: int, max_len: int) -> MixedModel:
    """Every expert of ``spec`` loaded once per precision (random bf16 experts, quantized; a channel mix
    registered by name, :func:`core.precision.channel_mix_of`, as a class of its own)."""
    classes = [SlabClass(p, slab_bytes(spec, p), spec.layers * spec.experts) for p in precisions]
    budget = sum(c.slab_bytes * c.count for c in classes)
    pool = DevicePool(SlabLedger(classes, budget + SLACK_BYTES), spec, device)
    table = ResidencyTable(spec.layers, spec.experts, device)
    model = FastModel(weights, spec, shape, pool, table, use_triton, max_seqs=max_seqs, max_len=max_len)
    model.forced = True
    experts = random_expert_weights(spec, 1, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    codes = {}
    for p in precisions:
        for layer in range(spec.layers):
            load_layer(pool, table, layer, *experts(layer), p)
        table.flush()
        codes[p] = table.host.copy()
    return MixedModel(model, precisions, codes)


def slab_bytes(spec: ModelSpec, precision: str) -> int:
    """One expert's planned bytes in ``precision``: a plain format's, or a channel mix's (named as
    :attr:`core.precision.ChannelMix.name`; registered here if it is not yet)."""
    mix = get_channel_mix(precision) or channel_mix_of(precision)
    if mix is None:
        return spec.expert_bytes(precision)
    return mix.expert_bytes(spec.expert_bytes(mix.low), spec.expert_bytes(mix.high))


@dataclass
class Design:
    """One synthetic pass: routing, which precision serves each expert, the cache position."""

    rows: int
    context: int
    ids: np.ndarray          # [L, T, k] int32
    weights: np.ndarray      # [L, T, k] float32
    serve: np.ndarray        # [L, E] precision index
    prefill: bool = False


def random_design(rng: np.random.Generator, spec: ModelSpec, rows: int, context: int, n_prec: int,
                  prefill: bool = False) -> Design:
    """Routing over a random subset of ``n`` experts per layer (``k <= n <= E``), residency by random shares.

    Half the designs are *like a policy's*: rows pick the pool's experts with Zipf-like odds (exponent 0.5-1.5,
    a few hot experts carry most rows, as in real traces) and the hottest experts of each layer get the
    highest precision (precision 0 first), as frequency- and hotness-driven policies place them; the other
    half route uniformly over the pool and draw each expert's precision independently of its routing."""
    L, E, k = spec.layers, spec.experts, spec.top_k
    ids = np.zeros((L, rows, k), np.int32)
    shares = rng.dirichlet(np.full(n_prec, 0.6)) if rng.random() < 0.8 else np.eye(n_prec)[rng.integers(n_prec)]
    like_policy = rng.random() < 0.5
    skew = rng.uniform(0.5, 1.5) if like_policy else 0.0
    for layer in range(L):
        n = int(rng.integers(k, min(E, max(k, rows * k)) + 1))
        pool = rng.choice(E, size=n, replace=False)
        odds = (1.0 + np.arange(n)) ** -skew
        for t in range(rows):
            ids[layer, t] = rng.choice(pool, size=k, replace=False, p=odds / odds.sum())
    w = rng.random((L, rows, k)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    if like_policy:
        serve = np.stack([_by_heat(ids[layer], shares, E, rng) for layer in range(L)])
    else:
        serve = rng.choice(n_prec, size=(L, E), p=shares)
    return Design(rows, context, ids, w, serve, prefill)


def _by_heat(ids: np.ndarray, shares: np.ndarray, experts: int, rng: np.random.Generator) -> np.ndarray:
    """Precision index per expert ``[E]``: experts by rows routed to them (most first, ties at random), the first
    ``shares[0]`` of them at precision 0, the next ``shares[1]`` at precision 1, and so on."""
    heat = np.bincount(ids.ravel(), minlength=experts) + rng.random(experts) * 0.5
    order = np.argsort(-heat)
    bounds = np.round(np.cumsum(shares) * experts).astype(int)
    serve = np.zeros(experts, np.int64)
    serve[order] = np.searchsorted(bounds, np.arange(experts), side="right").clip(0, len(shares) - 1)
    return serve


def features(d: Design, n_prec: int, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``tok [L, P]`` (pairs per precision) and ``cnt [L, P]`` (distinct experts per precision)."""
    L = d.ids.shape[0]
    tok, cnt = np.zeros((L, n_prec)), np.zeros((L, n_prec))
    for layer in range(L):
        per_e = np.bincount(d.ids[layer].ravel(), minlength=experts)
        used = np.flatnonzero(per_e)
        np.add.at(tok[layer], d.serve[layer, used], per_e[used])
        np.add.at(cnt[layer], d.serve[layer, used], 1)
    return tok, cnt


@dataclass
class DesignTimer:
    """Captured whole-step graphs of one mixed model, one per pass size, and a timer."""

    mm: MixedModel
    reps: int = 7
    runners: dict[int, StepRunner] = field(default_factory=dict)

    def runner(self, rows: int) -> StepRunner:
        if rows not in self.runners:
            m = self.mm.model
            mode = GraphMode.WHOLE if m.device.type == "cuda" else GraphMode.EAGER
            r = StepRunner(m, m.buffers(rows), mode)
            r.capture()
            self.runners[rows] = r
        return self.runners[rows]

    def load(self, d: Design) -> StepBuffers:
        """Write ``d`` into the step's buffers and the residency table."""
        mm = self.mm
        r = self.runner(d.rows)
        b, dev = r.buf, mm.model.device
        codes = np.choose(d.serve, [mm.codes[p] for p in mm.precisions])
        mm.model.table.codes.copy_(torch.from_numpy(codes).to(dev, torch.int32))
        mm.model.table.host[:] = codes
        b.set_routing(torch.from_numpy(d.ids).to(dev), torch.from_numpy(d.weights).to(dev))
        if d.prefill:
            seq, pos = torch.zeros(d.rows, dtype=torch.int32), torch.arange(d.rows, dtype=torch.int32)
        else:
            seq, pos = torch.arange(d.rows, dtype=torch.int32), torch.full((d.rows,), d.context, dtype=torch.int32)
        b.set_rows(torch.zeros(d.rows, dtype=torch.long), seq, pos)
        return b

    def time(self, d: Design, background: Callable[[], Any] | None = None) -> float:
        """Median seconds of one replay of ``d`` (``background()`` enqueued on another stream first)."""
        r = self.runner(d.rows)
        self.load(d)
        dev = self.mm.model.device
        if dev.type != "cuda":
            import time as _t
            out = []
            for _ in range(max(2, self.reps // 3)):
                t0 = _t.perf_counter()
                r.run()
                out.append(_t.perf_counter() - t0)
            return float(np.median(out))
        r.run()
        torch.cuda.synchronize()
        out = []
        for _ in range(self.reps):
            if background is not None:
                background()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            r.run()          # a pass ahead on the stream: the timed one's launch overlaps it, as when serving
            a.record()
            r.run()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        torch.cuda.synchronize()
        return float(np.median(out))


def measure_designs(timer: DesignTimer, designs: list[Design], background: Callable[[], Any] | None = None,
                    tag: str = "") -> list[dict[str, Any]]:
    """One row per design: rows, context, layers, seconds, summed features; ``per_layer`` arrays."""
    mm = timer.mm
    P, E = len(mm.precisions), mm.model.spec.experts
    out = []
    for d in designs:
        tok, cnt = features(d, P, E)
        row: dict[str, Any] = {"rows": d.rows, "context": d.context, "prefill": d.prefill,
                               "layers": mm.model.spec.layers, "tag": tag, "seconds": timer.time(d, background)}
        for i, p in enumerate(mm.precisions):
            row[f"tok_{p}"] = float(tok[:, i].sum())
            row[f"cnt_{p}"] = float(cnt[:, i].sum())
        row["per_layer"] = np.concatenate([tok, cnt], axis=1).tolist()
        out.append(row)
    return out


def layers_of(spec: ModelSpec, layers: int) -> ModelSpec:
    return dataclasses.replace(spec, layers=layers, dense_params=spec.dense_params * layers // max(spec.layers, 1))


# ----------------------------------------------------------------------------- the fit
def _design_matrix(rows: list[dict[str, Any]], precisions: list[str], prefill: bool) -> np.ndarray:
    cols = [[1.0] * len(rows), [r["layers"] for r in rows]]
    if not prefill:
        cols.append([r["layers"] * r["context"] for r in rows])
    cols += [[r[f"tok_{p}"] for r in rows] for p in precisions]
    if not prefill:  # prefill passes touch most experts: distinct experts add no information there
        cols += [[r[f"cnt_{p}"] for r in rows] for p in precisions]
    return np.asarray(cols, float).T


def fit_pass_table(rows: list[dict[str, Any]], precisions: list[str], spec: ModelSpec, prefill: bool) -> GraphPassTable:
    """Least squares per row count of the designs' pass seconds on the table's terms (see
    :class:`core.hardware.GraphPassTable`); ``fit`` records the leave-one-out relative error."""
    tag = "prefill" if prefill else "decode"
    sel = [r for r in rows if r["tag"] == tag]
    sizes = sorted({int(r["rows"]) for r in sel})
    if not sizes:
        raise ValueError(f"no {tag} designs to fit")
    out: dict[str, list[float]] = {k: [] for k in ("fixed", "layer", "ctx")}
    tok: dict[str, list[float]] = {p: [] for p in precisions}
    cnt: dict[str, list[float]] = {p: [] for p in precisions}
    errs: list[float] = []
    for T in sizes:
        part = [r for r in sel if int(r["rows"]) == T]
        X, y = _design_matrix(part, precisions, prefill), np.array([r["seconds"] for r in part])
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        errs += _loo_errors(X, y)
        out["fixed"].append(float(coef[0]))
        out["layer"].append(float(coef[1]))
        k = 2 if prefill else 3
        out["ctx"].append(0.0 if prefill else float(coef[2]))
        for j, p in enumerate(precisions):
            tok[p].append(float(coef[k + j]))
            cnt[p].append(0.0 if prefill else float(coef[k + len(precisions) + j]))
    e = np.abs(np.asarray(errs))
    return GraphPassTable(spec.hidden, spec.expert_intermediate, spec.experts, spec.top_k, prefill,
                          [float(t) for t in sizes], out["fixed"], out["layer"], out["ctx"], tok, cnt,
                          classes=list(precisions), fit={"designs": float(len(sel)), "loo_err_mean": float(e.mean()) if e.size else 0.0,
                               "loo_err_p95": float(np.percentile(e, 95)) if e.size else 0.0})


def _loo_errors(X: np.ndarray, y: np.ndarray) -> list[float]:
    """Leave-one-out relative errors of the least-squares fit (held-out design predicted by the rest)."""
    errs = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        c = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
        errs.append(float((X[i] @ c - y[i]) / y[i]))
    return errs


# ----------------------------------------------------------------------------- the campaign
@dataclass(frozen=True)
class DesignPlan:
    """Which synthetic passes to time: layer counts, decode rows x KV positions, prefill sizes."""

    layers: tuple[int, ...] = (2, 8)
    rows: tuple[int, ...] = (1, 2, 4, 8, 16)
    contexts: tuple[int, ...] = (32, 200, 700)
    prefill: tuple[int, ...] = (32, 512)
    designs: int = 5
    reps: int = 5
    copy_bytes: int = 64 << 20   # the side-stream copy of the "copy" designs (GPU only)


def run_designs(full: ModelSpec, precisions: list[str], plan: DesignPlan, device: torch.device, seed: int = 0,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time ``plan``'s designs on ``full``'s shape (one mixed model per layer count); the rows of
    :func:`measure_designs`, tagged decode / prefill / copy (decode designs of the first row count
    again with a host-to-device copy on a side stream: copy/compute interference)."""
    from moebits.runtime.calibrate_graph import attn_shape, random_weights
    from moebits.runtime.fused_ops import triton_usable

    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    P = len(precisions)
    for L in plan.layers:
        spec = layers_of(full, L)
        shape = attn_shape(spec)
        mm = mixed_model(spec, precisions, random_weights(spec, shape, device), shape, device, triton_usable(device),
                         max_seqs=max(plan.rows), max_len=max([*plan.contexts, *plan.prefill]) + 2)
        timer = DesignTimer(mm, reps=plan.reps)
        for t in plan.rows:
            for c in plan.contexts:
                out += measure_designs(timer, [random_design(rng, spec, t, c, P) for _ in range(plan.designs)], tag="decode")
        for t in plan.prefill:
            out += measure_designs(timer, [random_design(rng, spec, t, 0, P, prefill=True) for _ in range(plan.designs)],
                                   tag="prefill")
        if device.type == "cuda":
            bg = _background_copy(device, plan.copy_bytes)
            out += measure_designs(timer, [random_design(rng, spec, plan.rows[0], plan.contexts[0], P)
                                           for _ in range(plan.designs)], background=bg, tag="copy")
        log(f"designs {full.name} x{L} layers: {len(out)} timed")
        del mm, timer
    return out


def _background_copy(device: torch.device, nbytes: int) -> Callable[[], None]:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)

    def start() -> None:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
    return start


def fit_tables(rows: list[dict[str, Any]], precisions: list[str], spec: ModelSpec) -> list[GraphPassTable]:
    """The decode and prefill tables of ``spec``'s shape (prefill only when prefill designs exist)."""
    out = [fit_pass_table(rows, precisions, spec, prefill=False)]
    if any(r["tag"] == "prefill" for r in rows):
        out.append(fit_pass_table(rows, precisions, spec, prefill=True))
    return out
