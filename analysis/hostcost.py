"""The graph path's host-side costs, fitted to measured synthetic runs (no trace).

What the host adds to a graph-captured run, which the whole-pass designs (:mod:`runtime.pass_designs`)
cannot see, fitted in this order from the runs ``moebits analysis validate`` measured on a synthetic
workload (``benchmarks/graph_cases_calibration.txt``, cases named ``cal_*``: other cases in the folder are
ignored; each run's host log,
:class:`runtime.host_log.HostLog`, is kept in its ``CASE.measured.npz``):

1. ``HostCosts.observe_s`` per policy: least squares of the seconds of every ``Driver.observe`` call
   on ``[1, experts of the observed layer step]`` (every run of that policy, any seam);
2. ``HostCosts.pass_s``, ``pass_own_s`` and ``copy_s``: least squares of each per-pass-seam pass's host work
   (its host seconds less waiting and observing; the first two passes left out: warm-up) on
   ``[1, one indicator per non-static policy, copies issued, copies issued one boundary earlier]`` (a copy's
   bookkeeping when it lands): ``pass_s`` a static policy's pass, ``pass_own_s`` each other policy's extra
   boundary work (one pass cost for all made a static policy's host 1.5x too slow, session 8);
   ``copy_s`` = both slopes, charged at issue; ``layer_copy_s``: on the per-layer seam, each pass's ``issue``
   section on ``[layer steps, layer steps that issued copies, copies]`` (a step's copies share one issue); ``stage_s``: the per-layer runs' ``stage`` section per expert
   streamed through a staging slab; ``layer_s`` per policy: its per-layer runs' host work per layer step outside
   waiting, observing and copying (miss rule, records, launches) on ``[1, distinct experts]``, less the static
   policies' line;
3. ``pass_io_s``: the pass's own copies outside its graph (inputs up, routing down): measured directly, the
   median over the decode passes of static policies on whole-step graphs (device-bound: the host runs ahead) of
   each pass's latency less its graph's device time (``RunResult.busy_s``, CUDA events around the graph). Runs
   measured before pass device times: a static whole-step run's measured median TPOT less the simulated one
   (which also takes in the graph table's error on that run: 18.5 us where the direct measurement gives ~25 us,
   docs/FIDELITY.md session 8);
4. ``layer_sync_s`` and ``HostCosts.entry_s``: from static policies on per-layer graphs (no
   observation, no copy), the measured TPOT less the simulated one without them, per decode layer
   step, against the mean experts of a decode step (two batch sizes: both; one: ``entry_s`` = 0);
5. ``stall_sync_s``: from a demand-fetch cache on per-layer graphs, the decode time left over once
   everything above is in, per waiting decode layer step.

Steps 3 to 5 grade runs offline through :func:`analysis.fidelity.resimulate_case`.

Host speed: every run carries the runtime's host probe (:func:`runtime.host_log.host_probe_s`, before and
after its timed loop). The costs are fitted at the median probe of the calibration runs
(``HostCosts.probe_s``): each run's host seconds are scaled by that probe over its own first, and the runs
re-simulated in steps 3 to 5 are priced at their own speed (:meth:`core.hardware.HardwareProfile.at_host_speed`).
Runs measured before the probe existed are fitted as measured (``probe_s`` 0: never rescaled). Host work
does not follow the probe one for one (driver calls and syncs do not speed up with the CPU): the fit is
repeated at several exponents (``HostCosts.speed_exponent``: cost ~ probe ** exponent) and the one that grades
the calibration runs best is kept (``fit["cal_p50_err"]``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
from moebits.analysis.fidelity import CALIBRATION_PREFIX, resimulate_case
from moebits.core.hardware import HardwareProfile, HostCosts
from moebits.drive.records import RunResult, load_run, pass_table, summarize

WARMUP_PASSES = 2


@dataclasses.dataclass(frozen=True)
class HostRun:
    """One measured calibration run: its case file, arrays, policy and runtime path."""

    case: Path
    run: RunResult
    policy: str
    seam: str   # "per-pass" or "per-layer"
    to_ref: float = 1.0   # the run's host seconds times this: at the calibration's reference speed


def host_runs(measured: Path, prefix: str = CALIBRATION_PREFIX, exponent: float = 1.0) -> list[HostRun]:
    """Every measured case of ``measured`` named ``prefix``* that carries a host log (the calibration
    cases: validation cases in the same folder are never fitted to)."""
    out = []
    for case in sorted(measured.glob(f"{prefix}*.case.json")):
        run = load_run(case.with_name(case.name.removesuffix(".case.json") + ".measured.npz"))
        if not run.host:
            continue
        info = run.info.get("summary", run.info)
        out.append(HostRun(case, run, str(info.get("policy", "")), str(info.get("observe", ""))))
    ref = reference_probe_s(out)
    return [dataclasses.replace(r, to_ref=(ref / p) ** exponent) if ref and (p := r.run.host_probe_s()) else r
            for r in out]


def reference_probe_s(runs: list[HostRun]) -> float:
    """The median host probe of ``runs`` (seconds): the speed their costs are fitted at; 0 when any run
    has no probe (measured before the probe: fitted as measured)."""
    probes = [r.run.host_probe_s() or 0.0 for r in runs]
    return float(np.median(probes)) if probes and all(probes) else 0.0


def _lstsq(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Intercept and slope of ``y`` on ``x``, both >= 0 (one distinct ``x``: the mean, slope 0)."""
    if x.size == 0:
        return 0.0, 0.0
    if np.unique(x).size < 2:
        return max(float(y.mean()), 0.0), 0.0
    a, b = np.linalg.lstsq(np.c_[np.ones_like(x), x], y, rcond=None)[0]
    if b < 0:
        return max(float(y.mean()), 0.0), 0.0
    if a < 0:
        return 0.0, float((x * y).sum() / (x * x).sum())
    return float(a), float(b)


def fit_observe(runs: list[HostRun]) -> dict[str, list[float]]:
    """Per policy, [seconds per observed layer step, seconds per observed expert]."""
    calls: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for r in runs:
        if r.run.host["call_s"].size:
            calls[r.policy].append((r.run.host["call_entries"].astype(float), r.run.host["call_s"] * r.to_ref))
    return {p: list(_lstsq(np.concatenate([c[0] for c in v]), np.concatenate([c[1] for c in v])))
            for p, v in sorted(calls.items())}


LAYER_WORK = ("inputs", "launch", "choose", "records", "mark", "boundary", "other")   # host log sections


def _layer_work(r: HostRun) -> tuple[np.ndarray, np.ndarray]:
    """Per pass of a per-layer-seam run (warm-up left out): the mean distinct experts of its layer steps and the
    host seconds per layer step in the sections of ``LAYER_WORK`` (not waiting, observing, copying or
    staging), at the reference speed."""
    h = r.run.host
    passes = h["pass_s"].size
    layers = r.run.requests.size // passes
    work = sum((h[f"sec_{s}"] for s in LAYER_WORK if f"sec_{s}" in h), np.zeros(passes)) / layers * r.to_ref
    entries = r.run.requests[:passes * layers].reshape(passes, layers).mean(1)
    return entries[WARMUP_PASSES:], work[WARMUP_PASSES:]


def fit_layer(runs: list[HostRun]) -> dict[str, list[float]]:
    """``layer_s``: per policy, the least-squares line of its per-layer-seam runs' host work per layer step on
    ``[1, distinct experts]`` less the static policies' line (their work is in ``layer_sync_s`` and ``entry_s``);
    {} without a static per-layer run. Policies whose runs show one expert count only are left out."""
    pts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for r in runs:
        if r.seam == "per-layer" and "sec_choose" in r.run.host:
            pts["static" if r.policy.startswith("static") else r.policy].append(_layer_work(r))
    lines = {}
    for policy, v in pts.items():
        x, y = np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])
        if np.unique(x).size > 1:
            lines[policy] = np.linalg.lstsq(np.c_[np.ones_like(x), x], y, rcond=None)[0]
    base = lines.pop("static", None)
    if base is None:
        return {}
    return {p: [float(c[0] - base[0]), float(c[1] - base[1])] for p, c in sorted(lines.items())}


def fit_pass(runs: list[HostRun]) -> tuple[float, float, dict[str, float]]:
    """(``pass_s``, ``copy_s``, ``pass_own_s``) from the per-pass-seam runs' host logs: each pass's host work on
    ``[1, one indicator per non-static policy, copies issued at its boundary, copies issued at the boundary
    before]`` (a copy costs the host at its issue and again when it lands, one boundary later: slab bookkeeping,
    the table entry). ``pass_s`` is the static policies' pass, ``pass_own_s`` each other policy's extra (its
    boundary's decisions and bookkeeping); ``copy_s`` the sum of both copy slopes, charged at issue. Without a
    static run, one pass cost for every policy; without two distinct copy counts, or with a negative slope, the
    copies issued alone (negative: no copy cost, each policy's mean)."""
    pol, xs, ys = [], [], []
    for r in runs:
        if r.seam != "per-pass":
            continue
        h = r.run.host
        work = h["pass_s"] - h["waited_s"] - h["observe_s"]
        k = h["copies"].astype(float)
        xs.append(np.c_[k, np.r_[0.0, k[:-1]]][WARMUP_PASSES:])
        ys.append(work[WARMUP_PASSES:] * r.to_ref)
        pol += [r.policy] * len(ys[-1])
    if not xs:
        return 0.0, 0.0, {}
    x, y, names = np.concatenate(xs), np.concatenate(ys), np.asarray(pol)
    own = sorted({p for p in pol if not p.startswith("static")}) if any(p.startswith("static") for p in pol) else []
    ind = np.c_[np.ones(len(y)), *[(names == p).astype(float) for p in own]] if own else np.ones((len(y), 1))
    for cols in (np.c_[ind, x], np.c_[ind, x[:, :1]]):
        if np.linalg.matrix_rank(cols) == cols.shape[1]:
            b = np.linalg.lstsq(cols, y, rcond=None)[0]
            slopes = b[ind.shape[1]:]
            if (slopes >= 0).all() and b[0] >= 0:
                return float(b[0]), float(slopes.sum()), {p: float(b[1 + i]) for i, p in enumerate(own)}
    b = np.linalg.lstsq(ind, y, rcond=None)[0]   # no copy cost: each policy's mean
    return max(float(b[0]), 0.0), 0.0, {p: float(b[1 + i]) for i, p in enumerate(own)}


def fit_layer_copy(runs: list[HostRun]) -> list[float]:
    """``layer_copy_s``: per pass of the per-layer-seam runs that log it (warm-up left out), the host seconds issuing
    copies (the ``issue`` section) on ``[layer steps, layer steps that issued copies, copies]``: [the second's
    coefficient, the third's] (the first, a step's issue call with nothing to issue, is every policy's and in
    ``layer_sync_s``); [] without such runs, or when a coefficient comes out negative (then ``copy_s`` per copy)."""
    xs, ys = [], []
    for r in runs:
        h = r.run.host
        if r.seam != "per-layer" or "copy_steps" not in h or "sec_issue" not in h:
            continue
        layers = r.run.requests.size // max(h["pass_s"].size, 1)
        k, steps = h["copies"].astype(float), h["copy_steps"].astype(float)
        xs.append(np.c_[np.full(k.size, float(layers)), steps, k][WARMUP_PASSES:])
        ys.append(h["sec_issue"][WARMUP_PASSES:] * r.to_ref)
    if not xs:
        return []
    x, y = np.concatenate(xs), np.concatenate(ys)
    if np.linalg.matrix_rank(x) < 3:
        return []
    b = np.linalg.lstsq(x, y, rcond=None)[0]
    return [float(b[1]), float(b[2])] if (b[1:] >= 0).all() else []


def fit_pass_io(runs: list[HostRun]) -> float | None:
    """``pass_io_s``: the median, over the decode passes (warm-up left out) of static policies' per-pass-seam runs,
    of a pass's latency less its graph's device time; None when no such run carries device times."""
    gaps = []
    for r in runs:
        if r.seam != "per-pass" or not r.policy.startswith("static") or not r.run.busy_s.size:
            continue
        df = pass_table(r.run)
        dec = df[df["phase"] == "decode"].iloc[WARMUP_PASSES:]
        gaps.append((dec["latency_s"] - dec["busy_s"]).to_numpy())
    return float(np.median(np.concatenate(gaps))) if gaps else None


def fit_stage(runs: list[HostRun]) -> float:
    """``stage_s``: the per-layer-seam runs' host seconds in their ``stage`` section (a bypassed expert's copy and
    launch, issued by the host) per expert streamed; 0 without such runs (the simulator then charges ``copy_s``)."""
    secs = bypassed = 0.0
    for r in runs:
        h = r.run.host
        if r.seam == "per-layer" and "sec_stage" in h:
            secs += float(h["sec_stage"].sum()) * r.to_ref
            bypassed += summarize(r.run)["bypasses"]
    return secs / bypassed if bypassed else 0.0


def _decode_passes(r: RunResult) -> int:
    starts = r.pass_starts()
    return int(np.count_nonzero(r.ls_pass[starts] > 0))


def _waiting_decode_steps(r: RunResult) -> int:
    return int(np.count_nonzero((r.stall_s > 0) & (r.ls_pass > 0)))


def _decode_gap_per_step(run: HostRun, hw: HardwareProfile) -> tuple[float, float]:
    """(measured less simulated decode seconds per decode layer step at the reference host speed, mean experts
    of a decode step)."""
    meas, sim, labels = resimulate_case(run.case, hw)
    layers = int(labels["layers"])
    gap = (summarize(meas)["tpot_ms_mean"] - summarize(sim)["tpot_ms_mean"]) * 1e-3 / layers * run.to_ref
    return gap, float(meas.requests[meas.ls_pass > 0].mean())


def _p50_gap_s(meas: RunResult, sim: RunResult) -> float:
    """Measured less simulated median TPOT, seconds."""
    return (summarize(meas)["tpot_ms_p50"] - summarize(sim)["tpot_ms_p50"]) * 1e-3


SPEED_EXPONENTS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def fit_host_costs(hw: HardwareProfile, measured: Path, stall_case: str = "cal_layer_lru",
                   io_case_name: str = "cal_whole_static",
                   exponents: tuple[float, ...] = SPEED_EXPONENTS) -> HardwareProfile:
    """``hw`` with :class:`HostCosts`, ``layer_sync_s`` and ``stall_sync_s`` fitted to the runs in ``measured``,
    at each host speed exponent of ``exponents`` (:attr:`HostCosts.speed_exponent`); the one whose profile
    grades the calibration runs themselves best (mean |median TPOT error|) is kept. Runs without a host probe:
    exponent 1, not searched."""
    runs = host_runs(measured)
    if not runs:
        raise ValueError(f"{measured}: no measured run with a host log (CASE.measured.npz from `moebits analysis "
                         "validate` on the graph runtime); run benchmarks/graph_cases_calibration.txt first")
    if not reference_probe_s(runs):
        exponents = (1.0,)
    best: tuple[float, HardwareProfile] | None = None
    for x in exponents:
        prof = _fit_at(hw, measured, host_runs(measured, exponent=x), x, stall_case, io_case_name)
        score = _cal_error(prof, runs) if len(exponents) > 1 else 0.0
        if best is None or score < best[0]:
            best = (score, prof)
    assert best is not None and best[1].host_costs is not None
    hc = best[1].host_costs
    return dataclasses.replace(best[1], host_costs=dataclasses.replace(hc, fit={**hc.fit, "cal_p50_err": best[0]}))


def _cal_error(hw: HardwareProfile, runs: list[HostRun]) -> float:
    """Mean |median TPOT error| of ``hw`` on the calibration runs (each at its own host speed)."""
    errs = []
    for r in runs:
        meas, sim, _ = resimulate_case(r.case, hw)
        m = summarize(meas)["tpot_ms_p50"]
        errs.append(abs(summarize(sim)["tpot_ms_p50"] - m) / m)
    return float(np.mean(errs))


def _fit_at(hw: HardwareProfile, measured: Path, runs: list[HostRun], exponent: float, stall_case: str,
            io_case_name: str) -> HardwareProfile:
    """The fit of the module docstring, host seconds normalized with ``exponent``."""
    pass_s, copy_s, pass_own = fit_pass(runs)
    hc = HostCosts(pass_s=pass_s, copy_s=copy_s, observe_s=fit_observe(runs), stage_s=fit_stage(runs),
                   layer_s=fit_layer(runs), pass_own_s=pass_own, layer_copy_s=fit_layer_copy(runs),
                   fit={"runs": float(len(runs))}, probe_s=reference_probe_s(runs), speed_exponent=exponent)
    base = dataclasses.replace(hw, layer_sync_s=0.0, stall_sync_s=0.0, pass_io_s=0.0, host_costs=hc)
    io_case = measured / f"{io_case_name}.case.json"
    io_s = fit_pass_io(runs)
    if io_s is not None:
        base = dataclasses.replace(base, pass_io_s=io_s)
    elif io_case.exists():
        meas, sim, _ = resimulate_case(io_case, base)
        base = dataclasses.replace(base, pass_io_s=max(0.0, _p50_gap_s(meas, sim)))
    static_layer = [r for r in runs if r.seam == "per-layer" and r.policy.startswith("static")]
    pts = [_decode_gap_per_step(c, base) for c in static_layer]
    sync, entry = _lstsq(np.array([p[1] for p in pts]), np.array([p[0] for p in pts])) if pts else (0.0, 0.0)
    hc = dataclasses.replace(hc, entry_s=entry)
    with_layer = dataclasses.replace(base, layer_sync_s=sync, host_costs=hc)
    stall = [r for r in runs if r.case.name == f"{stall_case}.case.json"]
    stall_sync = 0.0
    if stall:
        meas, sim, _ = resimulate_case(stall[0].case, with_layer)
        waits = _waiting_decode_steps(sim)
        left = (summarize(meas)["tpot_ms_mean"] - summarize(sim)["tpot_ms_mean"]) * 1e-3 * _decode_passes(sim)
        stall_sync = max(0.0, left / waits * stall[0].to_ref) if waits else 0.0
    return dataclasses.replace(with_layer, stall_sync_s=stall_sync)


def describe(hw: HardwareProfile) -> str:
    """One line per fitted host cost (microseconds)."""
    hc = hw.host_costs or HostCosts()
    lines = [f"layer_sync_s {hw.layer_sync_s * 1e6:.1f} us, stall_sync_s {hw.stall_sync_s * 1e6:.1f} us, "
             f"pass_io_s {hw.pass_io_s * 1e6:.1f} us, "
             f"pass_s {hc.pass_s * 1e6:.1f} us, copy_s {hc.copy_s * 1e6:.1f} us, stage_s {hc.stage_s * 1e6:.1f} us, "
             f"entry_s {hc.entry_s * 1e6:.2f} us, "
             + (f"per-layer copies {hc.layer_copy_s[0] * 1e6:.1f} us per issuing step + {hc.layer_copy_s[1] * 1e6:.1f} us "
                "each, " if hc.layer_copy_s else "")
             + f"host probe {hc.probe_s * 1e6:.1f} us, speed exponent {hc.speed_exponent:g}"]
    lines += [f"observe {p}: {c[0] * 1e6:.1f} us/step + {c[1] * 1e6:.2f} us/expert" for p, c in hc.observe_s.items()]
    lines += [f"per-pass host work of {p} beyond a static policy's: {c * 1e6:+.1f} us" for p, c in hc.pass_own_s.items()]
    lines += [f"per-layer host work of {p} beyond a static policy's: {c[0] * 1e6:+.1f} us/step {c[1] * 1e6:+.2f} us/expert"
              for p, c in hc.layer_s.items()]
    return "\n".join(lines)

