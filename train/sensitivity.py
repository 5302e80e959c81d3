"""Measured sensitivity tables of the trained model, in core's table format (:mod:`core.quality`).

Dimension legend: L MoE layers, E experts, V weight variants, T tokens.

From one text split (CALIBRATION for the table policies read, EVALUATION for the table that
grades a run; never mixed), on ``windows`` windows of ``seq_len`` bytes per kind (code, prose),
with the routing of the bf16 model held fixed (:mod:`train.serve`):

- ``output_error`` (measured): relative error ``||Y_p - Y|| / ||Y||`` of the expert's output on
  the tokens routed to it, its weights through the runtime's quantizer for ``p``;
- ``kl_measured`` (measured, on a seeded sample of (layer, expert, precision) rows; empty
  elsewhere): mean next-byte KL(bf16 || perturbed) in nats over the split's tokens when only
  that expert of that layer is served at ``p``;
- ``kl_estimate`` (a validated estimate, every row): ``s_l * sum_t g_t^2 ||y_p,t - y_t||^2 / T``,
  the second-order term of the KL in the expert's gate-weighted output perturbation with one
  isotropic curvature ``s_l`` per layer, fitted by least squares on half of the measured sample;
  the other half validates it (Spearman and median |log ratio| go into the table's JSON);
- ``error`` (what the quality proxy sums per routed token and gate): ``kl_estimate x T / G``,
  with ``G`` the gate weight routed to the expert on the split, so that the proxy of a run,
  times the layers, estimates its mean KL per token in nats (additive across experts); experts
  never routed take their layer's median; bf16 is 0;
- ``frequency`` per ``dataset`` (code, prose): share of the layer's routed (token, slot) pairs;
- ``router_norm``, ``router_norm_change`` (``|norm at the end - norm at init|`` of the router row,
  from the training record), ``max_intra_neuron_variance`` (the largest variance of one neuron's
  weights: a row of gate_up or of down).

DynaMo's channel mix (``int2`` plus the 10% most significant intermediate channels at
``int8``) is measured too: its ``significance_share`` (the share of the int2 -> int8 error
reduction those channels carry) is reported per expert in the JSON beside the table, so the
policy can be configured with the measured value instead of a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moebits.core.precision import ChannelMix, register_channel_mix
from moebits.core.quality import SensitivityTable, write_sensitivity
from moebits.runtime.hf import expert_weights, experts_modules, kl_divergence
from moebits.train import serve
from moebits.train.corpus import KINDS
from moebits.train.loop import router_norms
from tqdm import tqdm

PRECISIONS = ("fp8", "int8", "int4", "int3", "int2")
DYNAMO_MIX = ChannelMix("int2", "int8", 0.1, 0.5)  # DynaMo's defaults; the share here is a placeholder name part


@dataclass(frozen=True)
class TableRequest:
    """How a table is measured (see the module docstring)."""

    split: str                  # "calibration" or "evaluation"
    windows: int = 4            # per kind
    seq_len: int = 256
    kl_samples: int = 64        # measured (layer, expert, precision) rows; half fit, half validate
    seed: int = 0


def windows(data: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` token windows evenly spaced over ``data``."""
    if len(data) < n * seq_len:
        raise ValueError(f"the split has {len(data)} bytes, fewer than {n} windows of {seq_len}")
    starts = np.linspace(0, len(data) - seq_len, n).astype(np.int64)
    return torch.from_numpy(np.stack([data[s : s + seq_len] for s in starts]).astype(np.int64))


def reference(model: Any, tokens: torch.Tensor, mix: ChannelMix) -> tuple[serve.Served, torch.Tensor]:
    """Install the measurement experts with every variant, run the bf16 forward (captured) and
    force its routing on later forwards; returns the context and the reference logits ``[B, S, V]``."""
    plain = serve.build_variants(model, ["bf16"])
    served = serve.Served(plain, capture=True)
    serve.install(model, served)
    ref = serve.logits(model, tokens, served)
    captured = served.captured
    sig = serve.channel_significance(captured, plain)
    names = ["bf16", *PRECISIONS, register_channel_mix(mix)]
    served = serve.Served(serve.build_variants(model, names, sig), forced=[(i, w) for _, i, w in captured])
    serve.install(model, served)
    served.captured = captured
    return served, ref


def output_errors(served: serve.Served, captured: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(relative output error ``[L, E, V]``, gate-weighted squared error energy ``[L, E, V]``,
    routed gate mass ``[L, E]``) on the captured tokens."""
    v = len(served.variants.names)
    L, E = len(captured), served.variants.gate_up[0].shape[1]
    rel, energy, mass = np.zeros((L, E, v)), np.zeros((L, E, v)), np.zeros((L, E))
    for layer, (x, ids, w) in enumerate(captured):
        gu, dn = served.variants.gate_up[layer], served.variants.down[layer]
        for e in range(E):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if len(tok) == 0:
                continue
            g = w[tok, slot]
            mass[layer, e] = float(g.sum())
            ys = []
            for i in range(v):
                a, b = F.linear(x[tok], gu[i, e]).chunk(2, dim=-1)
                ys.append(F.linear(F.silu(a) * b, dn[i, e]))                   # [n, H]
            ref = ys[0]
            for i in range(v):
                d = ys[i] - ref
                rel[layer, e, i] = float(d.norm() / ref.norm().clamp_min(1e-12))
                energy[layer, e, i] = float(((g[:, None] * d) ** 2).sum())
    return rel, energy, mass


def measure_kl(model: Any, tokens: torch.Tensor, served: serve.Served, ref: torch.Tensor,
               rows: list[tuple[int, int, int]], progress: bool) -> np.ndarray:
    """Mean KL per token when only expert ``e`` of layer ``l`` is served at variant ``v``, per row."""
    out = []
    forced = served.forced or []
    for layer, e, v in tqdm(rows, desc="KL samples", disable=not progress):
        served.assign = [torch.zeros_like(i) for i, _ in forced]
        served.assign[layer] = torch.where(forced[layer][0] == e, v, 0)
        out.append(float(kl_divergence(ref, serve.logits(model, tokens, served)).mean()))
    served.assign = None
    return np.asarray(out)


def fit_curvature(energy: np.ndarray, kl: np.ndarray, layers: np.ndarray, n_layers: int) -> np.ndarray:
    """Per-layer ``s_l`` of ``kl ~ s_l * energy`` (least squares through 0; layers without
    samples take the pooled fit)."""
    pooled = float((energy * kl).sum() / max((energy**2).sum(), 1e-30))
    s = np.full(n_layers, pooled)
    for layer in range(n_layers):
        m = layers == layer
        if m.sum() >= 2:
            s[layer] = float((energy[m] * kl[m]).sum() / max((energy[m] ** 2).sum(), 1e-30))
    return s


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    return float(pd.Series(np.asarray(a, dtype=float)).rank().corr(pd.Series(np.asarray(b, dtype=float)).rank()))


def intra_neuron_variance(model: Any) -> np.ndarray:
    """Largest variance of one neuron's weights per expert: ``[L, E]``."""
    out = []
    for mod in experts_modules(model):
        gu, dn = (t.float() for t in expert_weights(mod))
        out.append(torch.maximum(gu.var(dim=2).amax(1), dn.var(dim=2).amax(1)).numpy())
    return np.stack(out).astype(np.float64)


def router_change(training: dict[str, Any] | None, n_layers: int, n_experts: int) -> np.ndarray | None:
    """``|final - initial|`` router-row norm per expert from a training record, or None."""
    if not training:
        return None
    norms = np.asarray(training["records"]["moe"]["router_norms"], dtype=np.float64)  # [R, L, E]
    if norms.shape[1:] != (n_layers, n_experts):
        raise ValueError(f"the training record's router norms have shape {norms.shape[1:]}, "
                         f"the model {n_layers} x {n_experts}")
    return np.abs(norms[-1] - norms[0])


def sample_rows(L: int, E: int, v: int, n: int, mass: np.ndarray, seed: int) -> list[tuple[int, int, int]]:
    """``n`` distinct (layer, expert, variant) rows among routed experts and non-bf16 variants, seeded."""
    rng = np.random.default_rng(seed)
    pool = [(la, e, i) for la in range(L) for e in range(E) for i in range(1, v) if mass[la, e] > 0]
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(pick)]


def measure(model: Any, splits: dict[str, np.ndarray], req: TableRequest, training: dict[str, Any] | None = None,
            progress: bool = True) -> tuple[SensitivityTable, dict[str, Any]]:
    """The table of one split (``splits`` maps kind -> bytes) and its JSON report."""
    torch.manual_seed(req.seed)
    parts = [windows(splits[k], req.windows, req.seq_len) for k in KINDS]
    tokens = torch.cat(parts)                                                    # [B, S]
    served, ref = reference(model, tokens, DYNAMO_MIX)
    captured = served.captured
    rel, energy, mass = output_errors(served, captured)
    L, E, V = energy.shape
    t = tokens.numel()
    rows = sample_rows(L, E, V, req.kl_samples, mass, req.seed)
    kl = measure_kl(model, tokens, served, ref, rows, progress)
    lay = np.array([r[0] for r in rows])
    en = np.array([energy[r] for r in rows]) / t
    fit, val = np.arange(len(rows)) % 2 == 0, np.arange(len(rows)) % 2 == 1
    s = fit_curvature(en[fit], kl[fit], lay[fit], L)
    kl_est = s[:, None, None] * energy / t                                        # [L, E, V]
    est = kl_est[tuple(np.array(rows).T)]
    report = {
        "split": req.split, "tokens": t, "kinds": list(KINDS), "windows_per_kind": req.windows,
        "seq_len": req.seq_len, "variants": served.variants.names, "curvature_per_layer": s.tolist(),
        "kl_samples": len(rows),
        "validation": {"rows": int(val.sum()), "spearman": spearman(est[val], kl[val]),
                       "median_abs_log_ratio": float(np.median(np.abs(np.log(np.maximum(est[val], 1e-12)
                                                                              / np.maximum(kl[val], 1e-12)))))},
        "dynamo_mix": _mix_report(rel, served.variants.names),
    }
    table = _table(model, served.variants.names, rel, kl_est, mass, t, rows, kl, captured, E, training)
    return table, report


def _mix_report(rel: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Measured significance share of DynaMo's mix: (err_low - err_mix) / (err_low - err_high)."""
    lo, hi, mx = names.index(DYNAMO_MIX.low), names.index(DYNAMO_MIX.high), len(names) - 1
    gap = rel[:, :, lo] - rel[:, :, hi]
    share = np.where(gap > 0, (rel[:, :, lo] - rel[:, :, mx]) / np.maximum(gap, 1e-12), np.nan)
    return {"low": DYNAMO_MIX.low, "high": DYNAMO_MIX.high, "fraction": DYNAMO_MIX.fraction,
            "significance_share_median": float(np.nanmedian(share)),
            "significance_share_p10_p90": [float(np.nanpercentile(share, 10)), float(np.nanpercentile(share, 90))]}


def _table(model: Any, names: list[str], rel: np.ndarray, kl_est: np.ndarray, mass: np.ndarray, t: int,
           rows: list[tuple[int, int, int]], kl: np.ndarray, captured: list, E: int,
           training: dict[str, Any] | None) -> SensitivityTable:
    L = len(captured)
    precs = ["bf16", *PRECISIONS]                               # the mix is not a table precision
    err = np.where(mass[:, :, None] > 0, kl_est[:, :, : len(precs)] * t / np.maximum(mass, 1e-12)[:, :, None], np.nan)
    for layer in range(L):                                       # never routed: the layer's median
        med = np.nanmedian(err[layer], axis=0)
        err[layer] = np.where(np.isnan(err[layer]), med, err[layer])
    err[:, :, 0] = 0.0
    measured = np.full(kl_est.shape, np.nan)
    for (la, e, v), k in zip(rows, kl, strict=True):
        measured[la, e, v] = k
    freq = _frequency(captured, E)
    norm = router_norms(model)
    change = router_change(training, L, E)
    var = intra_neuron_variance(model)
    cols: dict[str, list] = {k: [] for k in ("layer", "expert", "precision", "error", "dataset", "frequency",
                                              "output_error", "kl_estimate", "kl_measured", "router_norm",
                                              "router_norm_change", "max_intra_neuron_variance")}
    for la in range(L):
        for e in range(E):
            for i, p in enumerate(precs):
                for d, kind in enumerate(KINDS):
                    vals: tuple[Any, ...] = (la, e, p, float(err[la, e, i]), kind, float(freq[d][la, e]), float(rel[la, e, i]),
                            float(kl_est[la, e, i]), _blank(measured[la, e, i]), float(norm[la, e]),
                            None if change is None else float(change[la, e]), float(var[la, e]))
                    for name, v in zip(cols, vals, strict=True):
                        cols[name].append(v)
    return SensitivityTable(layer=np.asarray(cols.pop("layer")), expert=np.asarray(cols.pop("expert")),
                            precision=cols.pop("precision"), error=np.asarray(cols.pop("error")), extra=cols)


def _blank(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _frequency(captured: list, E: int) -> list[np.ndarray]:
    """Per kind, share of each layer's routed (token, slot) pairs per expert: ``[L, E]`` each.
    The captured tokens are the kinds' windows one after the other, in :data:`KINDS` order."""
    out = []
    for d in range(len(KINDS)):
        per = []
        for _, ids, _ in captured:
            n = ids.shape[0] // len(KINDS)
            c = torch.bincount(ids[d * n : (d + 1) * n].reshape(-1), minlength=E).double().numpy()
            per.append(c / max(c.sum(), 1.0))
        out.append(np.stack(per))
    return out


def write(table: SensitivityTable, report: dict[str, Any], path: Path) -> Path:
    """The table (``.parquet`` or ``.csv``) and its report beside it (``.json``)."""
    write_sensitivity(table, path)
    path.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return path
