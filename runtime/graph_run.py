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

from typing import TYPE_CHECKING, Any

import torch
from moebits.core.keys import ExpertKey
from moebits.drive.driver import per_pass
from moebits.drive.records import RunResult
from moebits.policies.base import build_policy
from moebits.runtime.calibrate_graph import attn_shape
from moebits.runtime.calibrate_graph import random_weights as random_fast_weights
from moebits.runtime.fast_model import FastModel
from moebits.runtime.fused_ops import triton_usable
from moebits.runtime.graph_engine import GraphEngine
from moebits.runtime.graph_serve import GraphMode
from moebits.runtime.host_store import HostStore, random_weights
from moebits.runtime.replay import graph_replay, replay_shape

if TYPE_CHECKING:
    from moebits.runtime.runner import RuntimeRunConfig


_STORE: dict[tuple[Any, ...], HostStore] = {}   # the last host store, for the next case of one process


def _host_store(spec: Any, cfg: RuntimeRunConfig, weights: Any) -> HostStore:
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


def run_graph_replay(cfg: RuntimeRunConfig, device: torch.device) -> tuple[RunResult, dict[str, Any]]:
    """Replay ``cfg``'s workload through the graph path; the run's arrays and its summary fields."""
    from moebits.runtime.runner import (
        load_replay,
        replay_profile,
        resolve_budget,
        run_description,
        sensitivity_table,
    )

    view, full, spec, src = load_replay(cfg, device)
    budget = resolve_budget(cfg, full, spec)
    policy = build_policy(cfg.policy)
    table, table_src = sensitivity_table(cfg, spec)
    profile, profile_src = replay_profile(cfg, view, src, policy)
    shape = attn_shape(spec)
    fast_w = random_fast_weights(spec, shape, device, cfg.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = random_weights(spec, cfg.seed, device, dtype)
    rows, seqs, max_len = replay_shape(view)
    use_triton = triton_usable(device)
    store: HostStore | None = None

    def make(pool: Any, table_: Any) -> FastModel:
        return FastModel(fast_w, spec, shape, pool, table_, use_triton, max_seqs=seqs, max_len=max_len)

    def host_row(key: ExpertKey, precision: str) -> torch.Tensor:
        assert store is not None, "a static policy copies nothing"
        return store.row(key, precision)

    seam = per_pass(policy, cfg.route_lag)
    engine = GraphEngine(spec, policy, budget, make, weights, host_row, device=device, mode=graph_mode(device, seam),
                         seed=cfg.seed, sensitivity=table, profile=profile, future=view, observe_lag=cfg.observe_lag,
                         route_lag=max(cfg.route_lag, 1), replay=True, max_rows=rows, per_pass=seam,
                         hardware=cfg.hardware)
    if not engine.driver.static:
        store = _host_store(spec, cfg, weights)
        store.require(engine.precisions)
    result = graph_replay(engine, view, seed=cfg.seed, progress=cfg.progress)
    path = f"graph_{engine.mode.value}"
    info = {**run_description(cfg, engine.name, list(engine.precisions), policy, full, spec, budget, src, profile_src,
                              table_src, device),
            "runtime_path": path, "pool_bytes": engine.pool.nbytes,
            "host_store_bytes": store.nbytes() if store is not None else 0}
    return result, info
