"""Fit :class:`~traces.synth.SynthKnobs` to a real trace's statistics.

Targets (from :func:`traces.stats.compute_stats` on the real trace's dominant phase): the
top-10% share of every layer, the overall reuse, the overall next-layer predictability and,
where the trace has gates, the gate entropy and mean gate sum.

The fit is a calibrated fixed-point search on generated samples. Start from the analytic
guesses (the skew whose log-normal popularity has the target top-10% share; the reuse
probability that gives the target reuse if fresh draws were uniform), then repeat: generate
a sample of the output's shape, measure it, and move each knob by its target's error (the
per-layer top-10% target fed to the analytic inversion, ``reuse_prob``, ``cross_layer``).
The best sample's knobs win. Gate knobs are set analytically (the expected entropy of a
symmetric Dirichlet is digamma(k a + 1) - digamma(a + 1)).

When the real trace is of another model, per-layer targets are interpolated by relative
depth onto the target model's layers; shares, reuse and predictability transfer as raw values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from moebits.core.model_spec import ModelSpec
from moebits.traces.format import Phase, Trace
from moebits.traces.stats import TraceStats, compute_stats, dominant_phase, select_phase
from moebits.traces.synth import Shape, SynthKnobs, generate, skew_for_top_share

REUSE_MAX = 0.98


@dataclass(frozen=True)
class FitTargets:
    """What a fit aims at, per generated layer (``top10``) and overall."""

    layers: list[int]
    top10: list[float]
    reuse: float | None
    predictability: float | None
    gate_entropy: float | None
    gate_sum: float | None
    source: str = ""


@dataclass
class FitResult:
    """The fitted knobs, the targets, and what the best calibration sample measured."""

    knobs: SynthKnobs
    targets: FitTargets
    measured: TraceStats
    iterations: int

    def summary(self) -> dict[str, object]:
        """Target vs fitted-sample values of the overall statistics (JSON-able)."""
        m, t = self.measured.overall, self.targets
        return {
            "source": t.source,
            "top10_share": {"target": float(np.mean(t.top10)), "fitted": _layer_mean(self.measured)},
            "reuse": {"target": t.reuse, "fitted": m.reuse},
            "next_layer_predictability": {"target": t.predictability, "fitted": m.next_layer_predictability},
            "gate_entropy": {"target": t.gate_entropy, "fitted": m.gate_entropy},
            "iterations": self.iterations,
        }


def _layer_mean(st: TraceStats) -> float:
    return float(np.mean([r.top10_share for r in st.layers]))


def targets_from_trace(real: Trace, spec: ModelSpec, phase: Phase | None = None) -> FitTargets:
    """Fit targets for ``spec`` from ``real`` (its dominant phase unless ``phase`` is given).

    Same model: the layers present in ``real``. Another model: all of ``spec``'s layers, with
    per-layer targets interpolated by relative depth.
    """
    phase = dominant_phase(real) if phase is None else phase
    st = compute_stats(real, phase)
    src_layers = np.array([r.layer for r in st.layers], dtype=np.float64)
    src_top10 = np.array([r.top10_share for r in st.layers])
    if real.spec.name == spec.name:
        layers, top10 = src_layers.astype(np.int64), src_top10
    else:
        layers = np.arange(spec.layers)
        rel_src = src_layers / max(real.spec.layers - 1, 1)
        top10 = np.interp(layers / max(spec.layers - 1, 1), rel_src, src_top10)
    gates = select_phase(real, phase).gate
    gate_sum = None if gates is None else float(gates.astype(np.float64).sum(axis=1).mean())
    return FitTargets(
        layers=[int(x) for x in layers],
        top10=[float(x) for x in top10],
        reuse=st.overall.reuse,
        predictability=st.overall.next_layer_predictability if layers.size > 1 else None,
        gate_entropy=st.overall.gate_entropy,
        gate_sum=gate_sum,
        source=f"{real.spec.name} ({phase.name.lower()}, {st.tokens} tokens)",
    )


def shape_like(real: Trace, phase: Phase | None = None, max_rows: int | None = None) -> Shape:
    """A synthetic shape with ``real``'s sequences and mean tokens per sequence in ``phase``
    (its dominant phase by default), all of them in that phase; with ``max_rows``, fewer
    sequences so that it has at most about that many rows."""
    phase = dominant_phase(real) if phase is None else phase
    keep = real.phase == phase
    seqs = max(1, int(np.unique(real.seq[keep]).size))
    per = max(1, round(real.tokens(phase) / seqs))
    if max_rows is not None:
        layers = int(np.unique(real.layer).size)
        seqs = max(1, min(seqs, max_rows // (per * layers)))
    return Shape(seqs, per if phase == Phase.PREFILL else 0, per if phase == Phase.DECODE else 0)


def digamma(x: float) -> float:
    """The digamma function for x > 0 (recurrence, then the asymptotic series)."""
    out = 0.0
    while x < 10.0:
        out -= 1.0 / x
        x += 1.0
    inv2 = 1.0 / (x * x)
    return out + math.log(x) - 0.5 / x - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252))


def dirichlet_entropy(alpha: float, k: int) -> float:
    """Expected entropy (nats) of a symmetric Dirichlet(alpha) draw of size k."""
    return digamma(k * alpha + 1.0) - digamma(alpha + 1.0)


def gate_alpha_for_entropy(entropy: float, k: int) -> float:
    """The Dirichlet concentration whose expected entropy is ``entropy`` (bisection in log a)."""
    if k < 2:
        return 1.0
    lo, hi = math.log(1e-3), math.log(1e3)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if dirichlet_entropy(math.exp(mid), k) < entropy else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def _initial_knobs(t: FitTargets, spec: ModelSpec) -> SynthKnobs:
    chance = spec.top_k / spec.experts
    reuse = 0.0 if t.reuse is None else (t.reuse - chance) / (1.0 - chance)
    knobs = SynthKnobs(
        skew=skew_for_top_share(np.array(t.top10), spec.experts).tolist(),
        layers=list(t.layers),
        reuse_prob=float(np.clip(reuse, 0.0, REUSE_MAX)),
        cross_layer=0.2 if t.predictability is not None else 0.0,
    )
    if t.gate_entropy is not None:
        knobs.gate_alpha = gate_alpha_for_entropy(t.gate_entropy, spec.top_k)
    if t.gate_sum is not None and t.gate_sum > 0:
        knobs.gate_sum = t.gate_sum
    return knobs


def _loss(st: TraceStats, t: FitTargets) -> float:
    top = np.array([r.top10_share for r in st.layers])
    err = [abs(float(np.mean(top)) / float(np.mean(t.top10)) - 1.0)]
    if t.reuse:
        err.append(abs((st.overall.reuse or 0.0) / t.reuse - 1.0))
    if t.predictability:
        err.append(abs((st.overall.next_layer_predictability or 0.0) / t.predictability - 1.0))
    return max(err)


def _step(knobs: SynthKnobs, top_in: np.ndarray, st: TraceStats, t: FitTargets, spec: ModelSpec) -> np.ndarray:
    """Move the knobs by the sample's errors; returns the new top-10% inversion targets."""
    chance = spec.top_k / spec.experts
    floor = math.ceil(0.1 * spec.experts) / spec.experts
    measured = np.array([r.top10_share for r in st.layers])
    top_in = np.clip(top_in + (np.array(t.top10) - measured), floor + 1e-6, 1.0 - 1e-9)
    knobs.skew = skew_for_top_share(top_in, spec.experts).tolist()
    if t.reuse is not None and st.overall.reuse is not None:
        step = (t.reuse - st.overall.reuse) / (1.0 - chance)
        knobs.reuse_prob = float(np.clip(knobs.reuse_prob + step, 0.0, REUSE_MAX))
    if t.predictability is not None and st.overall.next_layer_predictability is not None:
        step = (t.predictability - st.overall.next_layer_predictability) / (1.0 - chance)
        knobs.cross_layer = float(np.clip(knobs.cross_layer + step, 0.0, REUSE_MAX))
    return top_in


def fit_knobs(
    targets: FitTargets, spec: ModelSpec, shape: Shape, rng: np.random.Generator, iterations: int = 6
) -> FitResult:
    """Calibrate knobs on ``iterations`` generated samples of ``shape``; keep the best one."""
    knobs = _initial_knobs(targets, spec).rounded()
    top_in = np.array(targets.top10)
    best: tuple[float, SynthKnobs, TraceStats] | None = None
    for _ in range(iterations):
        st = compute_stats(generate(spec, knobs, shape, rng))
        loss = _loss(st, targets)
        if best is None or loss < best[0]:
            best = (loss, knobs, st)
        knobs = dataclasses.replace(knobs, skew=list(knobs.skew))  # best keeps its own copy
        top_in = _step(knobs, top_in, st, targets, spec)
        knobs = knobs.rounded()
    assert best is not None
    return FitResult(knobs=best[1], targets=targets, measured=best[2], iterations=iterations)
