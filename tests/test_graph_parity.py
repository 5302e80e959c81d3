"""Parity of the graph path: one trace through the simulator and the graph-captured runtime (CPU).

The graph path (:class:`runtime.graph_engine.GraphEngine`: the fast model over a residency table,
the expert mover, graphs off and torch reference kernels on the CPU) replays the trace with its
routing forced into the fast model's routing buffers. Parity means what ``test_parity`` means:
the same policy calls with the same answers, and per layer step the same tokens, phase and
precision served (``_compare``), with observation lag 0 and > 0.

The per-layer seam runs every policy with its preset's staging slab (bypassed experts streamed through
spare pool slots); the per-pass seam, which cannot stream a bypassed expert, runs them with
``staging_experts=0`` in both engines.

Not covered, and why: ``MissRule.HOST`` (the graph path computes no expert on the host) and a
staging slab on the per-pass seam. The eager runtime serves both; the graph path refuses them with one
clear error, tested below. ``dynamo``'s channel-mix copies are served by the fused kernels' mix class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moebits.core.slabs import InfeasibleError  # noqa: E402
from moebits.drive.context import PolicyError  # noqa: E402
from moebits.drive.driver import per_pass  # noqa: E402
from moebits.policies.base import MissRule, build_policy  # noqa: E402
from moebits.runtime import hf  # noqa: E402
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights  # noqa: E402
from moebits.runtime.graph_engine import GraphEngine  # noqa: E402
from moebits.runtime.host_store import HostStore  # noqa: E402
from moebits.runtime.replay import graph_replay, replay_shape  # noqa: E402
from moebits.traces.replay import load_view  # noqa: E402
from test_parity import (  # noqa: E402
    BUDGET,
    BUDGETS,
    SPEC,
    Recording,
    _compare,
    _sim_run,
    policy_cases,
    policy_config,
    trace_path,  # noqa: F401  (fixture)
)


def graph_cases() -> list[Any]:
    return [c for c in policy_cases() if c.values[1] is not MissRule.HOST]


def no_staging(cfg: Any) -> Any:
    """The config without a staging slab (the per-pass seam streams no bypassed expert), same in both engines."""
    return dataclasses.replace(cfg, staging_experts=0) if hasattr(cfg, "staging_experts") else cfg


@pytest.fixture(scope="module")
def model_parts() -> tuple[Any, Any, HostStore]:
    """Non-expert weights of a tiny Qwen3-MoE of the parity spec, its expert weights, a host store."""
    model, weights = hf.build_random_model(dataclasses.replace(SPEC, name="Qwen3-30B-A3B"), arch="qwen3_moe",
                                           dtype=torch.bfloat16, full_hidden=2048, std=0.05)
    store = HostStore(SPEC, pin=False, quant_device="cpu").fill_bf16(weights)
    return model, weights, store.require(["int8", "int4", "int3", "int2", "fp8"])


def graph_engine(policy: Any, budget: tuple[str, float], view: Any, parts: tuple, lag: int,
                 route_lag: int = 0) -> GraphEngine:
    model, weights, store = parts
    rows, seqs, max_len = replay_shape(view)
    fw, shape = FastWeights.from_hf(model), AttnShape.from_hf_config(model.config)

    def make(pool: Any, table: Any) -> FastModel:
        return FastModel(fw, SPEC, shape, pool, table, use_triton=False, max_seqs=seqs, max_len=max_len)

    budget_bytes = int(budget[1] * SPEC.all_experts_bytes(budget[0]))
    engine = GraphEngine(SPEC, policy, budget_bytes, make, weights, store.row, seed=5,
                         profile=view if policy.needs_profile else None, future=view, observe_lag=lag, replay=True,
                         served=True, max_rows=rows, route_lag=max(route_lag, 1), per_pass=per_pass(policy, route_lag))
    store.require(engine.precisions)   # a channel mix (dynamo) is known once its policy is built
    return engine


def _graph_run(cfg: Any, budget: tuple[str, float], path: Path, parts: tuple, lag: int, route_lag: int = 0) -> tuple:
    policy = Recording(build_policy(cfg))
    view = load_view(path, 1, cache=False)
    engine = graph_engine(policy, budget, view, parts, lag, route_lag)
    return policy.log, graph_replay(engine, view), engine


@pytest.mark.parametrize("lag", [0, 2])
@pytest.mark.parametrize(("name", "rule"), graph_cases())
def test_graph_path_decides_as_the_simulator(name: str, rule: MissRule, lag: int, monkeypatch: pytest.MonkeyPatch,
                                             trace_path: Path, model_parts: tuple) -> None:  # noqa: F811
    torch.set_num_threads(1)
    cfg, budget = policy_config(name, rule), BUDGETS.get(name, BUDGET)
    try:
        sim = _sim_run(monkeypatch, cfg, budget, trace_path, lag)
    except (PolicyError, InfeasibleError) as exc:  # the same contract error in both engines: a demand-fetch
        with pytest.raises(type(exc)) as rt_exc:    # cache with lag, or a step that needs more than a cache holds
            _graph_run(cfg, budget, trace_path, model_parts, lag)
        assert str(rt_exc.value) == str(exc)
        return
    _compare(sim, _graph_run(cfg, budget, trace_path, model_parts, lag))


@pytest.mark.parametrize(("route_lag", "lag"), [(1, 0), (2, 0), (2, 3)])
@pytest.mark.parametrize(("name", "rule"), graph_cases())
def test_per_pass_seam_decides_as_the_simulator(name: str, rule: MissRule, route_lag: int, lag: int,
                                                monkeypatch: pytest.MonkeyPatch, trace_path: Path,  # noqa: F811
                                                model_parts: tuple) -> None:
    """The per-pass seam (``route_lag`` passes, whole-step graphs on a GPU, eager here): the same
    decisions and the same precision served at every layer step as :mod:`sim.passes`."""
    torch.set_num_threads(1)
    cfg, budget = no_staging(policy_config(name, rule)), BUDGETS.get(name, BUDGET)
    try:
        sim = _sim_run(monkeypatch, cfg, budget, trace_path, lag, route_lag)
    except (PolicyError, InfeasibleError) as exc:
        with pytest.raises(type(exc)) as rt_exc:
            _graph_run(cfg, budget, trace_path, model_parts, lag, route_lag)
        assert str(rt_exc.value) == str(exc)
        return
    _compare(sim, _graph_run(cfg, budget, trace_path, model_parts, lag, route_lag))


def test_forced_routing_is_what_the_policy_observed(trace_path: Path, model_parts: tuple) -> None:  # noqa: F811
    """The replayed trace's routing reaches the policy unchanged: experts, tokens and gate of every layer step."""
    policy = Recording(build_policy(policy_config("dynaexq", MissRule.SERVE_LOWER)))
    view = load_view(trace_path, 1, cache=False)
    graph_replay(graph_engine(policy, BUDGET, view, model_parts, 0), view)
    assert len(policy.observed) == view.layer_steps
    for i, o in enumerate(policy.observed):
        a, b = int(view.offsets[i]), int(view.offsets[i + 1])
        assert (o.index, o.layer, o.pass_index) == (i, int(view.ls_layer[i]), int(view.ls_pass[i]))
        assert o.experts.tolist() == view.ex_expert[a:b].tolist()
        assert o.tokens.tolist() == view.ex_tokens[a:b].tolist()
        np.testing.assert_allclose(o.gate, view.ex_gate[a:b], rtol=1e-3)


def test_unsupported_policies_are_one_clear_error(trace_path: Path, model_parts: tuple) -> None:  # noqa: F811
    view = load_view(trace_path, 1, cache=False)
    with pytest.raises(ValueError, match="MissRule.HOST runs in the eager runtime"):
        graph_engine(build_policy(policy_config("lru_offload", MissRule.HOST)), BUDGET, view, model_parts, 0)
    with pytest.raises(ValueError, match="per-layer seam only; run it with route_lag=0"):
        graph_engine(build_policy(policy_config("hobbit", MissRule.SERVE_LOWER)), BUDGETS.get("hobbit", BUDGET), view,
                     model_parts, 0, route_lag=2)


def test_staged_experts_compute_what_resident_ones_do(trace_path: Path, model_parts: tuple) -> None:  # noqa: F811
    """A bf16 cache too small for its layer steps (misses streamed through 2 staging slots) gives, pass for pass,
    the logits of every expert resident in bf16: a staged launch serves exactly its expert, once."""
    from moebits.runtime.replay import _fill_tokens, _pass_input

    torch.set_num_threads(1)
    view = load_view(trace_path, 1, cache=False)
    cache = graph_engine(build_policy(policy_config("lru_offload", MissRule.STALL)), ("bf16", 0.3), view,
                         model_parts, 0)
    full = graph_engine(build_policy(dataclasses.replace(policy_config("static_uniform", MissRule.SERVE_LOWER),
                                                         precision="bf16")), ("bf16", 1.0), view, model_parts, 0)
    L = SPEC.layers
    inputs = [_pass_input(cache, view, i, p) for p, i in enumerate(range(0, view.layer_steps, L))]
    _fill_tokens(inputs, SPEC.vocab_size, 0)
    for p in inputs:   # the same sums in another order at most (staged experts first)
        torch.testing.assert_close(cache.run_pass(p).float().clone(), full.run_pass(p).float(), rtol=1e-2, atol=1e-2)
    assert cache.counts["bypasses"] > 0 and cache.staged_bytes == cache.counts["bypasses"] * SPEC.expert_bytes("bf16")
    assert cache.snapshot()[0] == cache.mover.stats.h2d_bytes + cache.staged_bytes   # the link carried both


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staged_experts_on_cuda(tmp_path: Path) -> None:
    """Per-layer graphs, Triton kernels: a bf16 cache streaming misses through 2 staging slots gives the logits
    of every expert resident in bf16, pass for pass (the staged launches are eager, between the graphs)."""
    from moebits.runtime.graph_serve import GraphMode
    from moebits.runtime.replay import _fill_tokens, _pass_input
    from moebits.traces.format import write_trace
    from moebits.traces.zipf import synth_trace

    spec = dataclasses.replace(SPEC, hidden=256)
    trace = synth_trace(spec, np.random.default_rng(3), seqs=2, prompt_tokens=4, decode_tokens=12, skew=1.2, reuse=0.4)
    view = load_view(write_trace(trace, tmp_path / "t.parquet"), 1, cache=False)
    model, weights = hf.build_random_model(dataclasses.replace(spec, name="Qwen3-30B-A3B"), arch="qwen3_moe",
                                           device="cuda", dtype=torch.bfloat16, full_hidden=2048, std=0.05)
    store = HostStore(spec, pin=True, quant_device="cuda").fill_bf16(weights)
    rows, seqs, max_len = replay_shape(view)
    fw, shape = FastWeights.from_hf(model), AttnShape.from_hf_config(model.config)

    def engine(cfg: Any, fraction: float) -> GraphEngine:
        def make(pool: Any, table: Any) -> FastModel:
            return FastModel(fw, spec, shape, pool, table, use_triton=True, max_seqs=seqs, max_len=max_len)
        return GraphEngine(spec, build_policy(cfg), int(fraction * spec.all_experts_bytes("bf16")), make, weights,
                           store.row, device="cuda", mode=GraphMode.LAYER, route_lag=0, replay=True, max_rows=rows)

    cache = engine(policy_config("lru_offload", MissRule.STALL), 0.3)
    full = engine(dataclasses.replace(policy_config("static_uniform", MissRule.SERVE_LOWER), precision="bf16"), 1.0)
    inputs = [_pass_input(cache, view, i, p) for p, i in enumerate(range(0, view.layer_steps, spec.layers))]
    _fill_tokens(inputs, spec.vocab_size, 0)
    for p in inputs:
        torch.testing.assert_close(cache.run_pass(p).float().clone(), full.run_pass(p).float(), rtol=2e-2, atol=2e-2)
    assert cache.counts["bypasses"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "rule"), [("dynaexq", MissRule.SERVE_LOWER), ("lru_offload", MissRule.STALL)])
def test_graph_path_on_cuda(name: str, rule: MissRule, tmp_path: Path) -> None:
    """CUDA, Triton kernels, WHOLE graphs: dynaexq observes per pass (route lag 1), lru (STALL) is split
    into per-layer graphs; every layer step is recorded and the policy observed the trace's routing."""
    per_pass_run(name, rule, tmp_path, "cuda")


@pytest.mark.parametrize(("name", "rule"), [("dynaexq", MissRule.SERVE_LOWER), ("lru_offload", MissRule.STALL)])
def test_graph_path_per_pass_cpu(name: str, rule: MissRule, tmp_path: Path) -> None:
    """The same per-pass seam on the CPU (eager steps, torch kernels)."""
    per_pass_run(name, rule, tmp_path, "cpu")


def per_pass_run(name: str, rule: MissRule, tmp_path: Path, device: str) -> None:
    from moebits.runtime.graph_serve import GraphMode
    from moebits.traces.format import write_trace
    from moebits.traces.zipf import synth_trace

    cuda = device == "cuda"

    spec = dataclasses.replace(SPEC, hidden=256)
    trace = synth_trace(spec, np.random.default_rng(3), seqs=2, prompt_tokens=4, decode_tokens=12, skew=1.2, reuse=0.4)
    view = load_view(write_trace(trace, tmp_path / "t.parquet"), 1, cache=False)
    model, weights = hf.build_random_model(dataclasses.replace(spec, name="Qwen3-30B-A3B"), arch="qwen3_moe",
                                           device=device, dtype=torch.bfloat16, full_hidden=2048, std=0.05)
    store = HostStore(spec, pin=cuda, quant_device=device).fill_bf16(weights)
    rows, seqs, max_len = replay_shape(view)
    fw, shape = FastWeights.from_hf(model), AttnShape.from_hf_config(model.config)

    def make(pool: Any, table: Any) -> FastModel:
        return FastModel(fw, spec, shape, pool, table, use_triton=cuda, max_seqs=seqs, max_len=max_len)

    policy = Recording(build_policy(no_staging(policy_config(name, rule))))
    budget = int(0.9 * spec.all_experts_bytes("bf16"))  # every prefill step's experts fit a layer's cache
    mode = GraphMode.WHOLE if cuda else GraphMode.EAGER
    eng = GraphEngine(spec, policy, budget, make, weights, store.row, device=device, mode=mode, route_lag=1,
                      replay=True, served=True, max_rows=rows, per_pass=True)
    if cuda:
        assert eng.mode is (GraphMode.LAYER if rule is MissRule.STALL else GraphMode.WHOLE)
    result = graph_replay(eng, view)
    assert result.layer_steps == view.layer_steps
    unobserved = 0 if rule is MissRule.STALL else spec.layers  # per pass: the last pass is recorded, not observed
    assert len(policy.observed) == view.layer_steps - unobserved
    for i, o in enumerate(policy.observed):
        a, b = int(view.offsets[i]), int(view.offsets[i + 1])
        assert o.experts.tolist() == view.ex_expert[a:b].tolist() and o.tokens.tolist() == view.ex_tokens[a:b].tolist()
    for i, row in enumerate(result.served):
        a, b = int(view.offsets[i]), int(view.offsets[i + 1])
        assert [(e, t) for e, t, _ in row] == list(zip(view.ex_expert[a:b].tolist(), view.ex_tokens[a:b].tolist(),
                                                       strict=True))
    assert torch.isfinite(eng.runner(1).buf.logits.float()).all()
