"""``runtime.engine=GRAPH``: a trace replayed through the graph-captured runtime.

The model is :class:`runtime.fast_model.FastModel` at the (possibly scaled) shape of the run,
with random weights: bf16 non-expert weights (:func:`runtime.calibrate_graph.random_weights`)
and random bf16 experts (:func:`runtime.host_store.random_weights`, quantized into the device
slabs by the initial loads and into the pinned host store for promotions). The policy runs
through :class:`runtime.graph_engine.GraphEngine`; every pass of the workload is replayed with
its routing forced (:func:`runtime.replay.graph_replay`), so the step table is the trace's.

Which graphs: on the per-pass seam (:func:`drive.driver.per_pass`: ``route_lag`` >= 1 and a
policy that never waits for a copy) one CUDA graph per pass (``GraphMode.WHOLE``), the routing
read back asynchronously ``route_lag`` passes later; otherwise one graph per layer
(``GraphMode.LAYER``) with the host reading each layer's routing. On a CPU the same steps run
eagerly with torch kernels (``GraphMode.EAGER``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.drive.driver import per_pass
from moebits.drive.records import RunResult
from moebits.policies.base import Policy
from moebits.runtime.calibrate_graph import attn_shape
from moebits.runtime.calibrate_graph import random_weights as random_fast_weights
from moebits.runtime.fast_model import FastModel
from moebits.runtime.fused_ops import triton_usable
from moebits.runtime.graph_engine import GraphEngine
from moebits.runtime.graph_serve import GraphMode
from moebits.runtime.host_store import HostStore, random_weights
from moebits.runtime.replay import graph_replay, replay_shape

_STORE: dict[tuple[Any, ...], HostStore] = {}   # the last host store, for the next case of one process


def _host_store(spec: Any, cfg: Any, weights: Any) -> HostStore:
    """The pinned host store of ``spec``'s random experts (seeded): kept for the next run of the same
    shape, seed and quantizer in this process (``moebits analysis validate`` runs cases back to back)."""
    key = (spec, cfg.seed, cfg.runtime.quant)
    if key not in _STORE:
        _STORE.clear()
        _STORE[key] = HostStore(spec, method=cfg.runtime.quant, progress=cfg.progress).fill_bf16(weights)
    return _STORE[key]


def graph_mode(device: torch.device, on_pass_seam: bool) -> GraphMode:
    """Whole-step graphs on the per-pass seam, per-layer graphs otherwise; eager on a CPU."""
    if device.type != "cuda":
        return GraphMode.EAGER
    return GraphMode.WHOLE if on_pass_seam else GraphMode.LAYER


@dataclass
class ReplaySetup:
    """What :mod:`runtime.runner` resolved for a replay: the view and models, budget, policy, tables."""

    view: Any
    full: ModelSpec
    spec: ModelSpec
    budget: int
    policy: Policy
    table: Any
    profile: Any
    describe: Callable[[str, list[str]], dict[str, Any]]   # (policy name, precisions) -> summary fields


def run_graph_replay(cfg: Any, device: torch.device, s: ReplaySetup) -> tuple[RunResult, dict[str, Any]]:
    """Replay the workload of ``cfg`` (a :class:`runtime.runner.RuntimeRunConfig`) through the graph
    path; the run's arrays and its summary fields."""
    spec, policy = s.spec, s.policy
    shape = attn_shape(spec)
    fast_w = random_fast_weights(spec, shape, device, cfg.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = random_weights(spec, cfg.seed, device, dtype)
    rows, seqs, max_len = replay_shape(s.view)
    use_triton = triton_usable(device)
    store: HostStore | None = None

    def make(pool: Any, table_: Any) -> FastModel:
        return FastModel(fast_w, spec, shape, pool, table_, use_triton, max_seqs=seqs, max_len=max_len)

    def host_row(key: ExpertKey, precision: str) -> torch.Tensor:
        assert store is not None, "a static policy copies nothing"
        return store.row(key, precision)

    seam = per_pass(policy, cfg.route_lag)
    engine = GraphEngine(spec, policy, s.budget, make, weights, host_row, device=device,
                         mode=graph_mode(device, seam), seed=cfg.seed, sensitivity=s.table, profile=s.profile,
                         future=s.view, observe_lag=cfg.observe_lag, route_lag=max(cfg.route_lag, 1), replay=True,
                         max_rows=rows, per_pass=seam, hardware=cfg.hardware)
    if not engine.driver.static:
        store = _host_store(spec, cfg, weights)
        store.require(engine.precisions)
    result = graph_replay(engine, s.view, seed=cfg.seed, progress=cfg.progress)
    info = {**s.describe(engine.name, list(engine.precisions)), "runtime_path": f"graph_{engine.mode.value}",
            "pool_bytes": engine.pool.nbytes, "host_store_bytes": store.nbytes() if store is not None else 0}
    return result, info
