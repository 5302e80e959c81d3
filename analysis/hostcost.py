"""The graph path's host-side costs, fitted to measured synthetic runs (no trace).

Two numbers of a :class:`core.hardware.HardwareProfile` are what the host adds to a per-layer graph
step, which the whole-pass designs (:mod:`runtime.pass_designs`) cannot see:

- ``layer_sync_s``: per layer step on the per-layer seam (read the layer's routing back, the
  host's decisions, launch the next graph), from a static policy on per-layer graphs: the
  measured TPOT less the simulated one without it, per layer;
- ``stall_sync_s``: per layer step that waits for a copy (issue, wait for it, write the table),
  from a demand-fetch cache on per-layer graphs: the decode time left over once ``layer_sync_s``
  is in, per waiting decode layer step.

Both come from runs measured by ``moebits analysis validate`` on a synthetic workload
(``benchmarks/graph_cases_calibration.txt``), graded offline through :func:`analysis.fidelity.resimulate_case`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from moebits.analysis.fidelity import resimulate_case
from moebits.core.hardware import HardwareProfile
from moebits.drive.records import RunResult, summarize


def _decode_passes(r: RunResult) -> int:
    starts = r.pass_starts()
    return int(np.count_nonzero(r.ls_pass[starts] > 0))


def _waiting_decode_steps(r: RunResult) -> int:
    return int(np.count_nonzero((r.stall_s > 0) & (r.ls_pass > 0)))


def fit_host_costs(hw: HardwareProfile, measured: Path, layer_case: str = "cal_layer_static",
                   stall_case: str = "cal_layer_lru") -> HardwareProfile:
    """``hw`` with ``layer_sync_s`` and ``stall_sync_s`` fitted to the two measured cases of ``measured``."""
    base = dataclasses.replace(hw, layer_sync_s=0.0, stall_sync_s=0.0)
    meas, sim, labels = resimulate_case(measured / f"{layer_case}.case.json", base)
    layers = int(labels["layers"])
    gap = (summarize(meas)["tpot_ms_mean"] - summarize(sim)["tpot_ms_mean"]) * 1e-3
    layer_sync = max(0.0, gap / layers)
    with_layer = dataclasses.replace(base, layer_sync_s=layer_sync)
    meas, sim, _ = resimulate_case(measured / f"{stall_case}.case.json", with_layer)
    waits = _waiting_decode_steps(sim)
    left = (summarize(meas)["tpot_ms_mean"] - summarize(sim)["tpot_ms_mean"]) * 1e-3 * _decode_passes(sim)
    stall_sync = max(0.0, left / waits) if waits else 0.0
    return dataclasses.replace(with_layer, stall_sync_s=stall_sync)
