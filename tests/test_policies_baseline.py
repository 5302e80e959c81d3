"""Baseline policies (static_uniform, static_frequency, lru_offload, lfu_offload, oracle).

The caches here run with one GLOBAL pool and no staging slab (``OLD``: the demand-fetch
semantics, every needed expert cached at once); per-layer scope and bypass are tested in
tests/test_cache_scope.py.

Pure tests on hand-built routing: a tiny engine (``drive``) applies each policy's actions to
a real SlabLedger in order, finishes loads at once, and checks after every layer step that
the ledger stays within the budget, no needed expert was evicted and every needed expert
has a READY copy. Plus the registry, the hydra presets, and hypothesis properties: the
invariants hold on random routing, and the oracle misses no more than LRU or LFU and exactly
as often as a brute-force optimum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec, get_model_spec
from moebits.core.routing import LayerSteps
from moebits.core.slabs import Refusal, SlabLedger
from moebits.policies.base import (
    Action,
    ActionKind,
    LayerObs,
    Policy,
    PolicyContext,
    build_policy,
    policy_configs,
    register_policy,
)
from moebits.policies.lfu_offload import LfuOffloadConfig
from moebits.policies.lru_offload import LruOffloadConfig
from moebits.policies.offload_cache import CacheScope, InitialFill
from moebits.policies.oracle import OracleConfig
from moebits.policies.static_frequency import StaticFrequencyConfig
from moebits.policies.static_uniform import StaticUniformConfig
from sim_testkit import layer_steps

ROOT = Path(__file__).resolve().parents[1]
BYTES = {"bf16": 100, "int8": 55, "int4": 30}  # per expert, made up for exact budgets


def tiny_spec(layers: int = 1, experts: int = 8, top_k: int = 1) -> ModelSpec:
    return ModelSpec("tiny", layers=layers, experts=experts, top_k=top_k, hidden=64, expert_intermediate=64)


def context(spec: ModelSpec, budget_bytes: int, future: LayerSteps | None = None, profile=None) -> PolicyContext:
    return PolicyContext(
        spec=spec, budget_bytes=budget_bytes, rng=np.random.default_rng(0), precision_bytes=dict(BYTES),
        profile=profile, future=future,
    )


@dataclass
class Run:
    """What the tiny engine saw: per step actions, misses, and the victims in order."""

    actions: list[list[Action]] = field(default_factory=list)
    victims: list[ExpertKey] = field(default_factory=list)
    misses: int = 0


def apply(ledger: SlabLedger, actions: list[Action], needed: set[ExpertKey]) -> tuple[int, list[ExpertKey]]:
    """Execute actions in order like an engine, copies finishing at once; count loads."""
    loads, victims = 0, []
    for a in actions:
        if a.kind == ActionKind.DEMOTE:
            assert a.key not in needed, f"evicted {a.key}, needed by this step"
            assert not isinstance(ledger.evict(a.key, a.precision), Refusal)
            victims.append(a.key)
        else:
            slab = ledger.begin_load(a.key, a.precision)
            assert not isinstance(slab, Refusal), f"{a} refused: {slab!r}"
            ledger.finish_load(slab)
            loads += 1
    return loads, victims


def drive(policy: Policy, ctx: PolicyContext, steps: LayerSteps) -> Run:
    """Run ``policy`` over ``steps`` on a real ledger, checking the engine contract."""
    policy.prepare(ctx)
    ledger = SlabLedger(policy.slab_plan(), ctx.budget_bytes)
    apply(ledger, policy.initial_loads(), set())
    run = Run()
    for i in range(steps.layer_steps):
        layer, experts = int(steps.ls_layer[i]), steps.experts(i)
        obs = LayerObs(i, layer, 1, i, experts, np.ones(len(experts)), np.ones(len(experts)), 0.0)
        actions = list(policy.on_layer_step(obs, ledger))
        needed = {ExpertKey(layer, e) for e in experts.tolist()}
        loads, victims = apply(ledger, actions, needed)
        assert ledger.used_bytes <= ctx.budget_bytes
        for key in needed:
            assert any(ledger.is_ready(key, p) for p in ledger.precisions()), f"{key} not served"
        run.actions.append(actions)
        run.victims += victims
        run.misses += loads
    return run


def single(seq: list[int]) -> LayerSteps:
    return layer_steps([(0, [e]) for e in seq])


OLD = {"scope": CacheScope.GLOBAL, "staging_experts": 0}  # one pool, no bypass

BELADY = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]  # the textbook string


def cold(cfg_type: type, steps: LayerSteps, slabs: int, spec: ModelSpec | None = None) -> Run:
    """A cache policy started empty with ``slabs`` bf16 slabs (plus some slack bytes)."""
    policy = build_policy(cfg_type(initial_fill=InitialFill.EMPTY, **OLD))
    return drive(policy, context(spec or tiny_spec(), slabs * 100 + 99, future=steps), steps)


def test_belady_string_lru_lfu_oracle_exact() -> None:
    steps = single(BELADY)
    lru, lfu, opt = (cold(c, steps, 3) for c in (LruOffloadConfig, LfuOffloadConfig, OracleConfig))
    assert (lru.misses, lfu.misses, opt.misses) == (12, 11, 9)
    assert [k.expert for k in lru.victims] == [7, 1, 2, 3, 0, 4, 0, 3, 2]
    assert [k.expert for k in lfu.victims] == [7, 1, 2, 3, 4, 3, 1, 7]
    assert [k.expert for k in opt.victims] == [7, 1, 0, 4, 3, 2]
    # step 3 (expert 2) is the first eviction: demote first, then promote into the freed slab
    a = ActionKind
    assert [(x.kind, x.key, x.precision) for x in lru.actions[3]] == [
        (a.DEMOTE, ExpertKey(0, 7), "bf16"), (a.PROMOTE, ExpertKey(0, 2), "bf16")
    ]
    assert [(x.kind, x.key.expert) for x in opt.actions[3]] == [(a.DEMOTE, 7), (a.PROMOTE, 2)]
    assert [(x.kind, x.key.expert) for x in lru.actions[0]] == [(a.PROMOTE, 7)]  # a free slab
    assert lru.actions[4] == []  # a hit costs nothing


def test_needed_experts_are_never_victims() -> None:
    # LRU: after {0},{1} the least recent is 0, but step 2 needs it: 1 goes instead
    steps = layer_steps([(0, [0]), (0, [1]), (0, [0, 2])])
    assert [k.expert for k in cold(LruOffloadConfig, steps, 2).victims] == [1]
    # oracle: 1 is never used again, but step 1 needs it, so 0 goes; then a tie -> lower id
    steps = layer_steps([(0, [0, 1]), (0, [1, 2]), (0, [0])])
    assert [k.expert for k in cold(OracleConfig, steps, 2).victims] == [0, 1]


def test_cache_is_shared_by_layers() -> None:
    spec = tiny_spec(layers=2, experts=4)
    steps = layer_steps([(0, [1]), (1, [1]), (0, [1]), (1, [2])])
    run = cold(LruOffloadConfig, steps, 2, spec)
    assert run.misses == 3 and run.victims == [ExpertKey(1, 1)]  # L0E1 was used since


def test_initial_fills() -> None:
    spec = tiny_spec(layers=2, experts=4)
    lru = build_policy(LruOffloadConfig(**OLD))
    lru.prepare(context(spec, 3 * 100))
    keys = [(a.key.layer, a.key.expert) for a in lru.initial_loads()]
    assert keys == [(0, 0), (1, 0), (0, 1)]  # round robin over layers
    profile = layer_steps([(1, [3]), (1, [3]), (0, [2]), (1, [3]), (0, [2]), (0, [1])])
    lru = build_policy(LruOffloadConfig(**OLD))
    lru.prepare(context(spec, 2 * 100, profile=profile))
    assert [(a.key.layer, a.key.expert) for a in lru.initial_loads()] == [(0, 2), (1, 3)]  # least popular first
    steps = layer_steps([(0, [3]), (1, [1])])
    opt = build_policy(OracleConfig(**OLD))
    opt.prepare(context(spec, 2 * 100, future=steps))
    assert [(a.key.layer, a.key.expert) for a in opt.initial_loads()] == [(0, 3), (1, 1)]
    assert drive(build_policy(OracleConfig(**OLD)), context(spec, 200, future=steps), steps).misses == 0


def test_lfu_counts_survive_eviction() -> None:
    # 0 is used three times, pushed out by a step needing {1, 2}, then reloaded: its history
    # (4 uses) keeps it over 1 (2 uses); counts reset on eviction would evict 0 instead
    steps = layer_steps([(0, [0]), (0, [0]), (0, [0]), (0, [1, 2]), (0, [1]), (0, [0]), (0, [3])])
    assert [k.expert for k in cold(LfuOffloadConfig, steps, 2).victims] == [0, 2, 1]
    # frequency, not recency: the thrice-used 0 stays while 1, 2, 3 take turns (LRU evicts it)
    steps = single([0, 0, 0, 1, 2, 3, 1, 0, 4])
    assert [k.expert for k in cold(LfuOffloadConfig, steps, 2).victims] == [1, 2, 3, 1]
    assert [k.expert for k in cold(LruOffloadConfig, steps, 2).victims] == [0, 1, 2, 3, 1]


def test_cache_too_small() -> None:
    spec = tiny_spec(experts=8, top_k=2)
    lru = build_policy(LruOffloadConfig(**OLD))
    lru.prepare(context(spec, 199))
    with pytest.raises(ValueError, match="the cache holds 1 experts .* needs up to 2 .* staging_experts is 0"):
        lru.slab_plan()
    steps = layer_steps([(0, [0, 1, 2])])  # a batch needs 3 at once
    with pytest.raises(ValueError, match="layer step 0 .* needs 3 experts at once but the cache holds 2"):
        cold(LruOffloadConfig, steps, 2, spec)
    with pytest.raises(ValueError, match="the cache holds 2 experts .* needs up to 3"):
        cold(OracleConfig, steps, 2, spec)  # the oracle sees it coming


def test_oracle_checks_its_future() -> None:
    steps = single([0, 1])
    policy = build_policy(OracleConfig())
    with pytest.raises(ValueError, match="needs the replay's future"):
        policy.prepare(context(tiny_spec(), 300))
    policy.prepare(context(tiny_spec(), 300, future=steps))
    ledger = SlabLedger(policy.slab_plan(), 300)
    obs = LayerObs(0, 0, 1, 0, np.array([0, 1]), np.ones(2), np.ones(2), 0.0)
    with pytest.raises(ValueError, match="does not match the future"):
        policy.on_layer_step(obs, ledger)


def test_static_uniform_places_everything() -> None:
    spec = tiny_spec(layers=2, experts=4)
    policy = build_policy(StaticUniformConfig(precision="int8"))
    run = drive(policy, context(spec, 8 * 55), layer_steps([(0, [0, 3]), (1, [1, 2])]))
    assert policy.is_static and run.misses == 0 and run.actions == [[], []]
    assert [(c.precision, c.count) for c in policy.slab_plan()] == [("int8", 8)]
    assert len(policy.initial_loads()) == 8


def test_static_uniform_infeasible_budget_message() -> None:
    spec = get_model_spec("Mixtral-8x7B")
    p = build_policy(StaticUniformConfig(precision="int4"))
    bytes_ = {"int4": spec.expert_bytes("int4"), "bf16": spec.expert_bytes("bf16")}
    p.prepare(PolicyContext(spec, 10 * 10**9, np.random.default_rng(0), bytes_))
    need_gb = 256 * spec.expert_bytes("int4") / 1e9
    want = (
        f"static-uniform at int4 needs {need_gb:.3f} GB for 256 experts, budget is 10.000 GB; "
        "raise budget_gb or pick a lower precision"
    )
    with pytest.raises(ValueError) as err:
        p.slab_plan()
    assert str(err.value) == want


def test_static_frequency_picks_the_most_routed() -> None:
    spec = tiny_spec(layers=2, experts=4)
    # tokens per expert: L1E3 x3, L0E2 x2, L0E1 x1 (tie-free top two: L1E3, L0E2)
    profile = layer_steps([(1, [3]), (1, [3]), (0, [2]), (1, [3]), (0, [2]), (0, [1])])
    budget = 8 * 30 + 2 * (100 - 30) + 69  # all int4, two upgrades, not quite a third
    policy = build_policy(StaticFrequencyConfig())
    policy.prepare(context(spec, budget, profile=profile))
    assert [(c.precision, c.count) for c in policy.slab_plan()] == [("bf16", 2), ("int4", 6)]
    placed = {(a.key.layer, a.key.expert): a.precision for a in policy.initial_loads()}
    assert sorted(k for k, p in placed.items() if p == "bf16") == [(0, 2), (1, 3)]
    assert len(placed) == 8
    run = drive(build_policy(StaticFrequencyConfig()), context(spec, budget, profile=profile), profile)
    assert run.misses == 0


def test_static_frequency_errors() -> None:
    spec = tiny_spec(layers=2, experts=4)
    profile = layer_steps([(0, [1])])
    with pytest.raises(ValueError, match="needs a profiling trace"):
        build_policy(StaticFrequencyConfig()).prepare(context(spec, 10**6))
    with pytest.raises(ValueError, match=r"even all at int4, budget is"):
        build_policy(StaticFrequencyConfig()).prepare(context(spec, 8 * 30 - 1, profile=profile))
    with pytest.raises(ValueError, match="must be larger"):
        build_policy(StaticFrequencyConfig(high_precision="int4", low_precision="int8")).prepare(
            context(spec, 10**6, profile=profile)
        )
    with pytest.raises(ValueError, match="outside the model"):
        build_policy(StaticFrequencyConfig()).prepare(context(spec, 10**6, profile=layer_steps([(0, [4])])))


CONFIGS = {
    "static_uniform": StaticUniformConfig,
    "static_frequency": StaticFrequencyConfig,
    "lru_offload": LruOffloadConfig,
    "lfu_offload": LfuOffloadConfig,
    "oracle": OracleConfig,
}


def test_registry_builds_each_policy() -> None:
    known = policy_configs()
    for name, cfg_type in CONFIGS.items():
        assert known[name] is cfg_type
        policy = build_policy(cfg_type())
        assert policy.cfg == cfg_type() and type(policy).__module__ == f"moebits.policies.{name}"
    assert build_policy(OracleConfig()).needs_future and build_policy(StaticFrequencyConfig()).needs_profile


def test_registry_refuses_duplicates_and_unknowns() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_policy(LruOffloadConfig)(Policy)

    @dataclass
    class Clash(LruOffloadConfig):
        pass  # inherits the name "lru_offload"

    with pytest.raises(ValueError, match="unique 'name'"):
        register_policy(Clash)(Policy)
    with pytest.raises(ValueError, match="no policy registered .* known policies: .*lru_offload"):
        build_policy(object())
    with pytest.raises(ValueError, match="unknown precision"):
        build_policy(LruOffloadConfig(precision="fp3"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hydra_preset_composes_to_config(name: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(group="policy", name=f"base_{name}", node=CONFIGS[name])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(overrides=[f"+policy={name}"])
    obj = OmegaConf.to_object(cfg.policy)
    assert obj == CONFIGS[name]()


# ---- properties on random routing ----

@st.composite
def routing(draw):
    """A small model, a random routing sequence and a cache size that can hold any step."""
    layers, experts = draw(st.integers(1, 2)), draw(st.integers(2, 5))
    step = st.tuples(st.integers(0, layers - 1), st.sets(st.integers(0, experts - 1), min_size=1, max_size=3))
    steps = draw(st.lists(step, min_size=1, max_size=14))
    biggest = max(len(es) for _, es in steps)
    slabs = draw(st.integers(biggest, layers * experts))
    return tiny_spec(layers, experts), [(layer, sorted(es)) for layer, es in steps], slabs


def brute_force_misses(steps: list[tuple[int, list[int]]], slabs: int, experts: int) -> int:
    """Fewest misses of any demand-fetch cache of ``slabs`` experts, started empty."""
    states = {frozenset(): 0}
    for layer, es in steps:
        need = frozenset(layer * experts + e for e in es)
        nxt: dict[frozenset, int] = {}
        for cache, cost in states.items():
            miss = need - cache
            over = len(cache) + len(miss) - slabs
            choices = combinations(sorted(cache - need), over) if over > 0 else [()]
            for gone in choices:
                after = (cache - set(gone)) | need
                nxt[after] = min(nxt.get(after, 1 << 30), cost + len(miss))
        states = nxt
    return min(states.values())


@settings(max_examples=120, deadline=None)
@given(case=routing(), slack=st.integers(0, 99), fill=st.sampled_from([InitialFill.AUTO, InitialFill.EMPTY]))
def test_caches_keep_the_contract_and_oracle_is_best(case, slack, fill) -> None:
    spec, seq, slabs = case
    steps = layer_steps(seq)
    misses = {}
    for cfg_type in (LruOffloadConfig, LfuOffloadConfig, OracleConfig):
        ctx = context(spec, slabs * 100 + slack, future=steps)
        misses[cfg_type.name] = drive(build_policy(cfg_type(initial_fill=fill, **OLD)), ctx, steps).misses
    assert misses["oracle"] <= misses["lru_offload"]
    assert misses["oracle"] <= misses["lfu_offload"]
    if fill is InitialFill.EMPTY:
        assert misses["oracle"] == brute_force_misses(seq, slabs, spec.experts)


@settings(max_examples=60, deadline=None)
@given(case=routing(), slack=st.integers(0, 99))
def test_static_policies_keep_the_contract(case, slack) -> None:
    spec, seq, _ = case
    steps = layer_steps(seq)
    n = spec.layers * spec.experts
    assert drive(build_policy(StaticUniformConfig()), context(spec, n * 30 + slack), steps).misses == 0
    run = drive(build_policy(StaticFrequencyConfig()), context(spec, n * 30 + slack * 3, profile=steps), steps)
    assert run.misses == 0
