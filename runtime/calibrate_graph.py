"""Calibration of the graph-captured runtime: what :class:`runtime.fast_model.FastModel` really runs.

Dimension legend: T rows of a step, k experts per token, n active experts, m tokens per expert,
E experts, H hidden, I expert intermediate, L layers.

Everything is timed on the kernels a served step replays (device time of CUDA-graph replays on a
GPU; eager wall clock on a CPU, where the torch references stand in for the Triton kernels):

- fused experts (:meth:`runtime.fused_ops.MoeOps.experts`, every slab read through the residency
  table): per precision, a one-layer model whose every expert is resident at that precision;
  the step's routing gives ``n`` distinct experts ``m`` tokens each (``T = n m / k`` rows,
  :func:`runtime.replay.assignment`). The per-expert seconds at ``m`` are the slope from
  ``n = k`` to ``n = 8 k`` (a :class:`core.hardware.KernelTable` row); the intercept at ``m = 1``
  is the fixed cost of the one launch (``fused_moe``: paid once per layer step, whatever the mix);
- the non-MoE block (:meth:`FastModel.attend_route`: norms, qkv, rope + cache, attention at a
  ``context``-long KV cache, o-proj, router, top-k) per rows ``T`` (a :class:`NonMoeTable`);
- the fixed per-step part: embedding + final norm + LM head at one row, plus the asynchronous
  routing read-back (``[L, T, k]`` ids and weights, device to host) and one residency-table
  upload (host to device), each one small copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from moebits.core.hardware import KernelTable, NonMoeTable
from moebits.core.model_spec import ModelSpec
from moebits.core.slabs import SlabLedger
from moebits.policies.base import PolicyContext, build_policy
from moebits.policies.static_uniform import StaticUniformConfig
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights, LayerWeights, StepBuffers
from moebits.runtime.fused_ops import triton_usable
from moebits.runtime.host_store import random_weights as random_expert_weights
from moebits.runtime.pool import DevicePool
from moebits.runtime.replay import assignment
from moebits.runtime.residency import ResidencyTable, load_layer

SLACK_BYTES = 64 << 20  # alignment room beyond the static policy's budget (slabs align to 16 B)
Timer = Callable[[Callable[[], Any]], float]


@dataclass
class GraphCalibration:
    """What the graph path's step costs (see the module docstring)."""

    tables: list[KernelTable]
    launch_s: float          # one of the fused layer's two kernels (half the intercept at m = 1)
    non_moe: NonMoeTable
    step_overhead_s: float
    parts_s: dict[str, float]  # the pieces of step_overhead_s, for the log


def attn_shape(spec: ModelSpec) -> AttnShape:
    """Qwen3-style attention for ``spec``: 128-wide heads (64 below hidden 1024), 8 query heads
    per KV head, the query heads from the spec's attention parameters
    (``2 H D (Q + V)`` with ``V = Q / 8``: Qwen3-30B-A3B gives 32 query and 4 KV heads)."""
    head_dim = 128 if spec.hidden >= 1024 else 64
    heads = max(round(spec.attention_params / (2 * spec.hidden * head_dim * 1.125)), 1)
    kv = max(heads // 8, 1)
    return AttnShape(heads=kv * max(heads // kv, 1), kv_heads=kv, head_dim=head_dim)


def random_weights(spec: ModelSpec, shape: AttnShape, device: torch.device, seed: int = 0) -> FastWeights:
    """Random bf16 non-expert weights of ``spec`` (timing only)."""
    gen = torch.Generator(device).manual_seed(seed)
    h, q, v, d = spec.hidden, shape.heads, shape.kv_heads, shape.head_dim

    def rnd(*shape_: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape_, generator=gen, device=device, dtype=torch.bfloat16)

    def ones(*shape_: int) -> torch.Tensor:
        return torch.ones(*shape_, dtype=torch.bfloat16, device=device)

    layers = [LayerWeights(ones(h), rnd((q + 2 * v) * d, h), ones(2, d), rnd(h, q * d), ones(h), rnd(spec.experts, h))
              for _ in range(spec.layers)]
    return FastWeights(rnd(spec.vocab_size, h), layers, ones(h), rnd(spec.vocab_size, h))


def static_model(spec: ModelSpec, precision: str, weights: FastWeights, shape: AttnShape, device: torch.device,
                 rows: int, context: int) -> FastModel:
    """A model whose every expert is resident at ``precision`` (random expert weights)."""
    policy = build_policy(StaticUniformConfig(precision=precision))
    budget = spec.all_experts_bytes(precision)
    policy.prepare(PolicyContext(spec, budget, np.random.default_rng(0), {precision: spec.expert_bytes(precision)}))
    pool = DevicePool(SlabLedger(policy.slab_plan(), budget + SLACK_BYTES), spec, device)
    table = ResidencyTable(spec.layers, spec.experts, device)
    model = FastModel(weights, spec, shape, pool, table, triton_usable(device), max_seqs=rows, max_len=context + 2)
    weights_of = random_expert_weights(spec, 1, device, torch.bfloat16)
    for layer in range(spec.layers):
        load_layer(pool, table, layer, *weights_of(layer), precision)   # every expert, quantized into its slab
    table.flush()
    return model


def routed_buffers(model: FastModel, n: int, m: int, context: int) -> StepBuffers:
    """Buffers of ``T = n m / k`` rows (one per sequence, at ``context``) routed to ``n`` experts x ``m`` tokens."""
    spec, dev = model.spec, model.device
    rows = n * m // spec.top_k
    b = model.buffers(rows)
    experts = np.arange(n, dtype=np.int64) * (spec.experts // n)
    ids, w = assignment(experts, np.full(n, m), np.full(n, float(m) / spec.top_k), rows, spec.top_k)
    b.ids[0].copy_(torch.from_numpy(ids).to(dev, torch.int32))                  # [T, k]
    b.weights[0].copy_(torch.from_numpy(w).to(dev))
    b.xn.normal_()
    b.set_rows(torch.zeros(rows, dtype=torch.long), torch.arange(rows, dtype=torch.int32),
               torch.full((rows,), context, dtype=torch.int32))
    return b


def measure_experts(model: FastModel, precision: str, tokens: list[int], time_fn: Timer) -> tuple[KernelTable, float]:
    """(per-expert seconds by tokens per expert, intercept at one token) of the fused layer."""
    spec = model.spec
    k = spec.top_k
    lo, hi = k, min(8 * k, spec.experts)
    per, intercept = [], 0.0
    for m in tokens:
        t = {n: _time_experts(model, routed_buffers(model, n, m, 0), time_fn) for n in (lo, hi)}
        slope = max((t[hi] - t[lo]) / (hi - lo), 0.0)
        per.append(slope)
        if m == tokens[0]:
            intercept = max(t[lo] - lo * slope, 0.0)
    return KernelTable(precision, spec.hidden, spec.expert_intermediate, [float(m) for m in tokens], per), intercept


def _time_experts(model: FastModel, b: StepBuffers, time_fn: Timer) -> float:
    return time_fn(lambda: model.experts(0, b))


def _time_attention(model: FastModel, b: StepBuffers, time_fn: Timer) -> float:
    return time_fn(lambda: model.attend_route(0, b))


def measure_attention(model: FastModel, rows: list[int], context: int, time_fn: Timer) -> NonMoeTable:
    """Seconds of one layer's non-MoE block at ``rows`` rows (sequences) and a ``context`` cache."""
    secs = []
    for t in rows:
        secs.append(_time_attention(model, _rows_buffers(model, t, context), time_fn))
    return NonMoeTable(tokens=[float(t) for t in rows], seconds=secs, context=context, hidden=model.spec.hidden)


def _rows_buffers(model: FastModel, rows: int, context: int) -> StepBuffers:
    b = model.buffers(rows)
    b.r.normal_()
    b.set_rows(torch.zeros(rows, dtype=torch.long), torch.arange(rows, dtype=torch.int32),
               torch.full((rows,), context, dtype=torch.int32))
    return b


def measure_step_fixed(model: FastModel, full: ModelSpec, time_fn: Timer, copy_s: Callable[[int, bool], float]) -> dict[str, float]:
    """The per-step pieces: embedding + head (one row), routing read-back, one table upload."""
    b = _rows_buffers(model, 1, 0)

    def embed_head() -> None:
        model.embed(b)
        model.head(b)

    routing_bytes = full.layers * full.top_k * (4 + 4)            # int32 ids + float32 weights per row
    return {"embed_head_s": time_fn(embed_head), "routing_readback_s": copy_s(routing_bytes, False),
            "table_upload_s": copy_s(full.experts * 4, True)}


def calibrate_graph(spec: ModelSpec, device: torch.device, precisions: list[str], tokens: list[int],
                    rows: list[int], context: int, time_fn: Timer, copy_s: Callable[[int, bool], float],
                    log: Callable[[str], None] = print) -> GraphCalibration:
    """Measure the graph path at ``spec``'s shape on one layer (see the module docstring)."""
    one = dataclasses.replace(spec, layers=1)
    shape = attn_shape(spec)
    weights = random_weights(one, shape, device)
    tables, intercepts = [], []
    model: FastModel | None = None
    for p in precisions:
        model = static_model(one, p, weights, shape, device, max(max(rows), 8 * max(tokens)), context)
        table, icpt = measure_experts(model, p, tokens, time_fn)
        tables.append(table)
        intercepts.append(icpt)
        log(f"graph experts {p}: per expert {[f'{s * 1e6:.2f}' for s in table.seconds]} us at m={tokens}, "
            f"launch {icpt * 1e6:.1f} us")
    assert model is not None
    non_moe = measure_attention(model, rows, context, time_fn)
    log(f"graph attention block: {[f'{s * 1e6:.1f}' for s in non_moe.seconds]} us at rows={rows}, context {context}")
    parts = measure_step_fixed(model, spec, time_fn, copy_s)
    log("graph step fixed: " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in parts.items()))
    return GraphCalibration(tables, float(np.median(intercepts)) / 2, non_moe, sum(parts.values()), parts)
