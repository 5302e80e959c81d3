"""Per-expert inputs of the seed policies, from a sensitivity table or a synthetic stand-in.

The seed policies rank experts by things measured offline on real weights and data:
quantization error per precision, the router row's l2 norm (and its change in training),
the maximum intra-neuron variance of the expert's weights, and activation frequency on
several datasets. :class:`ExpertStats` holds them as dense ``[layers, experts]`` arrays.
:func:`stats_for` gives a policy its stats: from the sensitivity table in the context
(``ctx.sensitivity``, a :class:`core.quality.SensitivityTable`, the one the run's quality
proxy uses) when there is one, else from :func:`synthetic_stats` seeded by ``ctx.rng``; the
profiling trace's routing, when the engine gives one, is added as dataset ``"profile"``.
:func:`profile_frequency`, :func:`profile_gate_mean` and :func:`profile_mean_gate` are the
per-expert statistics the policies take from a profiling trace.

Reading a table (:func:`stats_from_table`): errors come from
:meth:`~core.quality.SensitivityTable.error_array` (analytic default where a row is
missing); ``router_norm``, ``router_norm_change`` and ``max_intra_neuron_variance`` are
per-expert values repeated on each of its rows (the last non-empty one counts); per-dataset
frequency is one ``(dataset, frequency)`` pair per row, so a table carries several datasets
as repeated (layer, expert, precision) rows. Experts a column does not cover take the
column's mean; a column absent altogether is taken from the synthetic table (named in
``ExpertStats.synthetic``), except ``router_norm_change``, which stays None.

The synthetic table (:func:`synthetic_stats`, and :func:`synthetic_table` in the table
format, e.g. for an engine that wants its quality proxy to see the same numbers) is an
analytic guess, not a measurement. Its assumptions:

- error of expert e of layer l at precision p = ``sens_e * depth_l * analytic_error(p)``
  (:func:`core.quality.analytic_error`, the proxy's own default, so bf16 is 0);
- ``sens_e`` is lognormal (sigma 0.5) times ``sqrt(max_var_e / median)``: experts with an
  outlier neuron quantize worse; ``depth_l`` = 1.5 at the first and last layer, decaying to
  1 with the distance to the nearest end (``1 + 0.5 * exp(-d / 2)``);
- max intra-neuron variance is lognormal (sigma 0.6) with 3% outliers at 8x;
- the final router norm is lognormal (sigma 0.2); its change in training is unknown;
- each dataset's frequency (share of the layer's routed tokens, summing to 1 per layer) is
  a Zipf(0.8) popularity mixing a shared ranking (weight 0.6) with its own (0.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import PRECISIONS
from moebits.core.quality import SensitivityTable, analytic_error, read_sensitivity
from moebits.core.routing import LayerSteps

if TYPE_CHECKING:
    from moebits.policies.base import PolicyContext

SYNTHETIC_DATASETS = ("synthetic_a", "synthetic_b", "synthetic_c")


@dataclass
class ExpertStats:
    """Per-expert measurements, each ``[layers, experts]``; see the module docstring.

    ``error`` maps precision → quantization error (the quality proxy's unit);
    ``router_norm_change`` is None where no training history exists; ``frequency`` maps a
    dataset name → share of the layer's routed tokens per expert; ``synthetic`` names the
    fields that are synthetic stand-ins rather than measurements.
    """

    layers: int
    experts: int
    error: dict[str, np.ndarray]
    router_norm: np.ndarray
    max_variance: np.ndarray
    frequency: dict[str, np.ndarray] = field(default_factory=dict)
    router_norm_change: np.ndarray | None = None
    synthetic: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        shape = (self.layers, self.experts)
        arrays = {"router_norm": self.router_norm, "max_variance": self.max_variance}
        arrays.update({f"error[{p}]": a for p, a in self.error.items()})
        arrays.update({f"frequency[{d}]": a for d, a in self.frequency.items()})
        if self.router_norm_change is not None:
            arrays["router_norm_change"] = self.router_norm_change
        for name, a in arrays.items():
            if a.shape != shape:
                raise ValueError(f"expert stats: {name} has shape {a.shape}, expected {shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"expert stats: {name} holds NaN or infinite values")

    def error_of(self, precision: str, who: str) -> np.ndarray:
        """Errors at ``precision``, with a message naming the policy if the stats lack it."""
        try:
            return self.error[precision]
        except KeyError:
            raise ValueError(f"{who}: the sensitivity stats have no error for precision {precision!r}; "
                             f"they have {', '.join(self.error)}") from None

    def mean_frequency(self) -> np.ndarray:
        """Frequency averaged over datasets (uniform where there are none)."""
        if not self.frequency:
            return np.full((self.layers, self.experts), 1.0 / self.experts)
        return np.mean(np.stack(list(self.frequency.values())), axis=0)


def _zipf_shares(rank: np.ndarray) -> np.ndarray:
    w = (rank + 1.0) ** -0.8
    return w / w.sum()


def synthetic_frequency(layers: int, experts: int, datasets: list[str],
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-dataset routing shares: a shared Zipf ranking mixed with a per-dataset one."""
    shared = np.stack([_zipf_shares(rng.permutation(experts)) for _ in range(layers)])
    out = {}
    for d in datasets:
        own = np.stack([_zipf_shares(rng.permutation(experts)) for _ in range(layers)])
        out[d] = 0.6 * shared + 0.4 * own
    return out


def synthetic_stats(layers: int, experts: int, precisions: list[str], rng: np.random.Generator,
                    datasets: tuple[str, ...] = SYNTHETIC_DATASETS, row_len: int = 2048) -> ExpertStats:
    """A plausible, seeded sensitivity table; the module docstring lists its assumptions."""
    shape = (layers, experts)
    max_var = rng.lognormal(0.0, 0.6, shape) * np.where(rng.random(shape) < 0.03, 8.0, 1.0)
    sens = rng.lognormal(0.0, 0.5, shape) * np.sqrt(max_var / np.median(max_var))
    edge = np.minimum(np.arange(layers), np.arange(layers)[::-1])
    base = sens * (1.0 + 0.5 * np.exp(-edge / 2.0))[:, None]
    error = {p: base * analytic_error(p, row_len) for p in dict.fromkeys(precisions)}
    return ExpertStats(
        layers=layers, experts=experts, error=error,
        router_norm=rng.lognormal(0.0, 0.2, shape), max_variance=max_var,
        frequency=synthetic_frequency(layers, experts, list(datasets), rng),
        synthetic={"error", "router_norm", "max_variance", "frequency"},
    )


def synthetic_table(layers: int, experts: int, precisions: list[str], rng: np.random.Generator,
                    row_len: int = 2048) -> SensitivityTable:
    """:func:`synthetic_stats` in the sensitivity-table format (one row per layer, expert,
    precision and dataset)."""
    st = synthetic_stats(layers, experts, precisions, rng, row_len=row_len)
    precs, names = list(st.error), list(st.frequency)
    L, E, P, D = layers, experts, len(precs), len(names)
    grid = np.indices((L, E, P, D)).reshape(4, -1)  # rows in (layer, expert, precision, dataset) order
    l_, e_, p_, d_ = grid
    err = np.stack([st.error[p] for p in precs], axis=-1)  # [L, E, P]
    freq = np.stack([st.frequency[d] for d in names], axis=-1)  # [L, E, D]
    return SensitivityTable(
        layer=l_, expert=e_, precision=[precs[i] for i in p_.tolist()], error=err[l_, e_, p_],
        extra={"router_norm": st.router_norm[l_, e_].tolist(),
               "max_intra_neuron_variance": st.max_variance[l_, e_].tolist(),
               "dataset": [names[i] for i in d_.tolist()], "frequency": freq[l_, e_, d_].tolist()},
    )


def run_table(quality_table: str | None, spec: ModelSpec, seed: int) -> tuple[SensitivityTable | None, str]:
    """The sensitivity table of one run (sim or runtime) and how its summary names it.

    ``"analytic"``: none (the proxy's analytic per-precision errors); a path: that file;
    empty: a synthetic table seeded by the run's seed, shared by the policy and the proxy."""
    if quality_table == "analytic":
        return None, "analytic"
    if quality_table:
        return read_sensitivity(quality_table), quality_table
    table = synthetic_table(spec.layers, spec.experts, list(PRECISIONS), np.random.default_rng(seed),
                            row_len=spec.hidden)
    return table, f"synthetic(seed={seed})"


def _column(table: SensitivityTable, name: str, layers: int, experts: int) -> np.ndarray | None:
    """A per-expert column as ``[L, E]`` (last non-empty value per expert; gaps take the mean)."""
    values = table.extra.get(name)
    if values is None:
        return None
    out = np.full((layers, experts), np.nan)
    for layer, expert, v in zip(table.layer.tolist(), table.expert.tolist(), values, strict=True):
        if v is not None and v != "":
            out[layer, expert] = float(v)
    if np.isnan(out).all():
        return None
    return np.where(np.isnan(out), np.nanmean(out), out)


def _datasets(table: SensitivityTable, layers: int, experts: int) -> dict[str, np.ndarray]:
    names, values = table.extra.get("dataset"), table.extra.get("frequency")
    if values is None:
        return {}
    names = names if names is not None else [""] * len(values)
    out: dict[str, np.ndarray] = {}
    for layer, expert, d, v in zip(table.layer.tolist(), table.expert.tolist(), names, values, strict=True):
        if v is not None and v != "":
            out.setdefault(str(d or "table"), np.zeros((layers, experts)))[layer, expert] = float(v)
    return out


def stats_from_table(table: SensitivityTable, layers: int, experts: int, precisions: list[str],
                     rng: np.random.Generator, row_len: int = 2048) -> ExpertStats:
    """Dense stats from a sensitivity table (see the module docstring for the gaps)."""
    err = table.error_array(layers, experts, list(dict.fromkeys(precisions)), row_len)
    error = {p: err[:, :, i] for i, p in enumerate(dict.fromkeys(precisions))}
    fill = synthetic_stats(layers, experts, precisions, rng, row_len=row_len)
    norm = _column(table, "router_norm", layers, experts)
    var = _column(table, "max_intra_neuron_variance", layers, experts)
    freq = _datasets(table, layers, experts)
    synthetic = {n for n, a in (("router_norm", norm), ("max_variance", var)) if a is None}
    if not freq:
        synthetic.add("frequency")
    return ExpertStats(
        layers=layers, experts=experts, error=error,
        router_norm=fill.router_norm if norm is None else norm,
        max_variance=fill.max_variance if var is None else var,
        frequency=freq or fill.frequency,
        router_norm_change=_column(table, "router_norm_change", layers, experts),
        synthetic=synthetic,
    )


def profile_frequency(profile: LayerSteps, layers: int, experts: int) -> np.ndarray:
    """Share of each layer's routed tokens per expert in a profiling trace: ``[L, E]``."""
    counts = profile.counts(layers, experts).astype(np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def _per_expert(profile: LayerSteps, layers: int, experts: int, weights: np.ndarray) -> np.ndarray:
    """``weights`` (one per routed entry) summed per (layer, expert): ``[L, E]``."""
    lay = np.repeat(profile.ls_layer.astype(np.int64), np.diff(profile.offsets))
    flat = lay * experts + profile.ex_expert.astype(np.int64)
    return np.bincount(flat, weights=weights, minlength=layers * experts).reshape(layers, experts)


def profile_gate_mean(profile: LayerSteps, layers: int, experts: int) -> np.ndarray:
    """Summed gate weight per layer step of each (layer, expert), averaged over the
    profile's steps of that layer: ``[L, E]`` (a hotness EMA's long-run value)."""
    mass = _per_expert(profile, layers, experts, profile.ex_gate)
    steps = np.bincount(profile.ls_layer.astype(np.int64), minlength=layers)
    return mass / np.maximum(steps, 1)[:, None]


def profile_mean_gate(profile: LayerSteps, layers: int, experts: int) -> np.ndarray:
    """Gate weight per routed token of each (layer, expert) in a profile: ``[L, E]``."""
    gate = _per_expert(profile, layers, experts, profile.ex_gate)
    tokens = _per_expert(profile, layers, experts, profile.ex_tokens)
    return gate / np.maximum(tokens, 1)


def stats_for(ctx: PolicyContext, precisions: list[str]) -> ExpertStats:
    """The stats a policy works from (see the module docstring)."""
    spec = ctx.spec
    if ctx.sensitivity is not None:
        stats = stats_from_table(ctx.sensitivity, spec.layers, spec.experts, precisions, ctx.rng, spec.hidden)
    else:
        stats = synthetic_stats(spec.layers, spec.experts, precisions, ctx.rng, row_len=spec.hidden)
    if ctx.profile is not None:
        stats.frequency["profile"] = profile_frequency(ctx.profile, spec.layers, spec.experts)
    return stats
