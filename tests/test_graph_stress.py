"""Promote and demote continuously while decoding; every layer's MoE output against the table's state.

CPU: eager steps, synchronous copies (CI). CUDA (``gpu``): one captured whole-step graph replayed
after every boundary, copies on the copy stream, fences before slab reuse.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import get_model_spec
from moebits.core.slabs import SlabClass, SlabLedger
from moebits.runtime import hf
from moebits.runtime.expert_mover import CudaStreams, ExpertMover, SyncStreams
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights, StepBuffers
from moebits.runtime.graph_serve import GraphMode, StepRunner
from moebits.runtime.host_store import HostStore
from moebits.runtime.pool import DevicePool, slab_layout
from moebits.runtime.residency import ResidencyTable, load_layer, serve_reference

pytest.importorskip("transformers")


def stress(device: str, steps: int) -> float:
    spec = dataclasses.replace(get_model_spec("Qwen3-30B-A3B"), layers=2, experts=8, top_k=2, hidden=256,
                               expert_intermediate=128, vocab_size=256)
    model, weights = hf.build_random_model(spec, device=device, dtype=torch.bfloat16, full_hidden=2048, std=0.05)
    lay = {p: slab_layout(p, 256, 128).nbytes for p in ("bf16", "int4")}
    n = spec.layers * spec.experts
    ledger = SlabLedger([SlabClass("bf16", lay["bf16"], 3), SlabClass("int4", lay["int4"], n)], 1 << 26)
    pool = DevicePool(ledger, spec, device)
    table = ResidencyTable(spec.layers, spec.experts, device)
    for layer in range(spec.layers):
        load_layer(pool, table, layer, *weights(layer), "int4")
    table.flush()
    store = HostStore(spec, pin=device == "cuda", quant_device=device).fill_bf16(weights)
    cuda = device == "cuda"
    mover = ExpertMover(pool, table, store.row, CudaStreams(torch.device(device)) if cuda else SyncStreams())
    fast = FastModel(FastWeights.from_hf(model), spec, AttnShape.from_hf_config(model.config), pool, table,
                     use_triton=cuda, max_seqs=1, max_len=steps + 1)
    trace = {k: torch.zeros(spec.layers, 1, spec.hidden, device=device) for k in ("x", "r0", "r1")}
    inner = fast.experts

    def traced(i: int, b: StepBuffers) -> None:
        trace["x"][i].copy_(b.xn)
        trace["r0"][i].copy_(b.r)
        inner(i, b)
        trace["r1"][i].copy_(b.r)

    fast.experts = traced  # type: ignore[method-assign]
    buf = fast.buffers(1)
    buf.set_rows(torch.tensor([1]), torch.zeros(1, dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    runner = StepRunner(fast, buf, GraphMode.WHOLE if cuda else GraphMode.EAGER)
    runner.capture()
    rng = np.random.default_rng(0)
    worst, bf16_served, promoted, demoted = 0.0, 0, 0, 0
    for t in range(steps):
        for _ in range(3):   # 3 bf16 slabs for 16 experts: demotions free slabs that promotions reuse at once
            key = ExpertKey(int(rng.integers(spec.layers)), int(rng.integers(spec.experts)))
            if ledger.is_ready(key, "bf16"):
                demoted += mover.demote(key, "bf16") is None
            else:
                promoted += mover.promote(key, "bf16") is None
        mover.boundary()
        buf.set_rows(torch.tensor([t * 5 % 256]), torch.zeros(1, dtype=torch.int32), torch.tensor([t], dtype=torch.int32))
        runner.run()
        if cuda:
            torch.cuda.synchronize()
        for i in range(spec.layers):
            ref = serve_reference(trace["x"][i].to(torch.bfloat16), buf.ids[i], buf.weights[i], table.codes[i], pool)
            got = trace["r1"][i] - trace["r0"][i]
            worst = max(worst, float((got - ref).norm() / ref.norm()))
            bf16_served += int(((table.codes[i][buf.ids[i].long()] & 7) == 0).sum())
    assert promoted >= steps // 2 and demoted >= steps // 4, (promoted, demoted)
    assert bf16_served > 0, "no step ever served a promoted copy"
    return worst


def test_stress_cpu():
    assert stress("cpu", 16) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stress_cuda_graph():
    assert stress("cuda", 40) < 2e-3
