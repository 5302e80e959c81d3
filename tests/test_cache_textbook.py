"""The simulator's per-layer caches against textbook ones (tests/textbook_caches.py).

``lru_offload``, ``lfu_offload`` and ``oracle`` run through the simulator's engine with a
cache per layer of N slots (``budget.experts``-style budget), started empty, bypass through a
staging slab; the hits the engine counts per layer must equal the textbook's exactly, on
the real traces in ../shared/traces/real (imported with ``moebits traces import``; skipped
when absent) for several N, and on random small cases. Belady with bypass must equal a
brute-force optimum on small cases and never miss more than LRU or LFU. The within-step tie
rules (module docstring of tests/textbook_caches.py) have their own hand-made cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moebits.analysis.prepare import select_seqs
from moebits.core.model_spec import ModelSpec
from moebits.core.routing import LayerSteps
from moebits.policies.base import build_policy
from moebits.policies.lfu_offload import LfuOffloadConfig
from moebits.policies.lru_offload import LruOffloadConfig
from moebits.policies.offload_cache import CacheScope, InitialFill
from moebits.policies.oracle import OracleConfig
from moebits.sim.engine import Engine
from moebits.traces.__main__ import main as traces_main
from moebits.traces.format import read_trace
from moebits.traces.replay import build_view
from sim_testkit import layer_steps, round_hw
from textbook_caches import belady_hits, brute_force_fewest_misses, lfu_hits, lru_hits

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "real"
TEXTBOOK = {"lru_offload": lru_hits, "lfu_offload": lfu_hits, "oracle": belady_hits}
CONFIGS = {"lru_offload": LruOffloadConfig, "lfu_offload": LfuOffloadConfig, "oracle": OracleConfig}


def sim_hits_per_layer(view: LayerSteps, spec: ModelSpec, name: str, slots: int, staging: int = 2) -> np.ndarray:
    """Hits per layer that the engine counts for policy ``name`` with ``slots`` per layer."""
    policy = build_policy(CONFIGS[name](initial_fill=InitialFill.EMPTY, scope=CacheScope.LAYER,
                                        staging_experts=staging))
    budget = policy.per_layer_budget_bytes(spec, slots)
    result = Engine(view, spec, round_hw(), policy, budget).run()
    return np.bincount(np.asarray(view.ls_layer, np.int64), weights=result.hits, minlength=spec.layers).astype(int)


def steps_of_layer(view: LayerSteps, layer: int) -> list[list[int]]:
    """The expert sets of one layer's steps, in replay order."""
    return [view.experts(i).tolist() for i in np.flatnonzero(np.asarray(view.ls_layer) == layer)]


def textbook_hits_per_layer(view: LayerSteps, spec: ModelSpec, name: str, slots: int) -> np.ndarray:
    return np.array([TEXTBOOK[name](steps_of_layer(view, layer), slots) for layer in range(spec.layers)])


def tiny(layers: int, experts: int) -> ModelSpec:
    return ModelSpec("tiny", layers=layers, experts=experts, top_k=1, hidden=64, expert_intermediate=128)


# ---- the tie rules, by hand ----

def test_lru_tie_rule_hits_before_misses() -> None:
    # step 1 hits 1 and misses 0: 1 counts as used before 0 arrives, so step 2 evicts 1, not 0,
    # and step 3's 0 hits (were the step's experts ordered by id alone, 0 would go)
    seq = [[1], [0, 1], [2], [0]]
    assert lru_hits(seq, 2) == 2
    view = layer_steps([(0, s) for s in seq])
    assert sim_hits_per_layer(view, tiny(1, 4), "lru_offload", 2).tolist() == [2]


def test_lfu_tie_rule_least_recent_goes() -> None:
    # 0 and 1 are used once each in step 0 (0 first): the tie goes to the more recent 1
    seq = [[0, 1], [2], [1], [0]]
    assert lfu_hits(seq, 2) == 1
    view = layer_steps([(0, s) for s in seq])
    assert sim_hits_per_layer(view, tiny(1, 4), "lfu_offload", 2).tolist() == [1]


def test_bypass_keeps_the_cache_for_sooner_use() -> None:
    # 2 slots hold 0, 1 (both used again soon); 5 is used once: Belady bypasses it, LRU evicts
    seq = [[0, 1], [5], [0], [1]]
    assert belady_hits(seq, 2) == 2 and lru_hits(seq, 2) == 0  # LRU: 5 evicts 0, 0 evicts 1
    view = layer_steps([(0, s) for s in seq])
    assert sim_hits_per_layer(view, tiny(1, 8), "oracle", 2).tolist() == [2]


def test_a_step_larger_than_the_cache_streams_its_surplus() -> None:
    # 5 experts at once through 2 slots: 0 and 1 are admitted (ascending id), 2..4 bypassed
    seq = [[0, 1, 2, 3, 4], [0, 1], [2]]
    assert lru_hits(seq, 2) == 2
    view = layer_steps([(0, s) for s in seq])
    for name in CONFIGS:
        assert sim_hits_per_layer(view, tiny(1, 8), name, 2).tolist() == [TEXTBOOK[name](seq, 2)]


def test_layers_keep_their_own_slots() -> None:
    # layer 1 thrashing does not evict layer 0's expert (a global pool of 2 would)
    view = layer_steps([(0, [0]), (1, [1]), (1, [2]), (1, [3]), (0, [0])])
    assert sim_hits_per_layer(view, tiny(2, 4), "lru_offload", 1).tolist() == [1, 0]


# ---- random small cases ----

@st.composite
def one_layer(draw):
    experts = draw(st.integers(2, 5))
    steps = draw(st.lists(st.sets(st.integers(0, experts - 1), min_size=1, max_size=3), min_size=1, max_size=7))
    return experts, [sorted(s) for s in steps], draw(st.integers(1, 3))


@settings(max_examples=150, deadline=None)
@given(case=one_layer())
def test_belady_with_bypass_is_optimal(case) -> None:
    experts, seq, slots = case
    requests = sum(len(s) for s in seq)
    best = requests - brute_force_fewest_misses(seq, slots)
    opt = belady_hits(seq, slots)
    assert opt == best
    assert opt >= lru_hits(seq, slots) and opt >= lfu_hits(seq, slots)


@settings(max_examples=60, deadline=None)
@given(case=one_layer(), other=one_layer())
def test_simulator_equals_textbook_on_random_cases(case, other) -> None:
    experts, seq, slots = case
    experts2, seq2, _ = other
    n = max(experts, experts2)
    steps = [(0, s) for s in seq] + [(1, s) for s in seq2]
    order = sorted(range(len(steps)), key=lambda i: (i % max(len(seq), 1), i))  # interleave the layers
    view = layer_steps([steps[i] for i in order])
    spec = tiny(2, n)
    for name in CONFIGS:
        want = textbook_hits_per_layer(view, spec, name, slots)
        assert sim_hits_per_layer(view, spec, name, slots).tolist() == want.tolist(), name


# ---- the real traces ----

@pytest.fixture(scope="module")
def real_views(tmp_path_factory) -> dict[str, tuple[LayerSteps, ModelSpec]]:
    """Mixtral decode (+ one prefill), DeepSeek prefill, Llama-4 prefill + decode (first 12
    sequences), imported with ``moebits traces import``, replayed at batch 1."""
    if not REAL.exists():
        pytest.skip(f"real traces not present at {REAL}")
    out = tmp_path_factory.mktemp("real")
    views = {}
    for folder, seqs in (("mixtral8x7b_speculative-moe", 0), ("deepseekv2lite_moe-beyond", 0),
                         ("llama4maverick_mmlu", 12)):
        path = out / f"{folder}.parquet"
        assert traces_main(["import", str(REAL / folder), "-o", str(path)]) == 0
        trace = read_trace(path)
        if seqs:
            trace = select_seqs(trace, np.unique(trace.seq)[:seqs])
        views[folder] = (build_view(trace, 1), trace.spec)
    return views


CASES = [("mixtral8x7b_speculative-moe", n) for n in (1, 2, 4, 6)] + \
        [("deepseekv2lite_moe-beyond", n) for n in (6, 16, 40)] + \
        [("llama4maverick_mmlu", n) for n in (2, 16, 64)]


@pytest.mark.parametrize(("folder", "slots"), CASES)
def test_simulator_equals_textbook_on_real_traces(real_views, folder: str, slots: int) -> None:
    view, spec = real_views[folder]
    hits = {}
    for name in CONFIGS:
        want = textbook_hits_per_layer(view, spec, name, slots)
        got = sim_hits_per_layer(view, spec, name, slots)
        assert got.tolist() == want.tolist(), name
        hits[name] = got
    assert (hits["oracle"] >= hits["lru_offload"]).all() and (hits["oracle"] >= hits["lfu_offload"]).all()
