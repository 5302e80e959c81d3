"""Invariants of every run, over random models, traces, batches, budgets, slab plans and miss
rules, driven by a random but contract-abiding policy (hypothesis):

- resident bytes never exceed the budget (checked at every step in ``check`` mode, which also
  pins every served slab: pinning a copy that is not READY raises, so no step serves a
  half-copied slab);
- bytes moved host-to-device equal the sizes of the loads the pool accepted (plus host
  activations, which also cross device-to-host);
- the same seed gives the same result, bit for bit.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moebits.core.model_spec import ModelSpec
from moebits.core.slabs import SlabClass
from moebits.drive.records import summarize
from moebits.policies.base import MissRule
from moebits.sim.engine import Engine, EngineOptions
from moebits.traces.replay import build_view
from moebits.traces.zipf import synth_trace
from sim_testkit import Chaos, round_hw

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    experts = draw(st.integers(2, 6))
    spec = ModelSpec("prop", layers=draw(st.integers(1, 3)), experts=experts,
                     top_k=draw(st.integers(1, min(2, experts))), hidden=64, expert_intermediate=128, vocab_size=16)
    seed = draw(st.integers(0, 2**16))
    trace = synth_trace(spec, np.random.default_rng(seed), seqs=draw(st.integers(1, 3)),
                        prompt_tokens=draw(st.integers(1, 3)), decode_tokens=draw(st.integers(0, 5)),
                        skew=draw(st.floats(0, 2)), reuse=draw(st.floats(0, 1)))
    view = build_view(trace, draw(st.integers(1, 3)))
    rule = draw(st.sampled_from(list(MissRule)))
    precs = draw(st.lists(st.sampled_from(["bf16", "int8", "int4"]), min_size=1, max_size=3, unique=True))
    need = int(np.diff(view.offsets).max())
    floor = 1 if rule is MissRule.HOST else need * len(precs) + 2
    counts = [draw(st.integers(0, 4)) for _ in precs]
    counts[0] += max(0, floor - sum(counts))
    plan = [SlabClass(p, spec.expert_bytes(p), n) for p, n in zip(precs, counts, strict=True)]
    budget = sum(c.slab_bytes * c.count for c in plan) + draw(st.integers(0, 100_000))
    return dict(spec=spec, view=view, plan=plan, rule=rule, budget=budget, seed=seed,
                extra=draw(st.floats(0, 0.6)))


def _run(sc: dict, check: bool = True) -> tuple[Chaos, dict, object]:
    pol = Chaos(plan=sc["plan"], rule=sc["rule"], extra=sc["extra"])
    eng = Engine(sc["view"], sc["spec"], round_hw(), pol, sc["budget"], seed=sc["seed"],
                 options=EngineOptions(check=check))
    res = eng.run()
    return pol, summarize(res), res


@SETTINGS
@given(scenarios())
def test_budget_and_bytes_invariants(sc: dict) -> None:
    pol, s, _ = _run(sc)
    assert s["hbm_peak_bytes"] <= sc["budget"]
    assert s["h2d_weight_bytes"] == pol.issued_bytes
    assert s["h2d_bytes"] == s["h2d_weight_bytes"] + s["d2h_bytes"]  # host activations go both ways
    assert s["promotions"] + s["prefetches"] + s["demotions"] + s["refusals"] >= len(pol.refused)
    if sc["rule"] is not MissRule.HOST:
        assert s["activations"]["host"] == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_same_seed_same_result_bit_for_bit(sc: dict) -> None:
    _, s1, r1 = _run(sc, check=False)
    _, s2, r2 = _run(sc, check=False)
    for name in ("end_s", "stall_s", "host_wait_s", "err", "act", "snaps"):
        assert np.array_equal(getattr(r1, name), getattr(r2, name)), name
    for s in (s1, s2):
        s.pop("wall_s")
        s.pop("layer_steps_per_s")
    assert s1 == s2
