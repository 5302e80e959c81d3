"""Fidelity: one trace, one policy and budget through the runtime and the simulator, compared.

:func:`validate` runs a live replay (:func:`runtime.runner.execute`, ``runtime.mode=REPLAY``:
whatever runtime path the config selects) and then the simulator on exactly what the runtime
replayed: the same (layer-truncated, size-scaled) model, the same view of the trace, the same
budget in bytes, policy, sensitivity table, seed and observation lag, priced by the given
hardware profile. The eager replay runs the MoE layers only (no attention, no head): for it the
simulator's non-MoE block and per-step fixed part are set to zero (:func:`moe_only`); a graph
path that runs whole steps names itself in the summary's ``runtime_path``. Both give a :class:`drive.records.RunResult`; :func:`compare` turns the two
into per-pass rows (the rows of ``steps.parquet``: a pass is one forward step, prefill or
decode) and one fidelity row:

- ``tpot_err``, ``ttft_err``: relative error of the run's mean TPOT / TTFT, ``(sim - meas) / meas``;
  ``tpot_p50_err``: of the median TPOT (a measured mean also carries the host's rare long pauses,
  which no cost model predicts; the median does not);
- repeatability (:func:`repeatability`): a case measured twice gives how far two identical measured runs
  differ, the floor under any simulator's error: ``CASE_r2`` minutes later in the same device call (a repeat,
  not graded), ``CASE_s2`` in a later call (an independent measurement, graded like ``CASE``);
- ``step_err_p95`` / ``step_err_max``: 95th percentile / max of the per-pass relative latency error;
- ``busy_err`` (whole-step graphs): error of a decode pass's mean device time (its graph alone, no host gap, no
  input or routing copy; ``busy_ms_*``): the device model's (the graph tables') share of the TPOT error, apart
  from the host's and the copies';
- ``stall_s``, ``h2d_bytes``, ``promotions``: both sides, measured and simulated;
- ``host_speed``: the host's speed during the measured run relative to the one the profile's host costs were
  fitted at (the runtime's probe, :func:`runtime.host_log.host_probe_s`; > 1: faster): the simulator prices
  that run's host work at that speed (:meth:`core.hardware.HardwareProfile.at_host_speed`), unless asked
  not to (``host_speed=False``: the profile's reference host);
- ``decisions_match``: the served precision mix of every layer step and the driver's counters
  (promotions, prefetches, demotions, refusals) at every pass end are identical. When they are
  not, ``first_divergence`` names the first pass and what differs: measured timing (a copy that
  landed later or earlier than modelled) made the runtime serve, refuse or delay something the
  simulator did not.

:func:`scatter` plots simulated against measured pass latency; :func:`table_md` renders rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from moebits.core.hardware import HardwareProfile, NonMoeTable
from moebits.drive.driver import COUNTS
from moebits.drive.records import COUNTERS, RunResult, load_run, pass_table, save_run, summarize


@dataclass
class Comparison:
    """Per-pass rows of both engines side by side, and the run's fidelity row."""

    passes: pd.DataFrame
    row: dict[str, Any]


def _rel(sim: float | None, meas: float | None) -> float | None:
    if sim is None or meas is None or meas == 0 or not math.isfinite(meas):
        return None
    return (sim - meas) / meas


def first_divergence(meas: RunResult, sim: RunResult) -> str | None:
    """Where the two runs' decisions first differ (None: identical)."""
    if meas.layer_steps != sim.layer_steps:
        return f"layer steps differ: measured {meas.layer_steps}, simulated {sim.layer_steps}"
    if meas.precisions != sim.precisions:
        return f"precisions differ: {meas.precisions} vs {sim.precisions}"
    diff = np.flatnonzero((meas.act != sim.act).any(axis=1))
    if diff.size:
        i = int(diff[0])
        return (f"layer step {i} (batch {int(meas.ls_batch[i])}, pass {int(meas.ls_pass[i])}): served tokens per "
                f"precision {meas.act[i].tolist()} measured vs {sim.act[i].tolist()} simulated")
    cols = [COUNTERS.index(c) for c in COUNTS]
    bad = np.flatnonzero((meas.snaps[:, cols] != sim.snaps[:, cols]).any(axis=1))
    if bad.size:
        j = int(bad[0])
        m, s = meas.snaps[j, cols].tolist(), sim.snaps[j, cols].tolist()
        return f"pass {j}: counters {dict(zip(COUNTS, m, strict=True))} measured vs {dict(zip(COUNTS, s, strict=True))} simulated"
    return None


def compare(meas: RunResult, sim: RunResult, labels: dict[str, Any]) -> Comparison:
    """Per-pass and per-run errors of ``sim`` against ``meas`` (see the module docstring)."""
    pm, ps = pass_table(meas), pass_table(sim)
    n = min(len(pm), len(ps))
    passes = pd.DataFrame({
        "batch": pm["batch"][:n], "pass": pm["pass"][:n], "phase": pm["phase"][:n], "tokens": pm["tokens"][:n],
        "measured_s": pm["latency_s"][:n].to_numpy(), "simulated_s": ps["latency_s"][:n].to_numpy(),
        "measured_stall_s": pm["stall_s"][:n].to_numpy(), "simulated_stall_s": ps["stall_s"][:n].to_numpy(),
    })
    passes["rel_err"] = (passes["simulated_s"] - passes["measured_s"]) / passes["measured_s"].where(passes["measured_s"] > 0)
    busy = "busy_s" in pm and "busy_s" in ps
    if busy:
        passes["measured_busy_s"], passes["simulated_busy_s"] = pm["busy_s"][:n].to_numpy(), ps["busy_s"][:n].to_numpy()
    sm, ss = summarize(meas), summarize(sim)
    err = passes["rel_err"].abs().dropna().to_numpy()
    dec = passes[passes["phase"] == "decode"]["rel_err"].abs().dropna().to_numpy()
    div = first_divergence(meas, sim)
    row = {
        **labels,
        "tpot_ms_measured": sm["tpot_ms_mean"], "tpot_ms_simulated": ss["tpot_ms_mean"],
        "tpot_err": _rel(ss["tpot_ms_mean"], sm["tpot_ms_mean"]),
        "tpot_p50_ms_measured": sm["tpot_ms_p50"], "tpot_p50_ms_simulated": ss["tpot_ms_p50"],
        "tpot_p50_err": _rel(ss["tpot_ms_p50"], sm["tpot_ms_p50"]),
        "ttft_ms_measured": sm["ttft_ms"], "ttft_ms_simulated": ss["ttft_ms"],
        "ttft_err": _rel(ss["ttft_ms"], sm["ttft_ms"]),
        "step_err_p95": float(np.percentile(err, 95)) if err.size else None,
        "step_err_max": float(err.max()) if err.size else None,
        "decode_step_err_p95": float(np.percentile(dec, 95)) if dec.size else None,
        "stall_s_measured": sm["stall_s"], "stall_s_simulated": ss["stall_s"],
        "h2d_bytes_measured": sm["h2d_bytes"], "h2d_bytes_simulated": ss["h2d_bytes"],
        "promotions_measured": sm["promotions"], "promotions_simulated": ss["promotions"],
        "copy_wait_s_measured": meas.info.get("copy_wait_s"), "copy_wait_s_simulated": sim.info.get("copy_wait_s"),
        "refusals_measured": sm["refusals"], "refusals_simulated": ss["refusals"],
        "hit_rate_measured": sm.get("hit_rate"), "hit_rate_simulated": ss.get("hit_rate"),
        **_busy_fields(passes if busy else None),
        "passes": n, "layer_steps": meas.layer_steps,
        "decisions_match": div is None, "first_divergence": div,
    }
    return Comparison(passes, row)


def _busy_fields(passes: pd.DataFrame | None) -> dict[str, Any]:
    """Mean device seconds of a decode pass's graph, both sides, and the error (whole-step runs): the part of the TPOT
    error that is the device's (the graph tables'), apart from the host's and the copies'."""
    if passes is None:
        return {"busy_ms_measured": None, "busy_ms_simulated": None, "busy_err": None}
    dec = passes[passes["phase"] == "decode"]
    m, s = float(dec["measured_busy_s"].mean()) * 1e3, float(dec["simulated_busy_s"].mean()) * 1e3
    ok = len(dec) > 0 and m > 0
    return {"busy_ms_measured": m if ok else None, "busy_ms_simulated": s if ok else None,
            "busy_err": (s - m) / m if ok else None}


def runs_full_step(summary: dict[str, Any]) -> bool:
    """Whether the live replay ran whole steps (attention, head: the graph path) or the MoE layers
    only (the eager replay, :func:`runtime.replay.replay`). The runtime's summary names its path
    in ``runtime_path``; without it, the eager replay."""
    return "graph" in str(summary.get("runtime_path", "")).lower()


def moe_only(hw: HardwareProfile) -> HardwareProfile:
    """``hw`` for a replay that runs the MoE layers only: no non-MoE block, no per-step fixed part
    (the MoE launch cost stays)."""
    return dataclasses.replace(hw, non_moe_table=NonMoeTable([1.0], [0.0]), non_moe_launches=0, step_overhead_s=0.0)


def compose(overrides: list[str]) -> Any:
    """The :class:`runtime.runner.RuntimeRunConfig` of a replay with ``overrides`` (``workload=default``
    unless they pick a workload; ``runtime.mode=REPLAY``, no KL)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from moebits.drive.app import CONF_DIR
    from moebits.runtime.app import register_configs
    from moebits.runtime.runner import RuntimeRunConfig
    from omegaconf import OmegaConf

    register_configs()
    if not any(o.lstrip("+~").startswith("workload=") for o in overrides):
        overrides = ["workload=default", *overrides]  # the embedded default trace (moebits runtime defaults to synth)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(hydra_compose("runtime", overrides=[*overrides, "runtime.mode=REPLAY",
                                                                      "runtime.kl=false"]))
    assert isinstance(cfg, RuntimeRunConfig)
    return cfg


def at_run_speed(hw: HardwareProfile, meas: RunResult, use: bool = True) -> tuple[HardwareProfile, dict[str, Any]]:
    """``hw`` priced at the host speed ``meas`` was measured at (when ``use`` and both probes are known),
    and the row's labels for it."""
    probe, ref = meas.host_probe_s(), (hw.host_costs.probe_s if hw.host_costs else 0.0)
    labels = {"host_probe_us": None if probe is None else probe * 1e6,
              "host_speed": ref / probe if probe and ref else None, "host_speed_applied": bool(use and probe and ref)}
    return (hw.at_host_speed(probe) if use else hw), labels


def simulate_like(cfg: Any, device_type: str, hw: HardwareProfile, summary: dict[str, Any]) -> tuple[RunResult, dict[str, Any]]:
    """The simulator on exactly what the runtime replayed on a ``device_type`` machine (same shapes
    and view, budget bytes, policy, table, profile, seed and lags), priced by ``hw`` (:func:`moe_only`
    when the replay ran the MoE layers only); the run and the case's labels."""
    import torch
    from moebits.policies._tables import run_table
    from moebits.policies.base import build_policy
    from moebits.runtime.runner import load_replay, replay_profile, resolve_budget
    from moebits.sim.engine import Engine

    view, full, spec, src = load_replay(cfg, torch.device(device_type))
    budget = resolve_budget(cfg, full, spec)
    policy = build_policy(cfg.policy)
    table, _ = run_table(cfg.quality_table, spec, cfg.seed)
    profile, _ = replay_profile(cfg, view, src, policy)  # as the runtime chose it
    full_step = runs_full_step(summary)
    engine = Engine(view, spec, hw if full_step else moe_only(hw), policy, budget, seed=cfg.seed, sensitivity=table,
                    profile=profile, observe_lag=cfg.observe_lag, route_lag=cfg.route_lag, policy_hw=cfg.hardware)
    sim = engine.run()
    labels = {"policy": summary["policy"], "batch": cfg.workload.batch, "trace": repo_relative(summary["workload"]),
              "budget_gb": budget / 1e9, "observe_lag": cfg.observe_lag, "route_lag": cfg.route_lag,
              "layers": spec.layers, "model": f"{spec.name} {spec.hidden}x{spec.expert_intermediate}",
              "device": summary.get("device"),
              "runtime_path": summary.get("runtime_path", "eager replay, MoE layers only (runtime/replay.py)"),
              "sim_non_moe": "modelled" if full_step else "zero (the replay ran MoE layers only)",
              "hardware": hw.name}
    return sim, labels


def repo_relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (rows name traces the same on any machine)."""
    from moebits.drive.app import CONF_DIR

    try:
        return str(Path(path).relative_to(CONF_DIR.parent))
    except ValueError:
        return path


def validate(overrides: list[str], hw: HardwareProfile, out_dir: Path, label: str = "",
             host_speed: bool = True) -> Comparison:
    """The live replay of ``overrides`` (``moebits runtime`` keys), then the simulator on what it
    replayed, compared. Writes ``out_dir``: the measured run first (``LABEL.measured.npz`` +
    ``LABEL.case.json``, kept even when the simulation fails; :func:`resimulate` grades them
    again), then ``LABEL.passes.csv``, ``LABEL.png`` and the row appended to ``fidelity.json``."""
    from moebits.runtime.runner import execute, pick_device

    cfg = compose(overrides)
    meas, summary = execute(cfg)
    meas.info["summary"] = summary
    case = label or summary["policy"]
    device_type = pick_device(cfg.runtime.device).type
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _slug(case)
    save_run(meas, out_dir / f"{stem}.measured.npz")
    (out_dir / f"{stem}.case.json").write_text(json.dumps(
        {"case": case, "overrides": overrides, "device_type": device_type}, indent=1))
    hw_run, speed = at_run_speed(hw, meas, host_speed)
    sim, labels = simulate_like(cfg, device_type, hw_run, summary)
    return _report(meas, sim, {"case": case, **labels, **speed, "overrides": " ".join(overrides)}, hw, out_dir)


def _device_type(labels: dict[str, Any]) -> str:
    return "cpu" if str(labels.get("device", "cpu")) == "cpu" else "cuda"


def _report(meas: RunResult, sim: RunResult, labels: dict[str, Any], hw: HardwareProfile, out_dir: Path) -> Comparison:
    cmp = compare(meas, sim, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _slug(cmp.row["case"])
    cmp.passes.to_csv(out_dir / f"{stem}.passes.csv", index=False)
    scatter(cmp.passes, out_dir / f"{stem}.png", title=f"{cmp.row['case']} on {hw.name}")
    append_rows(out_dir / "fidelity.json", [cmp.row])
    return cmp


def resimulate(measured_dir: Path, hw: HardwareProfile, out_dir: Path, host_speed: bool = True) -> list[Comparison]:
    """Every measured case of ``measured_dir`` (written by :func:`validate`) simulated again with
    ``hw`` and compared: a new profile graded on old measurements, no GPU needed."""
    cases = sorted(measured_dir.glob("*.case.json"))
    if not cases:
        raise ValueError(f"no *.case.json in {measured_dir} (run moebits analysis validate first)")
    out = []
    for path in cases:
        meas, sim, labels = resimulate_case(path, hw, host_speed)
        out.append(_report(meas, sim, labels, hw, out_dir))
    return out


def resimulate_case(path: Path, hw: HardwareProfile, host_speed: bool = True) -> tuple[RunResult, RunResult, dict[str, Any]]:
    """One measured case (its ``CASE.case.json``) simulated again with ``hw`` (at the run's host speed unless
    ``host_speed`` is False): (measured, simulated, labels)."""
    case = json.loads(path.read_text())
    meas = load_run(path.with_name(path.name.removesuffix(".case.json") + ".measured.npz"))
    cfg = compose(case["overrides"])
    hw_run, speed = at_run_speed(hw, meas, host_speed)
    sim, labels = simulate_like(cfg, case["device_type"], hw_run, meas.info.get("summary", meas.info))
    return meas, sim, {"case": case["case"], **labels, **speed, "overrides": " ".join(case["overrides"])}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Add ``rows`` to the JSON list at ``path`` (a row with the same ``case`` is replaced)."""
    old = json.loads(path.read_text()) if path.exists() else []
    cases = {r["case"] for r in rows}
    path.write_text(json.dumps([r for r in old if r.get("case") not in cases] + rows, indent=1) + "\n")


def scatter(passes: pd.DataFrame, path: Path, title: str = "") -> None:
    """Simulated vs measured latency per pass (ms, log-log), the diagonal and +-5%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    cases = sorted(passes["case"].unique()) if "case" in passes else [None]
    if len(cases) > MAX_LEGEND_CASES:   # too many to name: one colour per phase, every case pooled
        cases = [None]
        title = f"{title} ({passes['case'].nunique()} cases)".strip()
    for case in cases:
        for phase, marker in (("prefill", "s"), ("decode", ".")):
            d = passes[(passes["phase"] == phase) & ((passes["case"] == case) if case is not None else True)]
            name = phase if case is None else f"{case} {phase}"
            ax.scatter(d["measured_s"] * 1e3, d["simulated_s"] * 1e3, s=12, marker=marker, label=name, alpha=0.7)
    vals = np.r_[passes["measured_s"], passes["simulated_s"]] * 1e3
    vals = vals[vals > 0]
    if vals.size:
        lo, hi = vals.min() * 0.9, vals.max() * 1.1
        xs = np.array([lo, hi])
        ax.plot(xs, xs, "k-", lw=0.8)
        ax.plot(xs, xs * 1.05, "k:", lw=0.6)
        ax.plot(xs, xs * 0.95, "k:", lw=0.6)
    _finish(fig, ax, path, title, "measured step latency (ms)", "simulated step latency (ms)")


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Log-log axes, labels, title and legend; save and close."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MAX_LEGEND_CASES = 8


def collect_passes(folder: Path) -> pd.DataFrame:
    """Every ``CASE.passes.csv`` of ``folder`` in one table with a ``case`` column."""
    frames = [pd.read_csv(p).assign(case=p.name.removesuffix(".passes.csv")) for p in sorted(folder.glob("*.passes.csv"))]
    if not frames:
        raise ValueError(f"no *.passes.csv in {folder} (run moebits analysis validate first)")
    return pd.concat(frames, ignore_index=True)


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:+.1f}%"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def table_md(rows: list[dict[str, Any]]) -> str:
    """The fidelity table (Markdown), one line per run."""
    head = ("| case | policy | batch | trace | hardware | TPOT meas / sim (ms) | TPOT err | device err | "
            "TTFT meas / sim (ms) | TTFT err | step err p95 | stall meas / sim (s) | promotions meas / sim | decisions |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.get('case')} | {r.get('policy')} | {r.get('batch')} | {r.get('trace')} | {r.get('hardware')} | "
            f"{_num(r.get('tpot_ms_measured'))} / {_num(r.get('tpot_ms_simulated'))} | {_pct(r.get('tpot_err'))} | "
            f"{_pct(r.get('busy_err'))} | {_num(r.get('ttft_ms_measured'))} / {_num(r.get('ttft_ms_simulated'))} | {_pct(r.get('ttft_err'))} | "
            f"{_pct(r.get('step_err_p95'))} | {_num(r.get('stall_s_measured'), '{:.4f}')} / "
            f"{_num(r.get('stall_s_simulated'), '{:.4f}')} | {r.get('promotions_measured')} / "
            f"{r.get('promotions_simulated')} | {'match' if r.get('decisions_match') else 'DIFFER'} |")
    return "\n".join(lines)


REPEAT_SUFFIX = "_r2"   # the same case again minutes later in the same device call: a repeat, not graded
LATER_SUFFIX = "_s2"    # the same case in a later device call: an independent measurement, graded
CALIBRATION_PREFIX = "cal_"   # calibration cases (benchmarks/graph_cases_calibration.txt): fitted, never graded


def graded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation rows: neither calibration cases (``cal_*``) nor repeats (``*_r2``)."""
    return [r for r in rows if not str(r.get("case", "")).startswith(CALIBRATION_PREFIX)
            and not str(r.get("case", "")).endswith(REPEAT_SUFFIX)]


def repeatability(rows: list[dict[str, Any]], suffix: str = REPEAT_SUFFIX) -> list[dict[str, Any]]:
    """Per case measured twice (``CASE`` and ``CASE`` + ``suffix``): both measured TPOTs (mean and median) and
    ``|a - b| / mean(a, b)`` of each, the measurement's own spread; ``runtime_path`` of the first."""
    by = {r["case"]: r for r in rows}
    out = []
    for case, r in by.items():
        twin = by.get(case + suffix)
        if twin is None:
            continue
        row: dict[str, Any] = {"case": case, "runtime_path": r.get("runtime_path")}
        for key in ("tpot_ms_measured", "tpot_p50_ms_measured"):
            a, b = r.get(key), twin.get(key)
            row[key] = [a, b]
            row[key.replace("_ms_measured", "_spread")] = abs(a - b) / ((a + b) / 2) if a and b else None
        out.append(row)
    return out


def error_vs_spread(rows: list[dict[str, Any]], suffix: str = LATER_SUFFIX) -> list[dict[str, Any]]:
    """Per case measured in two device calls (``CASE``, ``CASE`` + ``suffix``): the two measurements' own spread
    (``|a - b| / mean(a, b)`` of mean TPOT) beside the simulator's error against their mean (its two predictions,
    each at its run's host speed, averaged): where the error is below the spread the simulator is closer to either
    measurement than they are to each other, and no model can be checked to better than that."""
    by = {r["case"]: r for r in rows}
    out = []
    for case, r in sorted(by.items()):
        twin = by.get(case + suffix)
        if twin is None or case.startswith(CALIBRATION_PREFIX):
            continue
        m = [float(r.get("tpot_ms_measured") or 0.0), float(twin.get("tpot_ms_measured") or 0.0)]
        s = [float(r.get("tpot_ms_simulated") or 0.0), float(twin.get("tpot_ms_simulated") or 0.0)]
        if not all(m) or not all(s):
            continue
        mean = (m[0] + m[1]) / 2
        out.append({"case": case, "runtime_path": r.get("runtime_path"), "policy": r.get("policy"),
                    "spread": abs(m[0] - m[1]) / mean, "error": abs((s[0] + s[1]) / 2 / mean - 1)})
    return out


def spread_plot(points: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Simulator error against the two-call mean vs the two calls' own spread, per case (log-log), the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    floor = 1e-4   # 0.01%: where a case repeats (or is predicted) exactly, drawn on the axis
    for path_name, marker in (("graph_whole", "o"), ("graph_layer", "^")):
        d = [q for q in points if q["runtime_path"] == path_name]
        if d:
            below = sum(q["error"] <= q["spread"] for q in d)
            ax.scatter([max(q["spread"], floor) * 100 for q in d], [max(q["error"], floor) * 100 for q in d], s=18,
                       marker=marker, alpha=0.75, label=f"{path_name} ({len(d)}; error below spread: {below})")
    xs = np.array([floor * 100, 100.0])
    ax.plot(xs, xs, "k-", lw=0.8)
    ax.axhline(1.0, color="grey", ls=":", lw=0.8)   # the 1% target
    _finish(fig, ax, path, title, "two device calls differ by (% of mean TPOT)", "simulator error vs their mean (%)")


def by_policy(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per policy, over its validation rows: runs, mean |TPOT error|, and the mean two-call spread of its cases
    measured twice (:func:`error_vs_spread`; None without any); whole-step policies first, then by error."""
    val = graded(rows)
    spread: dict[str, list[float]] = {}
    for q in error_vs_spread(rows):
        spread.setdefault(str(q["policy"]), []).append(q["spread"])
    out = []
    for pol in sorted({str(r.get("policy")) for r in val}):
        mine = [r for r in val if str(r.get("policy")) == pol and r.get("tpot_err") is not None]
        if not mine:
            continue
        paths = {str(r.get("runtime_path")) for r in mine}
        sp = spread.get(pol)
        out.append({"policy": pol, "runs": len(mine), "runtime_path": "+".join(sorted(paths)),
                    "error": float(np.mean([abs(r["tpot_err"]) for r in mine])),
                    "spread": float(np.mean(sp)) if sp else None})
    return sorted(out, key=lambda q: (q["runtime_path"] != "graph_whole", q["error"]))


def policy_plot(stats: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Bars: each policy's mean |TPOT error|; dots: the mean spread of its cases between two device calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(stats))
    colors = ["tab:blue" if q["runtime_path"] == "graph_whole" else "tab:orange" for q in stats]
    ax.bar(x, [100 * q["error"] for q in stats], color=colors, alpha=0.8, label="simulator: mean |TPOT error|")
    sp = [(i, 100 * q["spread"]) for i, q in enumerate(stats) if q["spread"] is not None]
    if sp:
        ax.scatter([i for i, _ in sp], [v for _, v in sp], color="k", marker="D", s=18, zorder=3,
                   label="measurement: two calls differ by")
    ax.axhline(1.0, color="grey", ls=":", lw=0.8)
    ax.set_xticks(x, [f"{q['policy']}\n({q['runs']})" for q in stats], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("% of mean TPOT")
    ax.set_title(title + "  (blue: whole-step graphs, orange: per-layer graphs)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _error_line(label: str, rows: list[dict[str, Any]]) -> str:
    e = np.array([abs(r["tpot_err"]) for r in rows if r.get("tpot_err") is not None])
    if not e.size:
        return ""
    return (f"{label} ({e.size}): mean |TPOT error| {100 * e.mean():.2f}%, max {100 * e.max():.2f}%, within 1/3/5%: "
            f"{int((e <= 0.01).sum())}/{int((e <= 0.03).sum())}/{int((e <= 0.05).sum())}.")


def _spread_line(label: str, rep: list[dict[str, Any]]) -> str:
    sp = np.array([r["tpot_spread"] for r in rep if r["tpot_spread"] is not None])
    sp50 = np.array([r["tpot_p50_spread"] for r in rep if r["tpot_p50_spread"] is not None])
    if not sp.size:
        return ""
    return (f"{label} ({sp.size} cases measured twice): mean TPOT differs by {100 * sp.mean():.2f}% on average, "
            f"{100 * sp.max():.2f}% at most, within 1%: {int((sp <= 0.01).sum())}"
            + (f"; median TPOT by {100 * sp50.mean():.2f}% / {100 * sp50.max():.2f}%." if sp50.size else "."))


def summary_md(rows: list[dict[str, Any]]) -> str:
    """The table plus the aggregate errors against the issue's targets, repeatability, and each divergence."""
    first = graded(rows)
    tp = np.array([abs(r["tpot_err"]) for r in first if r.get("tpot_err") is not None])
    t50 = np.array([abs(r["tpot_p50_err"]) for r in first if r.get("tpot_p50_err") is not None])
    st = np.array([r["step_err_p95"] for r in first if r.get("step_err_p95") is not None])
    out = [table_md(rows), ""]
    if tp.size:
        out.append(f"Validation cases ({tp.size}; calibration cases and repeats not graded): "
                   f"mean |TPOT error| {100 * tp.mean():.2f}% (target <= 1%), max {100 * tp.max():.2f}% (target <= 3%); "
                   f"per-step p95 error worst {100 * st.max():.1f}% (target <= 5%)." if st.size else "")
    if t50.size:
        out.append(f"Median TPOT: mean |error| {100 * t50.mean():.2f}%, max {100 * t50.max():.2f}%.")
    dev = [r for r in first if r.get("busy_err") is not None]
    if dev:
        b = np.array([abs(r["busy_err"]) for r in dev])
        t = np.array([abs(r["tpot_err"]) for r in dev if r.get("tpot_err") is not None])
        out.append(f"Device time of a decode pass's graph (whole-step runs, {b.size}): mean |error| {100 * b.mean():.2f}%, "
                   f"max {100 * b.max():.2f}%, within 1/3%: {int((b <= 0.01).sum())}/{int((b <= 0.03).sum())} "
                   f"(their TPOT: {100 * t.mean():.2f}%): the graph tables' share; the rest is host and copies.")
    paths = sorted({str(r.get("runtime_path")) for r in first})
    if len(paths) > 1:
        out += [_error_line(f"  {p}", [r for r in first if str(r.get("runtime_path")) == p]) for p in paths]
    for suffix, label in ((REPEAT_SUFFIX, "Repeatability, minutes apart in one call"),
                          (LATER_SUFFIX, "Repeatability, a later device call")):
        rep = repeatability(rows, suffix)
        out.append(_spread_line(label, rep))
        if len(paths) > 1 and rep:
            out += [_spread_line(f"  {p}", [r for r in rep if str(r.get("runtime_path")) == p]) for p in paths]
    pts = error_vs_spread(rows)
    for p in paths if pts else []:
        d = [q for q in pts if str(q["runtime_path"]) == p]
        if d:
            e = np.array([q["error"] for q in d])
            out.append(f"  {p}: against the mean of its two calls, mean |TPOT error| {100 * e.mean():.2f}% (max "
                       f"{100 * e.max():.1f}%), below the two calls' own spread in {sum(q['error'] <= q['spread'] for q in d)} "
                       f"of {len(d)} cases.")
    for r in rows:
        if not r.get("decisions_match"):
            out.append(f"- {r.get('case')}: decisions differ: {r.get('first_divergence')}")
    return "\n".join(out) + "\n"
