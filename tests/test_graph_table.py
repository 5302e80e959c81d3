"""The whole-pass graph table: the fit recovers known costs, and the simulator prices passes with it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from moebits.core.hardware import GraphPassTable  # noqa: E402
from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.core.precision import ChannelMix, register_channel_mix  # noqa: E402
from moebits.runtime.pass_designs import fit_pass_table  # noqa: E402
from moebits.sim.kernels import KernelModel  # noqa: E402
from test_fidelity import graph_profile  # noqa: E402,F401  (fixture)

SPEC = ModelSpec("t", layers=2, experts=16, top_k=4, hidden=128, expert_intermediate=128, vocab_size=64)
TRUE = {"fixed": 20e-6, "layer": 5e-6, "ctx": 3e-9, "tok": {"bf16": 2e-6, "int4": 1e-6}, "cnt": {"bf16": 0.5e-6, "int4": 0.2e-6}}


def _rows(rng: np.random.Generator) -> list[dict]:
    out = []
    for T in (1, 4):
        for _ in range(12):
            L, ctx = int(rng.choice([2, 4])), int(rng.choice([16, 200]))
            tok = {p: float(rng.integers(0, 4 * T * L + 1)) for p in ("bf16", "int4")}
            cnt = {p: float(rng.integers(0, tok[p] + 1)) for p in ("bf16", "int4")}
            sec = TRUE["fixed"] + L * (TRUE["layer"] + ctx * TRUE["ctx"]) + sum(
                tok[p] * TRUE["tok"][p] + cnt[p] * TRUE["cnt"][p] for p in tok)
            out.append({"rows": T, "context": ctx, "layers": L, "tag": "decode", "seconds": sec,
                        **{f"tok_{p}": v for p, v in tok.items()}, **{f"cnt_{p}": v for p, v in cnt.items()}})
    return out


def test_fit_recovers_known_costs() -> None:
    t = fit_pass_table(_rows(np.random.default_rng(0)), ["bf16", "int4"], SPEC, prefill=False)
    assert t.rows == [1.0, 4.0] and t.fit["loo_err_p95"] < 1e-9
    np.testing.assert_allclose(t.fixed_s, [TRUE["fixed"]] * 2, rtol=1e-6)
    np.testing.assert_allclose(t.layer_ctx_s, [TRUE["ctx"]] * 2, rtol=1e-6)
    for p in ("bf16", "int4"):
        np.testing.assert_allclose(t.token_s[p], [TRUE["tok"][p]] * 2, rtol=1e-6)
        np.testing.assert_allclose(t.expert_s[p], [TRUE["cnt"][p]] * 2, rtol=1e-6)


def test_kernel_model_prices_steps_from_the_table(graph_profile) -> None:  # noqa: F811
    table = GraphPassTable(128, 128, 16, 4, False, [1.0, 4.0], [20e-6, 40e-6], [5e-6, 7e-6], [3e-9, 3e-9],
                           {"bf16": [2e-6, 1e-6], "int4": [1e-6, 0.5e-6]}, {"bf16": [0.5e-6, 0.5e-6], "int4": [0.2e-6, 0.2e-6]})
    hw = graph_profile.__class__(**{**graph_profile.__dict__, "graph_tables": [table]})
    km = KernelModel(hw, SPEC, ["bf16", "int4"])
    base, tok_s, cnt_s = km.graph_steps(np.array([1, 2, 4]), np.zeros(3, bool), np.array([10, 10, 10]),
                                        np.array([True, False, False]))
    np.testing.assert_allclose(base, [20e-6 + 5e-6 + 30e-9, 5e-6 + 2e-6 / 3 + 30e-9, 7e-6 + 30e-9])
    np.testing.assert_allclose(tok_s[:, 0], [2e-6, 2e-6 - 1e-6 / 3, 1e-6])
    with pytest.raises(ValueError, match="no graph table for prefill"):
        km.graph_steps(np.array([8]), np.ones(1, bool), np.zeros(1), np.ones(1, bool))


def test_graph_table_prices_a_channel_mix_from_its_two_precisions(graph_profile) -> None:  # noqa: F811
    # dynamo's partial promotions: a mix has no column of its own; it costs low + fraction * high
    table = GraphPassTable(128, 128, 16, 4, False, [1.0, 4.0], [20e-6, 40e-6], [5e-6, 7e-6], [0.0, 0.0],
                           {"bf16": [2e-6, 1e-6], "int4": [1e-6, 0.5e-6]}, {"bf16": [0.5e-6, 0.5e-6], "int4": [0.2e-6, 0.2e-6]})
    hw = graph_profile.__class__(**{**graph_profile.__dict__, "graph_tables": [table]})
    mix = register_channel_mix(ChannelMix("int4", "bf16", 0.25, 0.5))
    km = KernelModel(hw, SPEC, ["int4", mix])
    _, tok_s, cnt_s = km.graph_steps(np.array([1, 4]), np.zeros(2, bool), np.zeros(2), np.array([True, False]))
    np.testing.assert_allclose(tok_s[:, 1], [1e-6 + 0.25 * 2e-6, 0.5e-6 + 0.25 * 1e-6])
    np.testing.assert_allclose(cnt_s[:, 1], [0.2e-6 + 0.25 * 0.5e-6] * 2)
    no_bf16 = GraphPassTable(**{**table.__dict__, "token_s": {"int4": [1e-6, 0.5e-6]}, "expert_s": {"int4": [0.2e-6, 0.2e-6]}})
    hw_int4 = graph_profile.__class__(**{**graph_profile.__dict__, "graph_tables": [no_bf16]})
    with pytest.raises(ValueError, match=r"graph table has no \['bf16'\]"):
        KernelModel(hw_int4, SPEC, ["int4", mix]).graph_steps(np.array([1]), np.zeros(1, bool), np.zeros(1), np.ones(1, bool))


def test_a_table_measured_with_the_mix_as_a_class_prices_it_directly(graph_profile) -> None:  # noqa: F811
    """The fused kernels serve a channel mix as a class of its own: a table measured with it (designs of
    ``int4,<mix>``) is chosen over one with its two parts, and its own column prices it (no composition)."""
    mix = register_channel_mix(ChannelMix("int2", "int8", 0.1, 0.5))
    parts = GraphPassTable(128, 128, 16, 4, False, [1.0], [9e-6], [0.0], [0.0], {p: [1e-6] for p in ("int8", "int4", "int2")},
                           {p: [0.0] for p in ("int8", "int4", "int2")}, classes=["int8", "int4", "int2"])
    own = GraphPassTable(128, 128, 16, 4, False, [1.0], [7e-6], [0.0], [0.0], {"int4": [1e-6], mix: [3e-6]},
                         {"int4": [0.0], mix: [0.5e-6]}, classes=["int4", mix])
    for tables in ([parts, own], [own, parts]):
        hw = graph_profile.__class__(**{**graph_profile.__dict__, "graph_tables": tables})
        base, tok_s, cnt_s = KernelModel(hw, SPEC, ["int4", mix]).graph_steps(
            np.array([1]), np.zeros(1, bool), np.zeros(1), np.ones(1, bool))
        np.testing.assert_allclose([base[0], tok_s[0, 1], cnt_s[0, 1]], [7e-6, 3e-6, 0.5e-6])
    hw = graph_profile.__class__(**{**graph_profile.__dict__, "graph_tables": [parts]})   # no such table: composed
    _, tok_s, _ = KernelModel(hw, SPEC, ["int4", mix]).graph_steps(np.array([1]), np.zeros(1, bool), np.zeros(1),
                                                                  np.ones(1, bool))
    np.testing.assert_allclose(tok_s[0, 1], 1e-6 + 0.1 * 1e-6)


def test_the_table_of_the_pools_class_set_is_chosen(graph_profile) -> None:  # noqa: F811
    """The fused kernels are compiled for the precisions a pool holds: exact class set first, else the
    smallest measured superset; a run whose precisions no table covers gets none."""
    def table(classes: list[str], fixed: float) -> GraphPassTable:
        return GraphPassTable(128, 128, 16, 4, False, [1.0], [fixed], [0.0], [0.0], {p: [0.0] for p in classes},
                              {p: [0.0] for p in classes}, classes=classes)

    hw = graph_profile.__class__(**{**graph_profile.__dict__, "graph_tables": [
        table(["bf16", "int8", "int4"], 3.0), table(["int4"], 1.0), table(["bf16", "int4"], 2.0)]})
    assert hw.graph_table(SPEC, False, ["int4"]).fixed_s == [1.0]
    assert hw.graph_table(SPEC, False, ["bf16", "int4"]).fixed_s == [2.0]
    assert hw.graph_table(SPEC, False, ["int8"]).fixed_s == [3.0]
    assert hw.graph_table(SPEC, False, ["int2"]) is None


def test_designs_like_a_policy_put_the_hottest_experts_at_the_highest_precision() -> None:
    """Half the designs route with skew and place the hottest experts of each layer at precision 0 (the shares
    in order); the rest draw each expert's precision independently. Every design stays a valid routing."""
    from moebits.runtime.pass_designs import _by_heat, random_design

    rng = np.random.default_rng(3)
    ids = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])   # expert 0: 4 rows, 1: 2, 2 and 3: 1 each
    serve = _by_heat(ids, np.array([0.25, 0.75]), 8, rng)
    assert serve.tolist().count(0) == 2 and serve[0] == 0 and serve[1] == 0   # the two hottest at precision 0
    assert _by_heat(ids, np.array([0.0, 1.0]), 8, rng).tolist() == [1] * 8
    for _ in range(20):
        d = random_design(rng, SPEC, rows=4, context=16, n_prec=2)
        assert d.ids.shape == (SPEC.layers, 4, SPEC.top_k) and d.serve.shape == (SPEC.layers, SPEC.experts)
        assert all(len(set(row)) == SPEC.top_k for layer in d.ids for row in layer.tolist())   # k distinct experts
        assert set(np.unique(d.serve)) <= {0, 1} and np.allclose(d.weights.sum(-1), 1.0, atol=1e-5)
