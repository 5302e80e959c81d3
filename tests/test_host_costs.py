"""The controller's host work: :class:`core.hardware.HostCosts` (schema), how the simulator charges it
on both seams (:mod:`sim.engine`, :mod:`sim.passes`), its fit (:mod:`analysis.hostcost`), the host log
a run keeps (:mod:`drive.records`) and the one the graph runtime writes (:mod:`runtime.host_log`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moebits.analysis.hostcost import (  # noqa: E402
    WARMUP_PASSES,
    HostRun,
    _lstsq,
    describe,
    fit_layer_copy,
    fit_observe,
    fit_pass,
    fit_pass_io,
    host_runs,
)
from moebits.core.hardware import GraphPassTable, HardwareProfile, HostCosts  # noqa: E402
from moebits.drive.records import COUNTERS, RunResult, load_run, pass_table, save_run, summarize  # noqa: E402
from moebits.policies.base import build_policy, policy_configs  # noqa: E402
from moebits.policies.offload_cache import CacheScope  # noqa: E402
from moebits.sim.engine import Engine  # noqa: E402
from moebits.traces.replay import build_view  # noqa: E402
from moebits.traces.zipf import synth_trace  # noqa: E402
from test_graph_parity import graph_engine, model_parts  # noqa: E402,F401  (fixture)
from test_parity import BUDGET, KNOBS, SPEC, Recording, fast_link_hw  # noqa: E402

PASS_S = 5e-3   # far longer than a simulated pass of SPEC (~50 us)


# ---- HostCosts: the schema ----

@pytest.mark.parametrize("field", ["pass_s", "copy_s", "entry_s"])
def test_negative_costs_are_an_error_naming_the_field(field: str) -> None:
    with pytest.raises(ValueError, match=f'"{field}" must be >= 0'):
        HostCosts(**{field: -1e-6})


@pytest.mark.parametrize("entry", [[1e-6], [1e-6, 2e-6, 3e-6], [-1e-6, 0.0], [0.0, -1e-9], []])
def test_malformed_observe_entries_are_an_error_naming_the_policy(entry: list[float]) -> None:
    with pytest.raises(ValueError, match=r"observe_s\['dynaexq'\]"):
        HostCosts(observe_s={"dynaexq": entry})


def test_a_scalar_observe_entry_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"observe_s\['dynaexq'\]"):
        HostCosts(observe_s={"dynaexq": 1e-5})  # type: ignore[dict-item]


def test_observe_of_an_unlisted_policy_is_free() -> None:
    hc = HostCosts(observe_s={"dynaexq": [3e-5, 2e-6]})
    assert hc.observe("dynaexq") == (3e-5, 2e-6)
    assert hc.observe("lru_offload") == (0.0, 0.0)


def test_host_costs_round_trip_through_the_yaml_schema() -> None:
    hc = HostCosts(pass_s=1e-4, copy_s=2e-5, entry_s=3e-7, observe_s={"dynaexq": [4e-5, 5e-7], "mxmoe": [1e-5, 0.0]},
                   fit={"runs": 3.0})
    hw = graph_hw(hc)
    data = hw.to_dict()
    assert data["host_costs"]["observe_s"] == {"dynaexq": [4e-5, 5e-7], "mxmoe": [1e-5, 0.0]}
    back = HardwareProfile.from_dict(json.loads(json.dumps(data)))   # through plain JSON types
    assert isinstance(back.host_costs, HostCosts) and back.host_costs == hc and back == hw
    assert HardwareProfile.from_dict(graph_hw(None).to_dict()).host_costs is None
    with pytest.raises(ValueError, match=r"unknown host costs field\(s\) \['sync_s'\]"):
        HardwareProfile.from_dict({**data, "host_costs": {**data["host_costs"], "sync_s": 1e-6}})
    with pytest.raises(ValueError, match='"copy_s" must be >= 0'):
        HardwareProfile.from_dict({**data, "host_costs": {**data["host_costs"], "copy_s": -1.0}})


def test_host_costs_compose_through_the_structured_config() -> None:
    """A ``conf/hardware/`` preset with ``host_costs`` (merged into the schema as hydra does) is checked the same."""
    from omegaconf import OmegaConf

    body = graph_hw(None).to_dict()
    hc = {"pass_s": 1e-4, "observe_s": {"dynaexq": [1e-5, 1e-6]}}
    hw = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HardwareProfile), {**body, "host_costs": hc}))
    assert isinstance(hw, HardwareProfile) and hw.host_costs == HostCosts(**hc)   # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"observe_s\['dynaexq'\]"):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HardwareProfile),
                                            {**body, "host_costs": {"observe_s": {"dynaexq": [1e-5]}}}))


# ---- the simulator ----

def _table(prefill: bool) -> GraphPassTable:
    return GraphPassTable(SPEC.hidden, SPEC.expert_intermediate, SPEC.experts, SPEC.top_k, prefill, [1.0, 4.0],
                          [20e-6, 30e-6], [5e-6, 6e-6], [0.0, 0.0], {"bf16": [2e-6, 1e-6], "int4": [1e-6, 0.5e-6]},
                          {"bf16": [1e-6, 1e-6], "int4": [0.5e-6, 0.5e-6]})


def graph_hw(hc: HostCosts | None, graph: bool = True) -> HardwareProfile:
    """The parity machine (copies land within nanoseconds) with decode and prefill graph tables of SPEC."""
    return dataclasses.replace(fast_link_hw(), graph_tables=[_table(False), _table(True)] if graph else [],
                               host_costs=hc)


@pytest.fixture(scope="module")
def view() -> Any:
    trace = synth_trace(SPEC, np.random.default_rng(3), seqs=3, prompt_tokens=4, decode_tokens=12, skew=1.2, reuse=0.4)
    return build_view(trace, 1)


def _cfg(name: str, **kw: Any) -> Any:
    return dataclasses.replace(policy_configs()[name](**KNOBS.get(name, {})), **kw)


def simulate(view: Any, name: str, hc: HostCosts | None, route_lag: int, graph: bool = True,
             **kw: Any) -> tuple[Engine, RunResult, dict[str, Any], int]:
    """(engine, result, summary, copies issued during the replay) of policy ``name`` on ``view``."""
    policy = build_policy(_cfg(name, **kw))
    eng = Engine(view, SPEC, graph_hw(hc, graph), policy, int(BUDGET[1] * SPEC.all_experts_bytes(BUDGET[0])), seed=5,
                 profile=view if policy.needs_profile else None, route_lag=route_lag)
    before = eng.copies_issued()
    r = eng.run()
    return eng, r, summarize(r), eng.copies_issued() - before


def _tpot_s(s: dict[str, Any]) -> float:
    return s["tpot_ms_mean"] * 1e-3


def _decode_pass_extra_s(view: Any, per_step: float, per_expert: float) -> float:
    """Mean over decode passes of sum over their layer steps of ``per_step + per_expert * experts``."""
    steps = per_step + per_expert * np.diff(np.asarray(view.offsets)).astype(float)
    batch, pidx = np.asarray(view.ls_batch, np.int64), np.asarray(view.ls_pass, np.int64)
    key = batch * (int(pidx.max()) + 1) + pidx
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return float(np.add.reduceat(steps, starts)[pidx[starts] > 0].mean())


def _decisions(r: RunResult, s: dict[str, Any]) -> tuple:
    return s["promotions"], s["prefetches"], s["demotions"], r.act.tolist()


@pytest.mark.parametrize("name", ["static_uniform", "dynaexq"])
def test_a_slow_controller_sets_the_pace_on_the_per_pass_seam(view: Any, name: str) -> None:
    eng, r, s, _ = simulate(view, name, HostCosts(pass_s=PASS_S), route_lag=2)
    base_eng, base, base_s, _ = simulate(view, name, None, route_lag=2)
    assert eng.per_pass and eng.host_costs is not None
    assert _tpot_s(base_s) < PASS_S / 50                          # the device alone is fast
    assert _tpot_s(s) == pytest.approx(PASS_S, rel=0.02)          # the host's pass is the pace
    passes = len(pass_table(r))
    assert r.end_s[-1] == pytest.approx(passes * PASS_S, rel=0.02)
    assert _decisions(r, s) == _decisions(base, base_s)           # time does not change decisions
    if name == "dynaexq":
        assert s["promotions"] > 0, "the case must exercise copies"


@pytest.mark.parametrize("name", ["static_uniform", "dynaexq"])
def test_a_pass_device_time_is_its_graph_whatever_the_host(view: Any, name: str) -> None:
    """``busy_s`` per pass is the device's own time (the pass's layer steps): the same when a slow host sets the
    pace; the host's pass and the pass's copies (``pass_io_s``) are the gap before it."""
    io_s = 3e-4
    hw = dataclasses.replace(graph_hw(HostCosts(pass_s=PASS_S)), pass_io_s=io_s)
    policy = build_policy(_cfg(name))
    r = Engine(view, SPEC, hw, policy, int(BUDGET[1] * SPEC.all_experts_bytes(BUDGET[0])), seed=5,
               profile=view if policy.needs_profile else None, route_lag=2).run()
    _, base, _, _ = simulate(view, name, HostCosts(), route_lag=2)
    slow, fast = pass_table(r), pass_table(base)
    np.testing.assert_allclose(slow["busy_s"], fast["busy_s"], rtol=1e-9)
    np.testing.assert_allclose(fast["latency_s"][1:], fast["busy_s"][1:], rtol=1e-9)   # device-bound: no gap
    assert (slow["latency_s"][1:] >= slow["busy_s"][1:] + io_s).all()
    assert slow["busy_s"][1:].max() < PASS_S


def test_a_policys_own_pass_work_is_charged_on_the_per_pass_seam_only_to_it(view: Any) -> None:
    own = HostCosts(pass_s=PASS_S, pass_own_s={"dynaexq": PASS_S / 2})
    _, r, s, _ = simulate(view, "dynaexq", own, route_lag=2)
    _, same, _, _ = simulate(view, "dynaexq", HostCosts(pass_s=1.5 * PASS_S), route_lag=2)
    np.testing.assert_allclose(r.end_s, same.end_s, rtol=1e-12)
    _, st, _, _ = simulate(view, "static_uniform", own, route_lag=2)
    _, st0, _, _ = simulate(view, "static_uniform", HostCosts(pass_s=PASS_S), route_lag=2)
    np.testing.assert_array_equal(st.end_s, st0.end_s)
    with pytest.raises(ValueError, match="pass_own_s"):
        HostCosts(pass_own_s={"dynaexq": float("nan")})


@pytest.mark.parametrize("name", ["static_uniform", "dynaexq"])
def test_zero_host_costs_change_nothing(view: Any, name: str) -> None:
    """Zero host costs send a static policy through sim.passes instead of the per-layer loop: same times."""
    eng, r, s, _ = simulate(view, name, HostCosts(), route_lag=2)
    base_eng, base, base_s, _ = simulate(view, name, None, route_lag=2)
    assert eng.per_pass and base_eng.per_pass == (name == "dynaexq")
    np.testing.assert_allclose(r.end_s, base.end_s, rtol=1e-9, atol=0)
    assert _tpot_s(s) == pytest.approx(_tpot_s(base_s), rel=1e-9)
    assert _decisions(r, s) == _decisions(base, base_s)


@pytest.mark.parametrize(("name", "route_lag"), [("static_uniform", 2), ("dynaexq", 2), ("lru_offload", 0)])
def test_every_pass_pays_its_own_copies(view: Any, name: str, route_lag: int) -> None:
    """``pass_io_s`` (the pass's inputs up and routing down) lengthens every pass by itself, on both seams."""
    io_s = 3e-4
    kw = {"staging_experts": 0, "scope": CacheScope.GLOBAL} if name == "lru_offload" else {}
    eng, r, s, _ = simulate(view, name, HostCosts(), route_lag=route_lag, **kw)
    hw_io = dataclasses.replace(graph_hw(HostCosts()), pass_io_s=io_s)
    policy = build_policy(_cfg(name, **kw))
    e2 = Engine(view, SPEC, hw_io, policy, int(BUDGET[1] * SPEC.all_experts_bytes(BUDGET[0])), seed=5,
                profile=view if policy.needs_profile else None, route_lag=route_lag)
    r2 = e2.run()
    s2 = summarize(r2)
    assert _tpot_s(s2) - _tpot_s(s) == pytest.approx(io_s, rel=0.02)
    assert _decisions(r2, s2) == _decisions(r, s)


def test_per_pass_seam_charges_every_copy_and_observation(view: Any) -> None:
    """Host-bound passes: the last pass ends later by exactly the copies' and the observations' host work
    (the policy observes the first passes - route_lag passes; every copy is charged at its boundary)."""
    lag, L = 2, SPEC.layers
    step_s, expert_s, copy_s = 2e-5, 3e-6, 1e-4
    hc = HostCosts(pass_s=PASS_S, copy_s=copy_s, observe_s={"dynaexq": [step_s, expert_s]})
    _, r, s, copies = simulate(view, "dynaexq", hc, route_lag=lag)
    _, base, base_s, base_copies = simulate(view, "dynaexq", HostCosts(pass_s=PASS_S), route_lag=lag)
    assert copies == base_copies == s["promotions"] + s["prefetches"] > 0
    assert _decisions(r, s) == _decisions(base, base_s)
    observed = view.layer_steps - lag * L
    entries = float(np.diff(np.asarray(view.offsets))[:observed].sum())
    expected = copy_s * copies + step_s * observed + expert_s * entries
    assert r.end_s[-1] - base.end_s[-1] == pytest.approx(expected, rel=1e-9)


def test_host_work_hides_behind_the_device_unless_the_host_waits_for_routing(view: Any) -> None:
    """route_lag 1, a pass's host work shorter than a device pass: dynaexq waits for the last pass's
    routing, then works (every pass longer by ``pass_s``); a static policy reads routing late
    (``read_lag``), so its host runs ahead and only the first pass starts ``pass_s`` late."""
    pass_s = 20e-6
    _, dyn, dyn_s, _ = simulate(view, "dynaexq", HostCosts(pass_s=pass_s), route_lag=1)
    _, dyn0, dyn0_s, _ = simulate(view, "dynaexq", None, route_lag=1)
    assert _tpot_s(dyn_s) - _tpot_s(dyn0_s) == pytest.approx(pass_s, rel=1e-6)
    assert _decisions(dyn, dyn_s) == _decisions(dyn0, dyn0_s)
    _, st, st_s, _ = simulate(view, "static_uniform", HostCosts(pass_s=pass_s), route_lag=1)
    _, st0, st0_s, _ = simulate(view, "static_uniform", None, route_lag=1)
    assert np.diff(st0.end_s[SPEC.layers - 1 :: SPEC.layers]).min() > pass_s            # the device's pass is the longer
    assert _tpot_s(st_s) == pytest.approx(_tpot_s(st0_s), rel=1e-9)
    np.testing.assert_allclose(st.end_s - st0.end_s, pass_s, rtol=1e-6)


def test_a_static_policy_observes_nothing_on_the_per_pass_seam(view: Any) -> None:
    hc = HostCosts(pass_s=PASS_S, observe_s={"static_uniform": [1e-3, 1e-3]})
    _, r, _, _ = simulate(view, "static_uniform", hc, route_lag=2)
    _, base, _, _ = simulate(view, "static_uniform", HostCosts(pass_s=PASS_S), route_lag=2)
    np.testing.assert_array_equal(r.end_s, base.end_s)


@pytest.mark.parametrize("route_lag", [0, 2])
def test_observe_cost_of_a_stall_policy_on_the_per_layer_seam(view: Any, route_lag: int) -> None:
    """A demand-fetch cache waits for copies: per-layer seam at any route_lag; its observation costs
    per pass layers * (per step + per expert * experts), a cost listed for another policy nothing."""
    kw = {"staging_experts": 0, "scope": CacheScope.GLOBAL}
    step_s, expert_s = 1e-4, 1e-5
    eng, r, s, _ = simulate(view, "lru_offload", HostCosts(observe_s={"lru_offload": [step_s, expert_s]}), route_lag,
                            **kw)
    _, base, base_s, _ = simulate(view, "lru_offload", None, route_lag, **kw)
    _, other, other_s, _ = simulate(view, "lru_offload", HostCosts(observe_s={"dynaexq": [step_s, expert_s]}),
                                    route_lag, **kw)
    assert not eng.per_pass and eng.host_costs is not None and s["promotions"] > 0
    extra = _decode_pass_extra_s(view, step_s, expert_s)
    assert extra == pytest.approx(SPEC.layers * (step_s + SPEC.top_k * expert_s))   # one token: top_k experts
    assert _tpot_s(s) - _tpot_s(base_s) == pytest.approx(extra, rel=1e-6)
    np.testing.assert_array_equal(other.end_s, base.end_s)
    assert _decisions(r, s) == _decisions(base, base_s) == _decisions(other, other_s)


def test_entry_and_copy_costs_on_the_per_layer_seam(view: Any) -> None:
    """dynaexq at route_lag 0: ``entry_s`` per expert of every layer step, ``copy_s`` per copy issued."""
    _, base, base_s, copies = simulate(view, "dynaexq", None, 0)
    _, r, s, _ = simulate(view, "dynaexq", HostCosts(entry_s=1e-5), 0)
    assert _tpot_s(s) - _tpot_s(base_s) == pytest.approx(_decode_pass_extra_s(view, 0.0, 1e-5), rel=1e-9)
    _, rc, sc, copies_c = simulate(view, "dynaexq", HostCosts(copy_s=1e-3), 0)
    assert copies == copies_c > 0
    assert rc.end_s[-1] - base.end_s[-1] == pytest.approx(1e-3 * copies, rel=1e-9)
    assert _decisions(r, s) == _decisions(base, base_s) == _decisions(rc, sc)
    # layer_copy_s: the same per copy, plus once per layer step that issues: more than one step, fewer than copies
    _, same, _, _ = simulate(view, "dynaexq", HostCosts(copy_s=5.0, layer_copy_s=[0.0, 1e-3]), 0)
    np.testing.assert_allclose(same.end_s, rc.end_s, rtol=1e-12)
    _, rs, ss, _ = simulate(view, "dynaexq", HostCosts(layer_copy_s=[1e-3, 0.0]), 0)
    assert 1e-3 < rs.end_s[-1] - base.end_s[-1] < 1e-3 * copies and _decisions(rs, ss) == _decisions(base, base_s)


def test_a_policys_own_layer_work_is_charged_like_its_observation_on_the_per_layer_seam(view: Any) -> None:
    """``layer_s`` adds per layer step and per expert to that policy only (lru here), may be negative, and is
    scaled with the host's speed like every other cost."""
    kw = {"staging_experts": 0, "scope": CacheScope.GLOBAL}
    step_s, expert_s = 1e-4, -1e-6
    _, base, base_s, _ = simulate(view, "lru_offload", None, 0, **kw)
    _, r, s, _ = simulate(view, "lru_offload", HostCosts(layer_s={"lru_offload": [step_s, expert_s]}), 0, **kw)
    _, other, _, _ = simulate(view, "lru_offload", HostCosts(layer_s={"dymoe": [step_s, expert_s]}), 0, **kw)
    assert _tpot_s(s) - _tpot_s(base_s) == pytest.approx(_decode_pass_extra_s(view, step_s, expert_s), rel=1e-6)
    np.testing.assert_array_equal(other.end_s, base.end_s)
    assert _decisions(r, s) == _decisions(base, base_s)
    assert HostCosts(layer_s={"lru_offload": [step_s, expert_s]}).scaled(2.0).layer("lru_offload") == (2 * step_s,
                                                                                                       2 * expert_s)


@pytest.mark.parametrize("entry", [[1e-5], [float("nan"), 0.0], 1e-5])
def test_malformed_layer_entries_are_an_error_naming_the_policy(entry: Any) -> None:
    with pytest.raises(ValueError, match=r"layer_s\['hobbit'\]"):
        HostCosts(layer_s={"hobbit": entry})


def test_staged_experts_are_issued_by_the_host_before_the_cached_ones(view: Any) -> None:
    """A cache with a staging slab on a graph profile: the host issues every copy, a bypassed expert's too
    (``copy_s`` each), the staged launches run before the layer's cached experts; decisions unchanged."""
    kw = {"staging_experts": 2, "precision": "bf16"}
    budget = ("bf16", 0.3)

    def run(hc: HostCosts | None) -> tuple[Engine, RunResult, dict[str, Any]]:
        policy = build_policy(_cfg("lru_offload", **kw))
        eng = Engine(view, SPEC, graph_hw(hc), policy, int(budget[1] * SPEC.all_experts_bytes(budget[0])), seed=5)
        r = eng.run()
        return eng, r, summarize(r)

    eng0, base, base_s = run(None)
    eng1, r, s = run(HostCosts(copy_s=1e-3))
    assert eng1.counts["bypasses"] == eng0.counts["bypasses"] > 0 and s["promotions"] > 0
    issued = s["promotions"] + s["prefetches"] + eng1.counts["bypasses"]
    assert r.end_s[-1] - base.end_s[-1] == pytest.approx(1e-3 * issued, rel=1e-2)   # host-bound: ~1 ms apiece
    _, r2, _ = run(HostCosts(copy_s=1e-3, stage_s=3e-3))                          # a staged expert's own cost
    extra = 1e-3 * (s["promotions"] + s["prefetches"]) + 3e-3 * eng1.counts["bypasses"]
    assert r2.end_s[-1] - base.end_s[-1] == pytest.approx(extra, rel=1e-2)
    assert _decisions(r, s) == _decisions(base, base_s)
    assert s["h2d_bytes"] == s["h2d_weight_bytes"] + eng1.counts["bypasses"] * SPEC.expert_bytes("bf16")


def test_a_static_policy_pays_entries_but_no_observation_per_layer(view: Any) -> None:
    _, base, base_s, _ = simulate(view, "static_uniform", None, 0)
    _, obs, _, _ = simulate(view, "static_uniform", HostCosts(observe_s={"static_uniform": [1e-3, 1e-3]}), 0)
    np.testing.assert_allclose(obs.end_s, base.end_s, rtol=1e-12)
    _, r, s, _ = simulate(view, "static_uniform", HostCosts(entry_s=1e-5), 0)
    assert _tpot_s(s) - _tpot_s(base_s) == pytest.approx(_decode_pass_extra_s(view, 0.0, 1e-5), rel=1e-9)


def test_host_costs_need_graph_tables(view: Any) -> None:
    """Without graph tables (the per-class model) the profile's host costs are not charged."""
    hc = HostCosts(pass_s=PASS_S, entry_s=1e-3, observe_s={"dynaexq": [1e-3, 1e-3]})
    eng, r, _, _ = simulate(view, "dynaexq", hc, 2, graph=False)
    _, base, _, _ = simulate(view, "dynaexq", None, 2, graph=False)
    assert eng.host_costs is None
    np.testing.assert_array_equal(r.end_s, base.end_s)


# ---- the fit ----

def run_with_host(host: dict[str, np.ndarray], info: dict[str, Any] | None = None, steps: int = 2) -> RunResult:
    """A run of ``steps`` one-layer passes of one token whose host log is ``host``."""
    z = np.zeros(steps)
    return RunResult(precisions=["bf16"], ls_batch=np.zeros(steps, np.int32), ls_pass=np.arange(steps),
                     ls_tokens=np.ones(steps, np.int32), end_s=np.arange(1.0, steps + 1), stall_s=z,
                     host_wait_s=np.full(steps, 0.25), err=z, act=np.ones((steps, 2), np.int64),
                     snaps=np.zeros((steps, len(COUNTERS)), np.int64), hits=np.ones(steps, np.int64),
                     requests=np.ones(steps, np.int64), info=info or {}, host=host)


def _calls(entries: list[int], step_s: float, expert_s: float) -> dict[str, np.ndarray]:
    x = np.asarray(entries, np.int64)
    return {"call_entries": x, "call_s": step_s + expert_s * x}


def _hr(host: dict[str, np.ndarray], policy: str, seam: str = "per-pass") -> HostRun:
    return HostRun(Path(f"{policy}.case.json"), run_with_host(host), policy, seam)


def test_lstsq_recovers_a_line_and_clamps() -> None:
    x = np.array([1.0, 2.0, 4.0, 8.0])
    assert _lstsq(x, 3e-5 + 2e-6 * x) == pytest.approx((3e-5, 2e-6), rel=1e-9)
    assert _lstsq(x, 5.0 - x) == (pytest.approx(float((5.0 - x).mean())), 0.0)   # negative slope: the mean
    assert _lstsq(x, 2.0 * x - 1.0) == (0.0, pytest.approx(float((x * (2 * x - 1)).sum() / (x * x).sum())))
    assert _lstsq(np.full(3, 4.0), np.array([1.0, 2.0, 3.0])) == (pytest.approx(2.0), 0.0)   # one x: the mean
    assert _lstsq(np.full(2, 4.0), np.array([-1.0, -2.0])) == (0.0, 0.0)
    assert _lstsq(np.zeros(0), np.zeros(0)) == (0.0, 0.0)


def test_fit_observe_recovers_per_policy_costs() -> None:
    runs = [
        _hr(_calls([2, 4, 6, 2], 3e-5, 2e-6), "dynaexq"),
        _hr(_calls([8, 10], 3e-5, 2e-6), "dynaexq", "per-layer"),      # every run of the policy, any seam
        _hr(_calls([3, 3, 3], 1e-5, 5e-6), "lru_offload", "per-layer"),  # one expert count: mean, slope 0
        _hr(_calls([], 0.0, 0.0), "static_uniform"),                     # observes nothing: not listed
    ]
    fit = fit_observe(runs)
    assert list(fit) == ["dynaexq", "lru_offload"]
    np.testing.assert_allclose(fit["dynaexq"], [3e-5, 2e-6], rtol=1e-8)
    assert fit["lru_offload"] == [pytest.approx(1e-5 + 3 * 5e-6), 0.0]
    noisy = _calls([2, 4, 6], 0.0, 0.0) | {"call_s": np.array([3e-5, 2e-5, 1e-5])}   # slower with fewer experts
    assert fit_observe([_hr(noisy, "x")])["x"] == [pytest.approx(2e-5), 0.0]


def _passes(copies: list[int], pass_s: float, copy_s: float, junk: float = 0.0) -> dict[str, np.ndarray]:
    k = np.asarray(copies, np.int64)
    waited, observe = 1e-4 * np.arange(k.size), 3e-5 * (k % 3)
    work = pass_s + copy_s * k
    work[:WARMUP_PASSES] += junk
    return {"pass_s": work + waited + observe, "waited_s": waited, "observe_s": observe, "copies": k}


def test_fit_pass_recovers_pass_and_copy_costs() -> None:
    runs = [
        _hr(_passes([9, 9, 0, 1, 2, 5], 40e-6, 7e-6, junk=1.0), "dynaexq"),   # warm-up passes left out
        _hr(_passes([0, 0, 3, 4], 40e-6, 7e-6), "static_uniform"),
        _hr(_passes([0, 0, 1, 9], 1.0, 1.0), "lru_offload", "per-layer"),    # not on the per-pass seam
    ]
    pass_s, copy_s, own = fit_pass(runs)
    assert (pass_s, copy_s) == pytest.approx((40e-6, 7e-6), rel=1e-8) and own == {"dynaexq": pytest.approx(0.0, abs=1e-12)}
    assert fit_pass(runs[2:]) == (0.0, 0.0, {})
    one = _hr(_passes([0, 0, 2, 2, 2], 40e-6, 7e-6), "dynaexq")
    assert fit_pass([one]) == (pytest.approx(54e-6), 0.0, {})               # one copy count: mean, slope 0


def test_fit_pass_gives_each_policy_its_own_pass_beyond_a_static_one() -> None:
    """A static policy's pass costs 100 us, dynaexq's boundary 60 us more, dynamo's 20 us more; copies 7 us."""
    runs = [_hr(_passes([0, 0, 0, 0, 0], 100e-6, 0.0), "static_uniform"),
            _hr(_passes([0, 0, 0, 0], 100e-6, 0.0), "static_frequency"),
            _hr(_passes([0, 0, 1, 4, 2, 6], 160e-6, 7e-6), "dynaexq"),
            _hr(_passes([0, 0, 2, 0, 3], 120e-6, 7e-6), "dynamo")]
    pass_s, copy_s, own = fit_pass(runs)
    assert (pass_s, copy_s) == pytest.approx((100e-6, 7e-6), rel=1e-8)
    assert own == {"dynaexq": pytest.approx(60e-6, rel=1e-8), "dynamo": pytest.approx(20e-6, rel=1e-8)}
    assert HostCosts(pass_s=pass_s, pass_own_s=own).pass_work("dynamo") == pytest.approx(120e-6)
    assert HostCosts(pass_s=pass_s, pass_own_s={"x": -1.0}).pass_work("x") == 0.0
    assert HostCosts(pass_s=pass_s, pass_own_s=own).scaled(2.0).pass_own_s["dynaexq"] == pytest.approx(120e-6)


def test_fit_pass_charges_a_copy_where_it_lands_too() -> None:
    """A copy costs the host 40 us at issue and 12 us one boundary later (landing): the fit finds the pass's
    own cost and charges both at issue (``copy_s`` = 52 us)."""
    k = np.array([0, 0, 8, 0, 8, 1, 0, 7, 0, 8, 3, 0], np.int64)
    h = _passes(k.tolist(), 100e-6, 0.0)
    h["pass_s"] = h["pass_s"] + 40e-6 * k + 12e-6 * np.r_[0, k[:-1]]
    assert fit_pass([_hr(h, "dynaexq")])[:2] == pytest.approx((100e-6, 52e-6), rel=1e-6)


def test_host_runs_reads_only_calibration_cases_with_a_host_log(tmp_path: Path) -> None:
    """Calibration cases (cal_*) with a host log; a validation case in the same folder is never fitted to."""
    info = {"summary": {"policy": "dynaexq", "observe": "per-pass"}}
    save_run(run_with_host(_calls([1, 2], 1e-5, 1e-6), info), tmp_path / "cal_a.measured.npz")
    save_run(run_with_host({}, info), tmp_path / "cal_b.measured.npz")
    save_run(run_with_host(_calls([3], 1e-5, 1e-6), info), tmp_path / "trace_c.measured.npz")
    for case in ("cal_a", "cal_b", "trace_c"):
        (tmp_path / f"{case}.case.json").write_text("{}")
    runs = host_runs(tmp_path)
    assert [(r.case.name, r.policy, r.seam) for r in runs] == [("cal_a.case.json", "dynaexq", "per-pass")]
    assert [r.case.name for r in host_runs(tmp_path, prefix="")] == ["cal_a.case.json", "trace_c.case.json"]
    np.testing.assert_array_equal(runs[0].run.host["call_entries"], [1, 2])


def test_the_fit_prices_every_run_at_the_calibration_speed() -> None:
    """Two runs of one policy, the second on a host twice as slow (its probe twice as long): fitted at the
    median probe, both give the same costs; a set with a run that has no probe is fitted as measured."""
    from moebits.analysis.hostcost import reference_probe_s

    fast = _calls([2, 4, 6], 3e-5, 2e-6) | _passes([0, 0, 1, 2, 3], 40e-6, 7e-6) | {"probe_s": np.array([1e-5, 1e-5])}
    slow = {k: (v * 2 if k in ("call_s", "pass_s", "waited_s", "observe_s") else v) for k, v in fast.items()}
    slow["probe_s"] = np.array([1.9e-5, 2.1e-5])
    runs = [_hr(fast, "dynaexq"), _hr(slow, "dynaexq")]
    ref = reference_probe_s(runs)
    assert ref == pytest.approx(1.5e-5)
    runs = [dataclasses.replace(r, to_ref=ref / r.run.host_probe_s()) for r in runs]
    np.testing.assert_allclose(fit_observe(runs)["dynaexq"], [1.5 * 3e-5, 1.5 * 2e-6], rtol=1e-8)
    assert fit_pass(runs)[:2] == pytest.approx((1.5 * 40e-6, 1.5 * 7e-6), rel=1e-8)
    assert reference_probe_s([*runs, _hr(_calls([1], 1e-5, 0.0), "dynaexq")]) == 0.0


def test_a_profile_at_another_host_speed_scales_the_host_side_only() -> None:
    hc = HostCosts(pass_s=4e-5, copy_s=7e-6, entry_s=2e-7, observe_s={"dynaexq": [3e-5, 2e-6]}, probe_s=1e-5)
    hw = dataclasses.replace(graph_hw(hc), layer_sync_s=6e-5, stall_sync_s=8e-5, pass_io_s=1.2e-5)
    slow = hw.at_host_speed(2.5e-5)
    assert slow.host_costs is not None
    assert (slow.host_costs.pass_s, slow.host_costs.copy_s, slow.host_costs.entry_s) == pytest.approx((1e-4, 1.75e-5, 5e-7))
    assert slow.host_costs.observe_s == {"dynaexq": [pytest.approx(7.5e-5), pytest.approx(5e-6)]}
    assert (slow.layer_sync_s, slow.stall_sync_s) == pytest.approx((1.5e-4, 2e-4))
    assert slow.pass_io_s == hw.pass_io_s and slow.graph_tables == hw.graph_tables   # the device side stays
    assert slow.host_costs.probe_s == pytest.approx(2.5e-5)     # now priced at that probe
    assert slow.at_host_speed(1e-5).host_costs.pass_s == pytest.approx(4e-5)   # and back
    assert hw.at_host_speed(None) is hw                          # a run without a probe: as fitted
    unknown = dataclasses.replace(hw, host_costs=dataclasses.replace(hc, probe_s=0.0))
    assert unknown.at_host_speed(2.5e-5) is unknown              # costs fitted without a probe: never rescaled


def test_a_speed_exponent_below_one_scales_host_costs_less_than_the_probe() -> None:
    hc = HostCosts(pass_s=1e-4, observe_s={"dynaexq": [1e-5, 0.0]}, probe_s=1e-5, speed_exponent=0.5)
    hw = dataclasses.replace(graph_hw(hc), layer_sync_s=4e-5)
    slow = hw.at_host_speed(4e-5)                                # a probe 4x longer: costs 4 ** 0.5 = 2x
    assert slow.host_costs is not None and slow.host_costs.pass_s == pytest.approx(2e-4)
    assert slow.layer_sync_s == pytest.approx(8e-5) and slow.host_costs.observe_s["dynaexq"][0] == pytest.approx(2e-5)
    with pytest.raises(ValueError, match="speed_exponent"):
        HostCosts(speed_exponent=-1.0)


def test_fit_stage_is_the_stage_section_per_streamed_expert(view: Any, model_parts: tuple) -> None:  # noqa: F811
    """A cache streaming misses through its staging slab on the CPU graph path: the host log's ``stage`` section
    over the experts streamed; runs without a staging slab give 0 (the simulator then charges copy_s)."""
    from moebits.analysis.hostcost import fit_stage
    from moebits.runtime.replay import graph_replay

    torch.set_num_threads(1)
    engine = graph_engine(build_policy(_cfg("lru_offload", precision="bf16")), ("bf16", 0.3), view, model_parts, 0)
    result = graph_replay(engine, view)
    assert engine.counts["bypasses"] > 0 and "sec_stage" in result.host
    run = HostRun(Path("cal_x.case.json"), result, "lru_offload", "per-layer")
    assert fit_stage([run]) == pytest.approx(result.host["sec_stage"].sum() / engine.counts["bypasses"])
    assert fit_stage([dataclasses.replace(run, to_ref=0.5)]) == pytest.approx(0.5 * fit_stage([run]))
    assert fit_stage([dataclasses.replace(run, seam="per-pass")]) == 0.0


def _layer_run(policy: str, entries: list[int], step_s: float, entry_s: float, seam: str = "per-layer",
               to_ref: float = 1.0) -> HostRun:
    """A per-layer-seam run of two-layer passes whose layer steps see ``entries[i]`` experts in pass ``i`` and whose
    host work per layer step (split over two sections) is ``step_s + entry_s * entries[i]``, measured at 1/to_ref."""
    n = WARMUP_PASSES + len(entries)
    e = np.r_[np.full(WARMUP_PASSES, 99.0), np.asarray(entries, float)]        # warm-up passes: never fitted
    work = 2 * (step_s + entry_s * e) / to_ref                                     # two layer steps per pass
    host = {"pass_s": np.ones(n), "sec_choose": 0.25 * work, "sec_launch": 0.75 * work, "sec_wait": np.ones(n)}
    run = dataclasses.replace(run_with_host(host, steps=n), requests=np.repeat(e, 2).astype(np.int64))
    return HostRun(Path(f"cal_{policy}.case.json"), run, policy, seam, to_ref)


def test_fit_layer_is_each_policys_line_less_the_static_one() -> None:
    """``layer_s``: per policy, its per-layer-seam host work per layer step on [1, experts] less the static
    policies' line; at the reference speed; per-pass runs, warm-up passes and one-count policies left out."""
    from moebits.analysis.hostcost import fit_layer

    runs = [_layer_run("static_uniform", [2, 4, 8, 16], 10e-6, 1.7e-6),
            _layer_run("static_frequency", [3, 5], 10e-6, 1.7e-6, to_ref=0.5),
            _layer_run("lru_offload", [2, 6, 12], 6e-6, 2.7e-6),
            _layer_run("hobbit", [4, 9], 30e-6, 3.0e-6, to_ref=2.0),
            _layer_run("dymoe", [5, 5, 5], 50e-6, 1.0e-6),                            # one count: no line
            _layer_run("oracle", [2, 8], 99e-6, 9e-6, seam="per-pass")]               # not the per-layer seam
    got = fit_layer(runs)
    assert sorted(got) == ["hobbit", "lru_offload"]
    np.testing.assert_allclose(got["lru_offload"], [-4e-6, 1.0e-6], atol=1e-12)
    np.testing.assert_allclose(got["hobbit"], [20e-6, 1.3e-6], atol=1e-12)
    assert fit_layer([r for r in runs if not r.policy.startswith("static")]) == {}


def test_host_probe_times_a_fixed_workload() -> None:
    from moebits.runtime.host_log import host_probe_s

    p = host_probe_s(reps=5)
    assert 1e-7 < p < 0.1


def test_describe_lists_every_cost() -> None:
    hw = dataclasses.replace(graph_hw(HostCosts(pass_s=4e-5, copy_s=7e-6, entry_s=2.5e-7,
                                                observe_s={"dynaexq": [3e-5, 2e-6]})), layer_sync_s=1e-5)
    text = describe(hw)
    assert "pass_s 40.0 us" in text and "copy_s 7.0 us" in text and "entry_s 0.25 us" in text
    assert "layer_sync_s 10.0 us" in text and "observe dynaexq: 30.0 us/step + 2.00 us/expert" in text
    assert "pass_s 0.0 us" in describe(graph_hw(None))


# ---- the run record ----

def test_save_and_load_keep_the_host_log_apart_from_host_wait_s(tmp_path: Path) -> None:
    host = {"pass_s": np.array([1e-4, 2e-4]), "waited_s": np.array([0.0, 1e-5]), "steps": np.array([0, 3], np.int64),
            "call_s": np.zeros(0), "call_entries": np.zeros(0, np.int64)}
    r = run_with_host(host, {"policy": "x"})
    save_run(r, tmp_path / "r.npz")
    back = load_run(tmp_path / "r.npz")
    assert sorted(back.host) == sorted(host)
    for k, v in host.items():
        np.testing.assert_array_equal(back.host[k], v)
        assert back.host[k].dtype == v.dtype
    np.testing.assert_array_equal(back.host_wait_s, r.host_wait_s)   # the step array, not a host log entry
    assert "wait_s" not in back.host and back.info == {"policy": "x"}
    save_run(run_with_host({}), tmp_path / "none.npz")
    assert load_run(tmp_path / "none.npz").host == {} and load_run(tmp_path / "none.npz").busy_s.size == 0
    r.busy_s = np.array([0.5, 0.75])
    save_run(r, tmp_path / "busy.npz")
    np.testing.assert_array_equal(load_run(tmp_path / "busy.npz").busy_s, r.busy_s)


def _busy_run(gap_s: float, steps: int = 8) -> RunResult:
    """Passes one second apart whose graphs took all but ``gap_s`` of it (the first pass, prefill: 0.5 s)."""
    r = run_with_host({"pass_s": np.zeros(steps)}, steps=steps)
    r.busy_s = np.r_[0.5, np.full(steps - 1, 1.0 - gap_s)]
    return r


def test_fit_pass_io_is_the_static_whole_step_runs_median_gap() -> None:
    runs = [HostRun(Path("a.case.json"), _busy_run(0.02), "static_uniform", "per-pass"),
            HostRun(Path("b.case.json"), _busy_run(0.03), "static_frequency", "per-pass"),
            HostRun(Path("c.case.json"), _busy_run(0.02, steps=5), "static_uniform", "per-pass"),
            HostRun(Path("d.case.json"), _busy_run(0.5), "dynaexq", "per-pass"),        # host-bound: not a copy
            HostRun(Path("e.case.json"), _busy_run(0.5), "static_uniform", "per-layer")]
    assert fit_pass_io(runs) == pytest.approx(0.02)       # 5 + 2 passes at 0.02 s against 5 at 0.03 s
    assert fit_pass_io(runs[3:]) is None
    assert fit_pass_io([HostRun(Path("f.case.json"), run_with_host({}, steps=8), "static_uniform", "per-pass")]) is None


# ---- the graph runtime's host log (CPU, eager) ----

@pytest.mark.parametrize("name", ["dynaexq", "static_uniform"])
def test_graph_engine_logs_host_work_per_pass_and_per_observation(name: str, view: Any,
                                                                  model_parts: tuple) -> None:  # noqa: F811
    torch.set_num_threads(1)
    policy = Recording(build_policy(_cfg(name)))
    from moebits.runtime.replay import graph_replay

    engine = graph_engine(policy, BUDGET, view, model_parts, 0, route_lag=2)
    assert not engine.per_layer
    copies0 = engine.counts["promotions"] + engine.counts["prefetches"]
    result = graph_replay(engine, view)
    h, passes = result.host, view.layer_steps // SPEC.layers
    sections = {k for k in h if k.startswith("sec_")}
    assert set(h) - sections == {"pass_s", "waited_s", "observe_s", "steps", "entries", "copies", "copy_steps",
                                 "call_s", "call_entries", "probe_s"}
    assert not h["copy_steps"].any()   # counted on the per-layer seam only
    assert h["probe_s"].shape == (2,) and (h["probe_s"] > 0).all()          # before and after the timed loop
    assert result.host_probe_s() == pytest.approx(float(h["probe_s"].mean()))
    assert {"sec_route", "sec_observe", "sec_boundary", "sec_inputs", "sec_launch", "sec_record"} <= sections
    for k in ("pass_s", "waited_s", "observe_s", "steps", "entries", "copies", *sections):
        assert h[k].shape == (passes,), k
    np.testing.assert_allclose(sum(h[k] for k in sections), h["pass_s"], rtol=1e-6)   # the sections cover the pass
    assert (h["pass_s"] > 0).all() and (h["waited_s"] >= 0).all() and (h["observe_s"] <= h["pass_s"]).all()
    assert int(h["steps"].sum()) == h["call_s"].size == h["call_entries"].size
    assert int(h["entries"].sum()) == int(h["call_entries"].sum())
    np.testing.assert_allclose(h["observe_s"].sum(), h["call_s"].sum(), rtol=1e-9)
    assert int(h["copies"].sum()) == engine.counts["promotions"] + engine.counts["prefetches"] - copies0
    if name == "dynaexq":
        observed = view.layer_steps - 2 * SPEC.layers            # the last route_lag passes are never observed
        assert h["call_s"].size == len(policy.observed) == observed
        np.testing.assert_array_equal(h["call_entries"], np.diff(np.asarray(view.offsets))[:observed])
        assert h["steps"][:2].tolist() == [0, 0] and (h["steps"][2:] == SPEC.layers).all()
        assert h["copies"].sum() > 0
    else:
        assert h["call_s"].size == 0 and not policy.observed and h["copies"].sum() == 0


def test_the_per_layer_seam_logs_the_steps_that_issue_copies(view: Any, model_parts: tuple) -> None:  # noqa: F811
    torch.set_num_threads(1)
    policy = build_policy(_cfg("lru_offload", staging_experts=0, scope=CacheScope.GLOBAL))
    from moebits.runtime.replay import graph_replay

    engine = graph_engine(policy, BUDGET, view, model_parts, 0, route_lag=0)
    assert engine.per_layer
    h = graph_replay(engine, view).host
    k, steps = h["copies"], h["copy_steps"]
    assert k.sum() > 0, "the case must exercise copies"
    assert ((steps > 0) == (k > 0)).all() and (steps <= k).all() and (steps <= SPEC.layers).all()
    assert steps.sum() < k.sum()   # some step issues more than one copy


def test_fit_layer_copy_separates_an_issue_from_its_copies() -> None:
    """Issuing costs 5 us per layer step, 90 us per step that issues copies and 25 us per copy."""
    def run(steps: list[int], copies: list[int]) -> HostRun:
        st, k = np.asarray(steps), np.asarray(copies)
        host = {"pass_s": np.ones(k.size), "copies": k, "copy_steps": st, "sec_issue": 8 * 5e-6 + 90e-6 * st + 25e-6 * k}
        r = run_with_host(host, steps=8 * k.size)
        r.requests = np.ones(8 * k.size, np.int64)
        return HostRun(Path("x.case.json"), r, "lru_offload", "per-layer")
    runs = [run([0, 0, 1, 2, 1, 3], [0, 0, 1, 5, 3, 4]), run([0, 0, 4, 6, 8], [0, 0, 20, 30, 33])]
    assert fit_layer_copy(runs) == pytest.approx([90e-6, 25e-6], rel=1e-6)
    assert fit_layer_copy([dataclasses.replace(runs[0], seam="per-pass")]) == []
    hc = HostCosts(copy_s=50e-6, layer_copy_s=[90e-6, 25e-6])
    assert hc.layer_copy() == (90e-6, 25e-6) and HostCosts(copy_s=50e-6).layer_copy() == (0.0, 50e-6)
    with pytest.raises(ValueError, match="layer_copy_s"):
        HostCosts(layer_copy_s=[1e-6])


def test_the_timed_replay_loop_runs_without_garbage_collection() -> None:
    import gc

    from moebits.runtime.replay import no_gc_pauses

    assert gc.isenabled()
    with no_gc_pauses():
        assert not gc.isenabled() and gc.get_freeze_count() > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
