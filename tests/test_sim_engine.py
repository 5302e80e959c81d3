"""Tiny scenarios with exact expected times: a 2-layer, 4-expert model on a round-number
machine (non-MoE 500 us per layer, grouped launch 100 us, +200 us per bf16 expert-token,
+100 us per int4 expert-token, 1 ms per bf16 copy). Log times are in microseconds."""

from __future__ import annotations

import numpy as np
import pytest
from moebits.core.precision import ChannelMix, register_channel_mix
from moebits.core.quality import analytic_error
from moebits.core.slabs import Refusal, SlabClass
from moebits.drive.records import pass_table, summarize
from moebits.policies.base import MissRule, demote, promote
from moebits.sim.engine import Engine, EngineOptions, InfeasibleError, PolicyError
from moebits.traces.replay import build_view
from sim_testkit import BF16_BYTES, INT4_BYTES, TINY, Scripted, TinyStatic, make_trace, round_hw

BF16 = SlabClass("bf16", BF16_BYTES, 2)
LOG = EngineOptions(log=True, check=True)


def run(policy, seqs, *, prompt=1, batch=1, budget=10**6, hw=None, options=LOG):
    view = build_view(make_trace(TINY, seqs, prompt), batch)
    eng = Engine(view, TINY, hw or round_hw(), policy, budget, options=options)
    return eng, eng.run()


def test_demand_fetch_stalls_for_the_copy():
    seqs = [[[[0], [1]], [[2], [1]]]]  # one sequence: token 0 (prefill), token 1 (decode)
    script = {1: [promote(1, 1, "bf16")], 2: [demote(0, 0, "bf16"), promote(0, 2, "bf16")]}
    pol = Scripted([BF16], [promote(0, 0, "bf16")], script, MissRule.STALL)
    eng, res = run(pol, seqs)
    assert eng.log == [
        ("serve", 0, 500.0, 500.0, 800.0, ("L0E0@bf16",)),
        ("promote", "L1E1", "bf16", 1300.0, 2300.0),
        ("serve", 1, 1300.0, 2300.0, 2600.0, ("L1E1@bf16",)),
        ("demote", "L0E0", "bf16", 3100.0, 3100.0),
        ("promote", "L0E2", "bf16", 3100.0, 4100.0),
        ("serve", 2, 3100.0, 4100.0, 4400.0, ("L0E2@bf16",)),
        ("serve", 3, 4900.0, 4900.0, 5200.0, ("L1E1@bf16",)),
    ]
    s = summarize(res)
    assert s["ttft_ms"] == pytest.approx(2.6) and s["tpot_ms_p50"] == pytest.approx(2.6)
    assert s["stall_s"] == pytest.approx(2e-3)
    assert (s["h2d_bytes"], s["promotions"], s["demotions"], s["hbm_peak_bytes"]) == (2 * BF16_BYTES, 2, 1, 2 * BF16_BYTES)
    assert s["quality_proxy"] == 0.0 and s["activations"] == {"bf16": 4, "host": 0}


SCRIPT2 = {0: [promote(0, 0, "bf16"), promote(1, 1, "bf16")]}  # two copies queue on one link
SEQS2 = [[[[0], [1]]] * 3]  # 1 prefill + 2 decode tokens, always L0E0 and L1E1
PLAN2 = [SlabClass("bf16", BF16_BYTES, 2), SlabClass("int4", INT4_BYTES, 2)]
INIT2 = [promote(0, 0, "int4"), promote(1, 1, "int4")]


def test_serve_lower_serves_int4_while_bf16_copies_queue():
    eng, res = run(Scripted(PLAN2, INIT2, SCRIPT2, MissRule.SERVE_LOWER), SEQS2)
    assert eng.log == [
        ("promote", "L0E0", "bf16", 500.0, 1500.0),
        ("promote", "L1E1", "bf16", 500.0, 2500.0),  # FIFO: waits for the first copy
        ("serve", 0, 500.0, 500.0, 700.0, ("L0E0@int4",)),
        ("serve", 1, 1200.0, 1200.0, 1400.0, ("L1E1@int4",)),  # bf16 still in flight: serve lower
        ("serve", 2, 1900.0, 1900.0, 2200.0, ("L0E0@bf16",)),
        ("serve", 3, 2700.0, 2700.0, 3000.0, ("L1E1@bf16",)),
        ("serve", 4, 3500.0, 3500.0, 3800.0, ("L0E0@bf16",)),
        ("serve", 5, 4300.0, 4300.0, 4600.0, ("L1E1@bf16",)),
    ]
    s = summarize(res)
    assert s["stall_s"] == 0.0
    assert s["quality_proxy"] == pytest.approx(2 * analytic_error("int4", TINY.hidden) / 6)
    assert s["activations"] == {"bf16": 4, "int4": 2, "host": 0}


def test_stall_waits_for_the_higher_copy_in_flight():
    eng, res = run(Scripted(PLAN2, INIT2, SCRIPT2, MissRule.STALL), SEQS2)
    serves = [e for e in eng.log if e[0] == "serve"]
    assert serves == [
        ("serve", 0, 500.0, 1500.0, 1800.0, ("L0E0@bf16",)),
        ("serve", 1, 2300.0, 2500.0, 2800.0, ("L1E1@bf16",)),
        ("serve", 2, 3300.0, 3300.0, 3600.0, ("L0E0@bf16",)),
        ("serve", 3, 4100.0, 4100.0, 4400.0, ("L1E1@bf16",)),
        ("serve", 4, 4900.0, 4900.0, 5200.0, ("L0E0@bf16",)),
        ("serve", 5, 5700.0, 5700.0, 6000.0, ("L1E1@bf16",)),
    ]
    assert summarize(res)["stall_s"] == pytest.approx(1.2e-3)


def test_host_rule_computes_missing_experts_on_the_host():
    pol = Scripted([SlabClass("bf16", BF16_BYTES, 1)], [promote(0, 0, "bf16")], {}, MissRule.HOST)
    eng, res = run(pol, [[[[0], [1]]]])
    io_us = 2 * TINY.hidden / BF16_BYTES * 1000  # 128 B of activations each way
    back = round(1300.0 + io_us + 1050.0 + io_us, 6)  # d2h, 50 us + 1 ms of host expert, h2d
    assert eng.log == [
        ("serve", 0, 500.0, 500.0, 800.0, ("L0E0@bf16",)),
        ("serve", 1, 1300.0, 1300.0, back, ("L1E1@host",)),
    ]
    s = summarize(res)
    assert s["host_wait_s"] == pytest.approx((back - 1300.0) * 1e-6)
    assert (s["h2d_bytes"], s["d2h_bytes"], s["h2d_weight_bytes"]) == (128, 128, 0)
    assert s["activations"] == {"bf16": 1, "host": 1}


def test_refusals_are_reported_and_a_missing_copy_names_policy_and_expert():
    script = {0: [demote(0, 3, "bf16")], 1: [promote(1, 1, "bf16")]}
    pol = Scripted([SlabClass("bf16", BF16_BYTES, 1)], [promote(0, 0, "bf16")], script, MissRule.STALL)
    with pytest.raises(PolicyError, match=r"policy test: expert L1E1 is needed but has no copy"):
        run(pol, [[[[0], [1]]]])
    assert [(str(a.key), a.kind.name, r) for a, r in pol.refused] == [
        ("L0E3", "DEMOTE", Refusal.NOT_PRESENT), ("L1E1", "PROMOTE", Refusal.NO_FREE_SLAB)]


def test_batch_shares_a_step_and_needs_the_union_of_experts():
    seqs = [[[[0], [1]]], [[[0], [2]]]]  # two sequences decoded together
    eng, res = run(TinyStatic(["bf16"]), seqs, batch=2)
    assert [e for e in eng.log if e[0] == "serve"] == [
        ("serve", 0, 500.0, 500.0, 1000.0, ("L0E0@bf16",)),  # one expert, 2 tokens: 100 + 2 x 200
        ("serve", 1, 1500.0, 1500.0, 2000.0, ("L1E1@bf16", "L1E2@bf16")),  # two experts, 1 token each
    ]
    assert pass_table(res)["tokens"].tolist() == [2]


def test_budget_too_small_for_a_layer_step_stops_before_simulating():
    seqs = [[[[0], [1]]], [[[2], [3]]]]
    with pytest.raises(InfeasibleError, match=r"needs 2 experts at once; raise budget_gb to at least"):
        run(Scripted([SlabClass("bf16", BF16_BYTES, 1)], [], {}, MissRule.STALL), seqs, batch=2)


def test_static_fast_path_matches_the_general_loop_bit_for_bit():
    rng = np.random.default_rng(3)
    seqs = [[[[int(rng.integers(4))] for _ in range(2)] for _ in range(6)] for _ in range(3)]
    results = []
    for fast in (True, False):
        _, res = run(TinyStatic(["bf16", "int4"], seed=1), seqs, prompt=2, batch=2,
                     options=EngineOptions(fast=fast))
        results.append(res)
    a, b = results
    for name in ("end_s", "stall_s", "err", "act", "snaps"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_channel_mix_is_one_more_precision():
    mix = register_channel_mix(ChannelMix("int4", "bf16", fraction=0.25, significance_share=0.5))
    plan = [SlabClass(mix, INT4_BYTES + BF16_BYTES // 4, 2)]
    eng, res = run(Scripted(plan, [promote(0, 0, mix), promote(1, 1, mix)], {}), [[[[0], [1]]]])
    # two launches (200 us) + int4 100 us + 0.25 x bf16 200 us per expert-token
    assert [e[2:5] for e in eng.log] == [(500.0, 500.0, 850.0), (1350.0, 1350.0, 1700.0)]
    assert summarize(res)["quality_proxy"] == pytest.approx(0.5 * analytic_error("int4", TINY.hidden))


def test_sensitivity_table_replaces_the_analytic_error():
    from moebits.core.quality import SensitivityTable

    table = SensitivityTable(np.array([0]), np.array([0]), ["int4"], np.array([1.0]))
    view = build_view(make_trace(TINY, [[[[0], [1]]]]), 1)
    eng = Engine(view, TINY, round_hw(), TinyStatic(["int4"]), 10**6, sensitivity=table)
    assert eng.policy.ctx.sensitivity is table
    # L0E0 served at int4 with the table's error 1.0, L1E1 with the analytic default
    assert summarize(eng.run())["quality_proxy"] == pytest.approx((1.0 + analytic_error("int4", TINY.hidden)) / 2)
