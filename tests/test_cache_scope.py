"""Cache scope (a cache per layer or one pool), the staging slab and bypass, the per-layer
budget, and hit counting: exact timelines on the round-number machine of tests/sim_testkit.py
(non-MoE 500 us per layer, grouped launch 100 us + 200 us per bf16 expert-token, 1 ms per
bf16 copy; log times in microseconds), and the policies that keep caches (lru_offload,
lfu_offload, oracle, hobbit, dymoe) in both scopes."""

from __future__ import annotations

import numpy as np
import pytest
from moebits.core.config import BudgetConfig, budget_bytes
from moebits.drive.records import pass_table, summarize
from moebits.policies.base import build_policy
from moebits.policies.dymoe import DyMoEConfig
from moebits.policies.hobbit import HobbitConfig
from moebits.policies.lfu_offload import LfuOffloadConfig
from moebits.policies.lru_offload import LruOffloadConfig
from moebits.policies.offload_cache import CacheScope, InitialFill, split_slots
from moebits.policies.oracle import OracleConfig
from moebits.sim.engine import Engine, EngineOptions
from moebits.traces.replay import build_view
from sim_testkit import BF16_BYTES, TINY, make_trace, round_hw

LOG = EngineOptions(log=True, check=True)


def test_split_slots() -> None:
    assert split_slots(10, 4, 8) == [3, 3, 2, 2]
    assert split_slots(10, 4, 2) == [2, 2, 2, 2]  # never more than a layer's experts
    assert split_slots(10, 3, 8, [1, 0, 1]) == [5, 0, 5]
    assert split_slots(7, 3, 8, [1, 1, 2]) == [2, 2, 3]  # 1.75, 1.75, 3.5: a tie to the lower layer
    with pytest.raises(ValueError, match="layer_shares"):
        split_slots(7, 3, 8, [1, 1])


def lru(slots_per_layer: int, staging: int, **kw) -> tuple:
    cfg = LruOffloadConfig(initial_fill=InitialFill.EMPTY, staging_experts=staging, **kw)
    policy = build_policy(cfg)
    return policy, policy.per_layer_budget_bytes(TINY, slots_per_layer)


@pytest.mark.parametrize(("staging", "end_us"), [(1, 4100.0), (2, 3800.0)])
def test_a_step_streams_its_surplus_through_the_staging_slots(staging: int, end_us: float) -> None:
    # a 3-token prefill of layer 0 needs experts 0, 1, 2; layer 0 has 1 slot: 0 is admitted
    # (promote at t1 = 500, READY at 1500, computed 1500-1800); 1 streams through slot 0
    # (link free at 1500: READY 2500, computed 2500-2800); 2 waits for a free slot: with one
    # slot, until 1 is computed (copy 2800-3800, computed 3800-4100); with two, it queues on
    # the link at t1 (copy 2500-3500, computed 3500-3800)
    policy, budget = lru(1, staging)
    view = build_view(make_trace(TINY, [[[[0], [3]], [[1], [3]], [[2], [3]]]], prompt=3), 1)
    eng = Engine(view, TINY, round_hw(), policy, budget, options=LOG)
    res = eng.run()
    assert eng.log[:2] == [("promote", "L0E0", "bf16", 500.0, 1500.0), ("serve", 0, 500.0, 1500.0, end_us, ("L0E0@bf16",))]
    s = summarize(res)
    assert (s["bypasses"], s["promotions"], s["h2d_bytes"]) == (2, 2, 4 * BF16_BYTES)  # L1E3 is the 4th copy
    assert (s["hits"], s["requests"], s["hit_rate"]) == (0, 4, 0.0)
    assert s["activations"] == {"bf16": 6, "host": 0}  # 3 tokens per layer
    assert budget == (2 * 1 + staging) * BF16_BYTES and s["hbm_peak_bytes"] == 2 * BF16_BYTES


def test_hits_are_counted_per_step_and_per_pass() -> None:
    # 1 slot per layer, layer 0 alternates 0, 0, 1, 1: hits at tokens 1 and 3; layer 1 always 3
    policy, budget = lru(1, 1)
    seqs = [[[[0], [3]], [[0], [3]], [[1], [3]], [[1], [3]]]]
    res = Engine(build_view(make_trace(TINY, seqs), 1), TINY, round_hw(), policy, budget).run()
    assert res.hits.tolist() == [0, 0, 1, 1, 0, 1, 1, 1]
    df = pass_table(res)
    assert df["hits"].tolist() == [0, 2, 1, 2] and df["requests"].tolist() == [2, 2, 2, 2]
    assert summarize(res)["hit_rate"] == pytest.approx(5 / 8)


def test_static_fast_path_counts_every_request_as_a_hit() -> None:
    from sim_testkit import TinyStatic

    seqs = [[[[0], [3]], [[2], [1]]]]
    res = Engine(build_view(make_trace(TINY, seqs), 1), TINY, round_hw(), TinyStatic(["bf16"]), 10**6).run()
    assert summarize(res)["hit_rate"] == 1.0 and res.hits.tolist() == [1, 1, 1, 1]


def test_per_layer_budget_and_scope_global() -> None:
    spec = TINY
    policy = build_policy(LruOffloadConfig(staging_experts=2))
    assert budget_bytes(0.0, BudgetConfig(experts=3), spec, lambda n: policy.per_layer_budget_bytes(spec, n)) == \
        (2 * 3 + 2) * BF16_BYTES
    with pytest.raises(ValueError, match="exceeds the 4 experts"):
        budget_bytes(0.0, BudgetConfig(experts=5), spec, lambda n: n)
    with pytest.raises(ValueError, match="scope LAYER"):
        build_policy(LruOffloadConfig(scope=CacheScope.GLOBAL)).per_layer_budget_bytes(spec, 2)
    with pytest.raises(ValueError, match="keeps no per-layer cache"):
        from moebits.policies.dynaexq import DynaExqConfig

        build_policy(DynaExqConfig()).per_layer_budget_bytes(spec, 2)
    # batch 2: layer 0 needs {0} twice, layer 1 {1, 2} then {2, 3}; 2 cache slots + 1 staging.
    # LAYER (1 slot each): L0E0 stays and hits; layer 1 admits 1 (2 bypassed), then 2 (3 bypassed).
    # GLOBAL: layer 1's 2 evicts L0E0, which then evicts 1; 2 hits at the end
    seqs = [[[[0], [1]], [[0], [3]]], [[[0], [2]], [[0], [2]]]]
    view = build_view(make_trace(TINY, seqs), 2)
    hits = {}
    for scope in CacheScope:
        p = build_policy(LruOffloadConfig(initial_fill=InitialFill.EMPTY, scope=scope, staging_experts=1))
        hits[scope] = Engine(view, TINY, round_hw(), p, 3 * BF16_BYTES, options=LOG).run().hits.tolist()
    assert hits[CacheScope.LAYER] == [0, 0, 1, 0]
    assert hits[CacheScope.GLOBAL] == [0, 0, 0, 1]


@pytest.mark.parametrize("cfg", [
    LruOffloadConfig(), LfuOffloadConfig(), OracleConfig(),
    HobbitConfig(prefetch=False, initial_fill=False), DyMoEConfig(initial_fill=False, lookahead_layers=0),
])
def test_caching_policies_run_per_layer_with_bypass(cfg) -> None:
    """A batch larger than any layer's cache: every caching policy streams the surplus, keeps
    within its pools (check mode asserts the budget) and counts hits."""
    rng = np.random.default_rng(0)
    seqs = [[[[int(rng.integers(4))], [int(rng.integers(4))]] for _ in range(6)] for _ in range(4)]
    view = build_view(make_trace(TINY, seqs, prompt=2), 4)
    policy = build_policy(cfg)
    budget = 4 * BF16_BYTES  # 2 cache slots + 2 staging at bf16 (dymoe: int8 slots, more of them)
    res = Engine(view, TINY, round_hw(), policy, budget, profile=view, options=EngineOptions(check=True)).run()
    s = summarize(res)
    assert s["requests"] == int(np.diff(view.offsets).sum()) and 0 < s["hits"] < s["requests"]
    if isinstance(cfg, LruOffloadConfig):
        assert s["bypasses"] > 0


@pytest.mark.parametrize(("name", "batch", "staging"), [("lru_offload", 1, 2), ("lru_offload", 4, 1),
                                                        ("lfu_offload", 4, 2), ("oracle", 4, 2), ("lru_offload", 1, 0)])
def test_one_class_fast_path_equals_the_general_loop(name: str, batch: int, staging: int) -> None:
    """The one-class server (sim.fastpath) against the general loop (check mode takes it),
    with stalls and bypass, on a synthetic Qwen3-shaped trace: every array equal."""
    from moebits.core.model_spec import get_model_spec
    from moebits.policies.base import policy_configs
    from moebits.traces.zipf import synth_trace

    spec = get_model_spec("Qwen3-30B-A3B")
    trace = synth_trace(spec, np.random.default_rng(1), seqs=4, prompt_tokens=6, decode_tokens=10)
    view = build_view(trace, batch)
    runs = []
    for options in (EngineOptions(), EngineOptions(check=True)):
        cfg = policy_configs()[name](initial_fill=InitialFill.EMPTY, staging_experts=staging)
        policy = build_policy(cfg)
        runs.append(Engine(view, spec, round_hw(), policy, policy.per_layer_budget_bytes(spec, 20 if staging else 48),
                           options=options).run())
    fast, general = runs
    for field in ("end_s", "stall_s", "host_wait_s", "err", "act", "snaps", "hits"):
        np.testing.assert_array_equal(getattr(fast, field), getattr(general, field), err_msg=field)
    assert summarize(fast)["bypasses"] == (0 if staging == 0 else summarize(general)["bypasses"])
