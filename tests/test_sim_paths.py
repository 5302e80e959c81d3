"""The simulator's shortcuts (:mod:`sim.fastpath`: the vectorized static path, the one-class
server, the server of steps with every copy READY) against its general path: every registered policy (from the registry) under every miss
rule it supports, on the same inputs, must give the same record for every layer step, bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from moebits.core.hardware import HardwareProfile, LinkCurve
from moebits.core.model_spec import ModelSpec
from moebits.policies._tables import run_table
from moebits.policies.base import build_policy, policy_configs
from moebits.sim.engine import Engine, EngineOptions
from moebits.traces.replay import build_view
from moebits.traces.zipf import synth_trace

SPEC = ModelSpec("paths", layers=3, experts=8, top_k=2, hidden=128, expert_intermediate=128, vocab_size=64)
BUDGETS = {"dynamo": ("int4", 0.9)}  # as in test_parity: leaves low-baseline experts to switch
KNOBS = {"dynamo": {"min_residency": 1, "mix_budget_share": 0.3}, "dynaexq": {"min_residency": 2}}
FIELDS = ("end_s", "stall_s", "host_wait_s", "err", "act", "snaps", "ls_batch", "ls_pass", "ls_tokens")


def hw() -> HardwareProfile:
    """A slow link (copies take several layer steps), so waits and stalls happen."""
    link = LinkCurve(latency_s=5e-6, sizes_bytes=[1.0], gbps=[0.5])
    return HardwareProfile(name="slow_link", hbm_capacity_gb=80.0, hbm_gbps=2000.0, h2d=link, d2h=link,
                           peak_tflops={"bf16": 100.0}, launch_s=20e-6)


def cases() -> list[tuple[str, object]]:
    out = []
    for name, cfg_type in sorted(policy_configs().items()):
        rules = type(build_policy(cfg_type())).supported_miss_rules
        out += [(name, rule) for rule in rules]
    return out


@pytest.fixture(scope="module")
def views() -> dict[int, object]:
    trace = synth_trace(SPEC, np.random.default_rng(4), seqs=4, prompt_tokens=3, decode_tokens=10, skew=1.1, reuse=0.3)
    return {b: build_view(trace, b) for b in (1, 3)}


def replay(name: str, rule: object, view: object, fast: bool) -> object:
    cfg = dataclasses.replace(policy_configs()[name](**KNOBS.get(name, {})), miss_rule=rule)
    at, share = BUDGETS.get(name, ("bf16", 0.5))
    table, _ = run_table(None, SPEC, 5)
    engine = Engine(view, SPEC, hw(), build_policy(cfg), int(share * SPEC.all_experts_bytes(at)), seed=5,  # type: ignore[arg-type]
                    sensitivity=table, profile=view, options=EngineOptions(fast=fast))  # type: ignore[arg-type]
    return engine.run()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("name", "rule"), cases())
def test_shortcuts_match_the_general_path(name: str, rule: object, batch: int, views: dict) -> None:
    fast, general = (replay(name, rule, views[batch], f) for f in (True, False))
    for field in FIELDS:
        a, b = getattr(fast, field), getattr(general, field)
        assert a.shape == b.shape and np.array_equal(a, b), f"{field} differs"


@pytest.mark.parametrize(("name", "shortcut"), [("lru_offload", "single_class_steps"), ("static_uniform", "static_plan")])
def test_the_comparison_sees_each_shortcut(name: str, shortcut: str, views: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The test can fail: a shortcut whose kernel times are off by 1 ns breaks the equality."""
    from moebits.sim import engine as sim_engine
    from moebits.sim import fastpath

    rule = policy_configs()[name]().miss_rule
    general = replay(name, rule, views[1], False)
    original = getattr(fastpath, shortcut)

    def skewed(*args: object) -> object:
        out = original(*args)
        if shortcut == "static_plan":
            out.gpu_s = out.gpu_s + 1e-9  # type: ignore[union-attr]
            return out
        tok, gpu, err = out  # type: ignore[misc]
        return tok, [g + 1e-9 for g in gpu], err

    monkeypatch.setattr(fastpath, shortcut, skewed)
    monkeypatch.setattr(sim_engine, shortcut, skewed, raising=False)
    fast = replay(name, rule, views[1], True)
    assert fast.stall_s.sum() >= 0 and not np.array_equal(fast.end_s, general.end_s)  # type: ignore[attr-defined]


def test_the_comparison_sees_the_ready_server(views: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """dynaexq's steps go through :func:`sim.fastpath.ready_server`: one that adds 1 ns to every
    step it serves breaks the equality."""
    from moebits.sim import engine as sim_engine
    from moebits.sim import fastpath

    rule = policy_configs()["dynaexq"]().miss_rule
    general = replay("dynaexq", rule, views[1], False)
    original = fastpath.ready_server

    def skewed(*args: object) -> object:
        serve = original(*args)  # type: ignore[arg-type]
        return lambda j, layer, t1: serve(j, layer, t1) + 1e-9

    monkeypatch.setattr(sim_engine, "ready_server", skewed)
    fast = replay("dynaexq", rule, views[1], True)
    assert not np.array_equal(fast.end_s, general.end_s)  # type: ignore[attr-defined]
