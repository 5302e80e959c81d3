"""The runtime on a CUDA GPU: asynchronous promotion on the copy stream, the slab pool's views
in the grouped kernels (bf16, fp8, int4), trace replay and the transformers hook. Marked ``gpu``;
skipped where there is no CUDA device."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from moebits.core.keys import ExpertKey  # noqa: E402
from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.core.slabs import SlabClass, SlabLedger  # noqa: E402
from moebits.policies.base import build_policy  # noqa: E402
from moebits.policies.dynaexq import DynaExqConfig  # noqa: E402
from moebits.policies.lru_offload import LruOffloadConfig  # noqa: E402
from moebits.policies.static_uniform import StaticUniformConfig  # noqa: E402
from moebits.runtime import hf  # noqa: E402
from moebits.runtime.engine import RuntimeEngine  # noqa: E402
from moebits.runtime.host_store import HostStore, random_weights  # noqa: E402
from moebits.runtime.moe_layer import reference_moe  # noqa: E402
from moebits.runtime.pool import DevicePool  # noqa: E402
from moebits.runtime.promote import Promoter  # noqa: E402
from moebits.runtime.replay import replay  # noqa: E402
from sim_testkit import TinyStatic  # noqa: E402

SPEC = ModelSpec("gpu", layers=2, experts=16, top_k=4, hidden=256, expert_intermediate=256, vocab_size=512)


@pytest.fixture(scope="module")
def store() -> HostStore:
    s = HostStore(SPEC).fill_bf16(random_weights(SPEC, seed=1, device="cuda", std=0.05))
    assert s.pin and s.rows["bf16"].is_pinned()
    return s.require(["fp8", "int8", "int4"])


def test_promotions_land_asynchronously_and_exactly(store: HostStore) -> None:
    ledger = SlabLedger([SlabClass("bf16", SPEC.expert_bytes("bf16"), 8)], 10**9)
    pool = DevicePool(ledger, SPEC, "cuda")
    promoter = Promoter(pool, store, ledger)
    keys = [ExpertKey(1, e) for e in range(8)]
    copies = [promoter.submit(k, "bf16", ledger.begin_load(k, "bf16")) for k in keys]  # type: ignore[arg-type]
    assert all(ledger.is_loading(k, "bf16") for k in keys)                            # not READY before a poll
    promoter.wait(copies[3])
    assert all(ledger.is_ready(k, "bf16") for k in keys[:4])
    promoter.drain()
    for c in copies:
        assert torch.equal(pool.slab_bytes(c.slab).cpu(), store.row(c.key, "bf16"))


def test_static_mixed_engine_matches_the_served_reference(store: HostStore) -> None:
    policy = TinyStatic(["bf16", "fp8", "int8", "int4"], seed=3)
    engine = RuntimeEngine(SPEC, policy, 10**9, store, device="cuda")
    assert engine.defer_routing
    served = {(layer, e): p for layer, e, p in policy._choice()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, SPEC.hidden, generator=g)
    ids = torch.rand(6, SPEC.experts, generator=g).topk(SPEC.top_k, dim=1).indices
    w = torch.softmax(torch.randn(6, SPEC.top_k, generator=g), -1)
    engine.begin_pass(0, 0)
    y = engine.layer_step(1, x.cuda().bfloat16(), ids.cuda(), w.cuda())
    engine.end_pass()
    gu = torch.stack([store.layer_stacks(served[(1, e)], 1)[0].dequantize(torch.tensor([e]), torch.float64)[0]
                      for e in range(SPEC.experts)])
    dn = torch.stack([store.layer_stacks(served[(1, e)], 1)[1].dequantize(torch.tensor([e]), torch.float64)[0]
                      for e in range(SPEC.experts)])
    ref = reference_moe(x.bfloat16().double(), ids, w.double(), gu, dn)
    assert float((y.cpu().double() - ref).norm() / ref.norm()) < 0.05                 # bf16/fp8 activations
    rec = engine.finish()
    assert len(rec.err) == 1 and int(rec.act.sum()) == 6 * SPEC.top_k   # one layer step; act: [S, P + 1]


@pytest.mark.parametrize("cfg", [LruOffloadConfig(), DynaExqConfig(min_residency=1)], ids=["lru", "dynaexq"])
def test_replay_on_gpu(store: HostStore, cfg) -> None:
    from moebits.traces.replay import build_view
    from moebits.traces.zipf import synth_trace

    view = build_view(synth_trace(SPEC, np.random.default_rng(0), seqs=2, prompt_tokens=8, decode_tokens=16), 1)
    budget = int(SPEC.all_experts_bytes("int4") * 1.8)
    engine = RuntimeEngine(SPEC, build_policy(cfg), budget, store, device="cuda")
    rec = replay(engine, view)
    assert rec.layer_steps == view.layer_steps and engine.counts["promotions"] > 0
    assert all(t >= 0 for t in np.diff(rec.end_s)) and engine.ledger.used_bytes <= budget
    assert not engine.promoter.pending and not engine.fences.open


def test_hf_model_on_gpu_matches_grouped_mm() -> None:
    spec = ModelSpec("Qwen3-30B-A3B", layers=2, experts=16, top_k=4, hidden=256, expert_intermediate=256,
                     vocab_size=512)
    model, weights = hf.build_random_model(spec, device="cuda", dtype=torch.bfloat16, seed=1, full_hidden=2048)
    store = HostStore(spec).fill_bf16(weights)
    ids = torch.randint(0, spec.vocab_size, (1, 12), device="cuda")
    outs = {}
    for p in ("bf16", "int4"):
        engine = RuntimeEngine(spec, build_policy(StaticUniformConfig(precision=p)), spec.all_experts_bytes(p), store,
                               device="cuda")
        hf.install(model, hf.HFRuntime(spec, store, engine, "cuda"))
        outs[p], _ = hf.forward_logits(model, ids, False, keep=12)
    lay, e = store.layouts["bf16"], spec.experts
    for layer, m in enumerate(hf.experts_modules(model)):
        raw = store.rows["bf16"][layer * e : (layer + 1) * e].cuda()
        gu, dn = lay.stacks(raw.view(-1), 0, e, lay.nbytes)
        m.gate_up_proj = torch.nn.Parameter(gu.weight.contiguous(), requires_grad=False)
        m.down_proj = torch.nn.Parameter(dn.weight.contiguous(), requires_grad=False)
    hf.set_experts_implementation(model, "grouped_mm")
    ref, _ = hf.forward_logits(model, ids, False, keep=12)
    rel = {p: float((o.float() - ref.float()).norm() / ref.float().norm()) for p, o in outs.items()}
    assert rel["bf16"] < 0.02 and rel["bf16"] < rel["int4"] < 0.3, rel


def test_a_bf16_class_of_more_than_1024_slabs_serves(store: HostStore) -> None:
    """torch._grouped_mm takes at most 1024 groups: bigger classes compute their active slots only."""
    spec = ModelSpec("big", layers=70, experts=16, top_k=4, hidden=128, expert_intermediate=128)
    big = HostStore(spec).fill_bf16(random_weights(spec, seed=2, device="cuda", std=0.05))
    engine = RuntimeEngine(spec, build_policy(StaticUniformConfig(precision="bf16")),
                           spec.all_experts_bytes("bf16"), big, device="cuda")
    assert engine.pool.region["bf16"].count == 1120
    x = torch.randn(3, spec.hidden, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4], [15, 14, 13, 12]], device="cuda")
    w = torch.full((3, 4), 0.25, device="cuda")
    y = engine.layer_step(69, x, ids, w)
    gu, dn = big.layer_stacks("bf16", 69)
    ref = reference_moe(x.double().cpu(), ids.cpu(), w.double().cpu(), gu.weight.double(), dn.weight.double())
    assert float((y.cpu().double() - ref).norm() / ref.norm()) < 0.02
