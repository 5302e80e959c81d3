"""The runtime adapter of the policy seam on CPU: what it computes, and the rules it serves by
(miss rules, READY-only serving, refusals), against float64 references of the served weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.core.slabs import Refusal, SlabClass  # noqa: E402
from moebits.drive.records import COUNTERS  # noqa: E402
from moebits.policies.base import MissRule, build_policy, demote, promote  # noqa: E402
from moebits.runtime.engine import PolicyError, RuntimeEngine, routing_of  # noqa: E402
from moebits.runtime.host_store import HostStore, random_weights  # noqa: E402
from moebits.runtime.moe_layer import reference_moe  # noqa: E402
from moebits.runtime.replay import assignment  # noqa: E402
from sim_testkit import Scripted, TinyStatic  # noqa: E402

SPEC = ModelSpec("eng", layers=2, experts=4, top_k=2, hidden=128, expert_intermediate=128)
BF16, INT4 = SPEC.expert_bytes("bf16"), SPEC.expert_bytes("int4")


@pytest.fixture(scope="module")
def store() -> HostStore:
    return HostStore(SPEC, pin=False).fill_bf16(random_weights(SPEC, seed=2, std=0.05)).require(["int4", "int8"])


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(seed: int, tokens: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, SPEC.hidden, generator=g)
    ids = torch.rand(tokens, SPEC.experts, generator=g).topk(SPEC.top_k, dim=1).indices
    w = torch.softmax(torch.randn(tokens, SPEC.top_k, generator=g), -1)
    return x, ids, w


def _reference(store: HostStore, layer: int, x, ids, w, served: dict[int, str]) -> torch.Tensor:
    """float64 per-expert loop over the dequantized host copies of each expert's served precision."""
    gu = torch.stack([store.layer_stacks(served[e], layer)[0].dequantize(torch.tensor([e]), torch.float64)[0]
                      for e in range(SPEC.experts)])
    dn = torch.stack([store.layer_stacks(served[e], layer)[1].dequantize(torch.tensor([e]), torch.float64)[0]
                      for e in range(SPEC.experts)])
    return reference_moe(x.double(), ids, w.double(), gu, dn)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def _served_mix(engine: RuntimeEngine) -> list[list[int]]:
    return np.asarray(engine.rec.act).reshape(-1, len(engine.precisions) + 1).tolist()


def test_static_mixed_layer_matches_the_served_reference(store: HostStore) -> None:
    policy = TinyStatic(["bf16", "int8", "int4"], seed=4)
    engine = RuntimeEngine(SPEC, policy, 10**7, store)
    served = {(layer, e): p for layer, e, p in policy._choice()}
    for layer in range(SPEC.layers):
        x, ids, w = _inputs(layer)
        y = engine.layer_step(layer, x, ids, w)
        ref = _reference(store, layer, x, ids, w, {e: served[(layer, e)] for e in range(SPEC.experts)})
        assert _rel(y, ref) < 1e-5
    assert engine.counts == {"promotions": 0, "prefetches": 0, "demotions": 0, "refusals": 0, "bypasses": 0}


def test_serve_lower_serves_the_resident_copy_until_the_promotion_lands(store: HostStore) -> None:
    plan = [SlabClass("bf16", BF16, 1), SlabClass("int4", INT4, 8)]
    initial = [promote(layer, e, "int4") for layer in range(2) for e in range(4)]
    engine = RuntimeEngine(SPEC, Scripted(plan, initial, {0: [promote(0, 1, "bf16")]}, MissRule.SERVE_LOWER),
                           10**7, store)
    ids = torch.tensor([[1, 2]])
    x, _, w = _inputs(1, 1)
    y0 = engine.layer_step(0, x, ids, w)                                   # step 0: bf16 copy in flight
    assert _rel(y0, _reference(store, 0, x, ids, w, dict.fromkeys(range(4), "int4"))) < 1e-5
    engine.layer_step(1, x, ids, w)
    y2 = engine.layer_step(0, x, ids, w)                                   # next pass: READY, served bf16
    assert _rel(y2, _reference(store, 0, x, ids, w, {0: "int4", 1: "bf16", 2: "int4", 3: "int4"})) < 1e-5
    assert _served_mix(engine) == [[0, 2, 0], [0, 2, 0], [1, 1, 0]]
    assert engine.rec.stall_s == [0.0, 0.0, 0.0]


def test_stall_waits_for_the_demand_fetch_and_refusals_go_back(store: HostStore) -> None:
    plan = [SlabClass("bf16", BF16, 2)]
    script = {0: [promote(0, 1, "bf16"), promote(0, 2, "bf16"), promote(0, 1, "bf16")],
              1: [demote(0, 3, "bf16"), demote(0, 2, "bf16"), promote(1, 0, "bf16")]}
    policy = Scripted(plan, [], script, MissRule.STALL)
    engine = RuntimeEngine(SPEC, policy, 10**7, store)
    x, _, w = _inputs(2, 1)
    y = engine.layer_step(0, x, torch.tensor([[1, 2]]), w)
    assert _rel(y, _reference(store, 0, x, torch.tensor([[1, 2]]), w, dict.fromkeys(range(4), "bf16"))) < 1e-5
    with pytest.raises(PolicyError, match="L1E1 is needed but has no copy"):
        engine.layer_step(1, x, torch.tensor([[0, 1]]), w)
    assert policy.refused == [(promote(0, 1, "bf16"), Refusal.IN_FLIGHT),
                              (demote(0, 3, "bf16"), Refusal.NOT_PRESENT)]
    assert engine.counts["promotions"] == 3 and engine.counts["demotions"] == 1


def test_host_rule_computes_missing_experts_on_the_host(store: HostStore) -> None:
    plan = [SlabClass("int4", INT4, 1)]
    engine = RuntimeEngine(SPEC, Scripted(plan, [promote(0, 0, "int4")], {}, MissRule.HOST), 10**7, store)
    x, _, w = _inputs(3, 3)
    ids = torch.tensor([[0, 2], [2, 3], [1, 0]])
    y = engine.layer_step(0, x, ids, w)
    assert _rel(y, _reference(store, 0, x, ids, w, {0: "int4", 1: "bf16", 2: "bf16", 3: "bf16"})) < 1e-5
    assert _served_mix(engine) == [[2, 4]]
    assert engine.host_d2h_bytes == 3 * SPEC.hidden * 4 and engine.snapshot()[1] == engine.host_d2h_bytes


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 9), k=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_replay_assignment_keeps_the_counts_and_never_repeats_an_expert(tokens: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(8, size=k, replace=False) for _ in range(tokens)])
    gate = rng.random((tokens, k)).astype(np.float32)
    experts, counts, sums = routing_of(torch.from_numpy(ids), torch.from_numpy(gate), 8)
    got_ids, got_w = assignment(experts, counts, sums, tokens, k)
    assert all(len(set(row)) == k for row in got_ids.tolist())
    e2, c2, s2 = routing_of(torch.from_numpy(got_ids), torch.from_numpy(got_w), 8)
    assert e2.tolist() == experts.tolist() and c2.tolist() == counts.tolist()
    np.testing.assert_allclose(s2, sums, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_bypassed_experts_stream_at_the_staging_precision(store: HostStore, precision: str) -> None:
    """lru_offload with one slot per layer and a staging slab: a step needing 4 experts admits
    the lowest id and streams the other 3; the output matches the float64 reference of those
    copies, and the counters show the streamed bytes."""
    from moebits.policies.lru_offload import LruOffloadConfig
    from moebits.policies.offload_cache import InitialFill

    policy = build_policy(LruOffloadConfig(precision=precision, initial_fill=InitialFill.EMPTY, staging_experts=2))
    engine = RuntimeEngine(SPEC, policy, policy.per_layer_budget_bytes(SPEC, 1), store)
    x, _, w = _inputs(4, 2)
    ids = torch.tensor([[0, 1], [2, 3]])
    y = engine.layer_step(0, x, ids, w)
    assert _rel(y, _reference(store, 0, x, ids, w, dict.fromkeys(range(4), precision))) < 1e-5
    snap = dict(zip(COUNTERS, engine.snapshot(), strict=True))
    nbytes = SPEC.expert_bytes(precision)
    assert (snap["bypasses"], snap["promotions"], snap["h2d_bytes"]) == (3, 1, 4 * nbytes)
    assert (engine.rec.hits, engine.rec.requests) == ([0], [4])
