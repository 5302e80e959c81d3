"""Synthetic routing traces with explicit knobs (:class:`SynthKnobs`).

The generator, per MoE layer it generates (E experts, k per token):

popularity (``skew``, per layer)
    Expert ranks have log-normal popularity: rank r (0 = hottest) gets weight
    ``exp(skew * z_r)`` with ``z_r`` the standard-normal quantile at ``1 - (r + 0.5) / E``.
    ``skew = 0`` is uniform; ~0.3 gives a top-10% share of ~0.17 (DeepSeek-V2-Lite, Mixtral);
    ~1.5 gives ~0.57 (Llama-4, top-1). Which expert holds which rank is a random permutation
    per layer and per workload (see ``switch_every_seqs``).
temporal reuse (``reuse_prob``)
    Each of a token's k slots keeps the expert of the same slot of the previous token of the
    same sequence at the same layer with probability ``reuse_prob``; otherwise it is drawn
    fresh. (A slot's value is the fresh draw at its last refresh: a forward fill.)
cross-layer correlation (``cross_layer``)
    A fresh draw at layer l+1 is, with probability ``cross_layer``, the successor of the
    token's expert in the same slot at layer l, through a fixed map that sends the rank-r
    expert of layer l to the rank-r expert of layer l+1 (a random expert-to-expert map, since
    ranks are randomly assigned to experts); otherwise it is drawn from the popularity.
workload switches (``switch_every_seqs``)
    Every that many sequences the rank-to-expert assignment of every layer is drawn anew, so
    the hot experts change; 0 keeps one workload.
phases
    Each sequence has ``prompt_len`` prefill tokens, then ``steps`` decode tokens; the same
    process runs through both.
gates (``gate_alpha``, ``gate_sum``)
    Symmetric Dirichlet(``gate_alpha``) weights, sorted descending along the row, times
    ``gate_sum`` (1 for renormalised top-k routers; Qwen1.5-MoE logs raw softmax, ~0.25).

Duplicates inside a token are redrawn (carried slots keep priority). Everything is
vectorized over tokens, looping over layers only: 10M rows take seconds. All randomness
comes from the ``numpy.random.Generator`` passed in. Fitting the knobs to a real trace is
:mod:`traces.fit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from moebits.core.model_spec import ModelSpec
from moebits.traces.format import Phase, Trace, TraceMeta

SKEW_MAX = 16.0
_REPAIR_ROUNDS = 20


@dataclass
class SynthKnobs:
    """The generator's knobs; see the module docstring for what each does.

    ``skew`` holds one value per generated layer (``layers``, or all of the model's layers
    when ``layers`` is None); a single value is broadcast by :meth:`for_spec`.
    """

    skew: list[float]
    layers: list[int] | None = None
    reuse_prob: float = 0.25
    cross_layer: float = 0.25
    switch_every_seqs: int = 0
    gate_alpha: float = 1.0
    gate_sum: float = 1.0
    gates: bool = True

    def layer_ids(self, spec: ModelSpec) -> np.ndarray:
        """The MoE layers this generates, ascending."""
        return np.arange(spec.layers) if self.layers is None else np.asarray(self.layers, dtype=np.int64)

    def validate(self, spec: ModelSpec) -> None:
        """Raise ValueError naming the first bad knob."""
        layers = self.layer_ids(spec)
        if layers.size == 0 or (np.diff(layers) <= 0).any() or layers[0] < 0 or layers[-1] >= spec.layers:
            raise ValueError(f'"layers" must be ascending MoE layers of {spec.name} (0..{spec.layers - 1})')
        if len(self.skew) != layers.size:
            raise ValueError(f'"skew" has {len(self.skew)} values for {layers.size} generated layers')
        if not all(0.0 <= s <= SKEW_MAX for s in self.skew):
            raise ValueError(f'"skew" values must be in [0, {SKEW_MAX}]')
        for name in ("reuse_prob", "cross_layer"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f'"{name}" must be in [0, 1)')
        if self.switch_every_seqs < 0:
            raise ValueError('"switch_every_seqs" must be >= 0 (0 = never)')
        if self.gate_alpha <= 0 or self.gate_sum <= 0:
            raise ValueError('"gate_alpha" and "gate_sum" must be > 0')

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rounded(self, digits: int = 4) -> SynthKnobs:
        """A copy with the float knobs rounded (what a fit reports and uses)."""
        return dataclasses.replace(
            self,
            skew=[round(float(s), digits) for s in self.skew],
            reuse_prob=round(float(self.reuse_prob), digits),
            cross_layer=round(float(self.cross_layer), digits),
            gate_alpha=round(float(self.gate_alpha), digits),
            gate_sum=round(float(self.gate_sum), digits),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], spec: ModelSpec) -> SynthKnobs:
        """Parse knobs (e.g. a JSON file); unknown keys are an error; a scalar skew is broadcast."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown knob(s) {unknown}; known: {sorted(names)}")
        if "skew" not in data:
            raise ValueError('knobs need "skew" (one value, or one per generated layer)')
        knobs = cls(**{**data, "skew": [0.0]})
        knobs.skew = _broadcast(data["skew"], knobs.layer_ids(spec).size)
        knobs.validate(spec)
        return knobs

    @classmethod
    def for_spec(cls, spec: ModelSpec, skew: float = 0.3, **kw: Any) -> SynthKnobs:
        """Knobs with one skew for every layer of ``spec`` (or of ``layers=`` if given)."""
        knobs = cls(skew=[0.0], **kw)
        knobs.skew = _broadcast(skew, knobs.layer_ids(spec).size)
        knobs.validate(spec)
        return knobs


def _broadcast(skew: float | list[float], n: int) -> list[float]:
    if isinstance(skew, int | float):
        return [float(skew)] * n
    return [float(s) for s in skew]


@dataclass(frozen=True)
class Shape:
    """How many sequences, and prefill / decode tokens per sequence."""

    seqs: int
    prompt_len: int
    steps: int
    tokens_per_seq: int = field(init=False)

    def __post_init__(self) -> None:
        if self.seqs <= 0:
            raise ValueError('"seqs" must be > 0')
        if self.prompt_len < 0 or self.steps < 0 or self.prompt_len + self.steps <= 0:
            raise ValueError('"prompt_len" and "steps" must be >= 0 with at least one token per sequence')
        object.__setattr__(self, "tokens_per_seq", self.prompt_len + self.steps)

    @property
    def tokens(self) -> int:
        return self.seqs * self.tokens_per_seq


def normal_quantiles(experts: int) -> np.ndarray:
    """[E] standard-normal quantiles at 1 - (r + 0.5) / E, descending in rank r."""
    nd = NormalDist()
    return np.array([nd.inv_cdf(1.0 - (r + 0.5) / experts) for r in range(experts)])


def popularity(skew: np.ndarray, experts: int) -> np.ndarray:
    """[L, E] rank popularities (rows sum to 1) for per-layer ``skew`` [L]."""
    logw = np.asarray(skew, dtype=np.float64)[:, None] * normal_quantiles(experts)[None, :]
    w = np.exp(logw - logw.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)


def skew_for_top_share(share: np.ndarray, experts: int) -> np.ndarray:
    """Per-layer skew whose popularity gives the ceil(0.1 E) hottest ranks ``share`` [L]."""
    top = math.ceil(0.1 * experts)
    share = np.asarray(share, dtype=np.float64)
    lo, hi = np.zeros_like(share), np.full_like(share, SKEW_MAX)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        got = popularity(mid, experts)[:, :top].sum(axis=1)
        lo, hi = np.where(got < share, mid, lo), np.where(got < share, hi, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class AliasTable:
    """Walker's alias table: O(1) draws from a fixed discrete distribution."""

    prob: np.ndarray  # [E] float32 acceptance threshold of column i
    alias: np.ndarray  # [E] int16 the other outcome of column i

    @classmethod
    def build(cls, p: np.ndarray) -> AliasTable:
        n = p.size
        scaled = p.astype(np.float64) * n / p.sum()
        prob, alias = np.ones(n), np.arange(n)
        small = [i for i in range(n) if scaled[i] < 1.0]
        large = [i for i in range(n) if scaled[i] >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s], alias[s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        return cls(prob=prob.astype(np.float32), alias=alias.astype(np.int16))

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """int16 outcomes 0..E-1 of the given shape."""
        x = rng.random(shape, dtype=np.float32) * np.float32(self.prob.size)
        col = np.minimum(x.astype(np.int16), np.int16(self.prob.size - 1))
        return np.where(x - col < np.take(self.prob, col), col, np.take(self.alias, col))


def _dup_slots(ranks: np.ndarray, carried: np.ndarray) -> np.ndarray:
    """[n, k] bool: slots equal to a slot of higher priority (carried first, then slot order)."""
    k = ranks.shape[1]
    prio = (~carried) * k + np.arange(k)[None, :]
    eq = ranks[:, :, None] == ranks[:, None, :]
    return (eq & (prio[:, :, None] < prio[:, None, :])).any(axis=1)


def _rows_with_dups(ranks: np.ndarray) -> np.ndarray:
    k = ranks.shape[1]
    dup = np.zeros(ranks.shape[0], dtype=bool)
    for a in range(k):
        for b in range(a + 1, k):
            dup |= ranks[:, a] == ranks[:, b]
    return np.flatnonzero(dup)


def _gumbel_fill(ranks: np.ndarray, dup: np.ndarray, logw: np.ndarray, rng: np.random.Generator) -> None:
    """Exact fallback: fill dup slots by weighted sampling without replacement (Gumbel top-k)."""
    n, k = ranks.shape
    keys = logw[None, :] + rng.gumbel(size=(n, logw.size))
    rows = np.repeat(np.arange(n), k)
    keys[rows[~dup.ravel()], ranks[~dup].ravel()] = -np.inf
    order = np.argsort(-keys, axis=1)[:, :k]
    nth = np.cumsum(dup, axis=1) - 1
    ranks[dup] = order[np.nonzero(dup)[0], nth[dup]]


def repair_duplicates(
    ranks: np.ndarray, carried: np.ndarray, table: AliasTable, logw: np.ndarray, rng: np.random.Generator
) -> None:
    """Make every row of ``ranks`` [n, k] duplicate-free in place, redrawing the later copies."""
    rows = _rows_with_dups(ranks)
    car = carried[rows]
    for _ in range(_REPAIR_ROUNDS):
        if rows.size == 0:
            return
        sub = ranks[rows]
        dup = _dup_slots(sub, car)
        sub[dup] = table.draw((int(dup.sum()),), rng)
        ranks[rows] = sub
        car = car & ~dup
        still = _rows_with_dups(sub)
        rows, car = rows[still], car[still]
    if rows.size:
        sub = ranks[rows]
        _gumbel_fill(sub, _dup_slots(sub, car), logw, rng)
        ranks[rows] = sub


def _layer_ranks(
    table: AliasTable,
    logw: np.ndarray,
    prev: np.ndarray | None,
    first: np.ndarray,
    knobs: SynthKnobs,
    k: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """[T, k] popularity ranks of one layer; ``prev`` is the previous generated layer's ranks."""
    t = first.size
    fresh = table.draw((t, k), rng)
    if prev is not None and knobs.cross_layer > 0:
        follow = rng.random((t, k), dtype=np.float32) < knobs.cross_layer
        np.copyto(fresh, prev, where=follow)
    refresh = (rng.random((t, k), dtype=np.float32) >= knobs.reuse_prob) | first[:, None]
    src = np.maximum.accumulate(np.where(refresh, np.arange(t, dtype=np.int32)[:, None], 0), axis=0)
    ranks = np.take_along_axis(fresh, src, axis=0)
    repair_duplicates(ranks, ~refresh, table, logw, rng)
    return ranks


GATE_POOL_ROWS = 1 << 16


def _gates(n: int, k: int, knobs: SynthKnobs, rng: np.random.Generator) -> np.ndarray:
    """[n, k] gate rows: sorted Dirichlet draws (from a pool of GATE_POOL_ROWS, for speed)."""
    g = rng.gamma(knobs.gate_alpha, size=(min(n, GATE_POOL_ROWS), k))
    g /= np.maximum(g.sum(axis=1, keepdims=True), 1e-300)
    pool = (-np.sort(-g, axis=1) * knobs.gate_sum).astype(np.float16)
    return pool if n <= GATE_POOL_ROWS else pool[rng.integers(0, GATE_POOL_ROWS, n)]


def generate(
    spec: ModelSpec,
    knobs: SynthKnobs,
    shape: Shape,
    rng: np.random.Generator,
    provenance: dict[str, str] | None = None,
) -> Trace:
    """A synthetic trace of ``shape`` for ``spec`` (rows sorted by seq, step, layer)."""
    knobs.validate(spec)
    layers, e, k = knobs.layer_ids(spec), spec.experts, spec.top_k
    n_layers, t = layers.size, shape.tokens
    pop = popularity(np.asarray(knobs.skew), e)
    tables = [AliasTable.build(p) for p in pop]
    logw = np.log(np.maximum(pop, 1e-300))
    seq_of = np.repeat(np.arange(shape.seqs, dtype=np.int64), shape.tokens_per_seq)
    first = np.zeros(t, dtype=bool)
    first[:: shape.tokens_per_seq] = True
    epoch = seq_of // knobs.switch_every_seqs if knobs.switch_every_seqs else np.zeros(t, dtype=np.int64)
    n_epochs = int(epoch[-1]) + 1
    perm = np.argsort(rng.random((n_epochs, n_layers, e)), axis=2)  # rank -> expert
    expert = np.empty((t, n_layers, k), dtype=np.int16)
    ranks = None
    for x in range(n_layers):
        ranks = _layer_ranks(tables[x], logw[x], ranks, first, knobs, k, rng)
        expert[:, x, :] = np.take(perm[:, x, :], epoch[:, None] * e + ranks)
    step = np.tile(np.arange(shape.tokens_per_seq, dtype=np.int32), shape.seqs)
    phase = np.where(step < shape.prompt_len, Phase.PREFILL, Phase.DECODE).astype(np.uint8)
    meta = TraceMeta(spec=spec, provenance=dict(provenance or {}))
    return Trace(
        meta=meta,
        seq=np.repeat(seq_of.astype(np.int32), n_layers),
        step=np.repeat(step, n_layers),
        phase=np.repeat(phase, n_layers),
        layer=np.tile(layers.astype(np.uint16), t),
        expert=expert.reshape(t * n_layers, k),
        gate=_gates(t * n_layers, k, knobs, rng) if knobs.gates else None,
    )


DEFAULT_TRACE = Path(__file__).resolve().parent / "data" / "default.parquet"
"""The shipped default trace (Qwen3-30B-A3B-shaped; how it was made: traces/data/README.md)."""
