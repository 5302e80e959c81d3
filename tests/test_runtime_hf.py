"""moebits experts inside transformers models (CPU, tiny configs): the ExpertsInterface hook
reproduces transformers' own experts at bf16 and deviates boundedly at int4, for Qwen3-MoE,
Mixtral, OLMoE and DeepSeek-V3; random-weight models build without expert weights on the device."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.policies.base import build_policy  # noqa: E402
from moebits.policies.dynaexq import DynaExqConfig  # noqa: E402
from moebits.policies.static_uniform import StaticUniformConfig  # noqa: E402
from moebits.runtime import hf  # noqa: E402
from moebits.runtime.engine import RuntimeEngine  # noqa: E402
from moebits.runtime.host_store import HostStore  # noqa: E402
from moebits.traces.capture import spec_from_hf_config  # noqa: E402

TINY = ModelSpec("tiny", layers=2, experts=8, top_k=2, hidden=128, expert_intermediate=128, vocab_size=300)


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _engine(spec: ModelSpec, store: HostStore, precision: str) -> RuntimeEngine:
    policy = build_policy(StaticUniformConfig(precision=precision))
    return RuntimeEngine(spec, policy, spec.all_experts_bytes(precision), store)


@pytest.mark.parametrize("arch", hf.ARCHS)
def test_moebits_experts_match_transformers_own(arch: str) -> None:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf.hf_config(TINY, arch)).eval()
    hf.set_experts_implementation(model, "eager")
    ids = torch.randint(0, TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    ref, _ = hf.forward_logits(model, ids, False, keep=6)
    spec = spec_from_hf_config(model.config)
    assert (spec.layers, spec.experts, spec.hidden) == (2, 8, 128)
    store = hf.store_from_model(model, spec, pin=False)
    errs = {}
    for precision in ("bf16", "int4"):
        runtime = hf.HFRuntime(spec, store, _engine(spec, store, precision), "cpu")
        hf.install(model, runtime, free=precision == "int4")
        out, _ = hf.forward_logits(model, ids, False, keep=6)
        errs[precision] = _rel(out, ref)
        if precision == "int4":
            assert model.model.layers[0].mlp.experts.gate_up_proj.numel() == 0  # weights live in the store
            assert float(hf.kl_divergence(ref, out).mean()) < 0.01
    assert errs["bf16"] < 5e-3  # bf16-stored weights vs transformers' fp32 ones
    assert 3 * errs["bf16"] < errs["int4"] < 0.35


def test_random_model_generates_with_the_policy_in_the_loop() -> None:
    spec = ModelSpec("Qwen3-30B-A3B", layers=2, experts=16, top_k=4, hidden=128, expert_intermediate=128,
                     vocab_size=512)
    model, weights = hf.build_random_model(spec, seed=3, full_hidden=2048)
    assert all(m.gate_up_proj.numel() == 0 for m in hf.experts_modules(model))
    store = HostStore(spec, pin=False).fill_bf16(weights)
    policy = build_policy(DynaExqConfig(min_residency=1))
    engine = RuntimeEngine(spec, policy, int(spec.all_experts_bytes("int4") + 6 * spec.expert_bytes("bf16")), store)
    runtime = hf.HFRuntime(spec, store, engine, "cpu")
    hf.install(model, runtime)
    prompts = torch.from_numpy(hf.random_prompts(2, 5, spec.vocab_size, np.random.default_rng(0)))
    gen = hf.generate(model, engine, prompts, 4)
    assert gen.tokens.shape == (2, 9) and gen.logits.shape == (2, 5, spec.vocab_size)
    kl = hf.kl_divergence(hf.reference_logits(model, runtime, gen), gen.logits)
    assert torch.isfinite(kl).all() and float(kl.max()) < 0.05 and float(kl.mean()) > 0
    assert engine.steps == 5 * spec.layers and engine.counts["promotions"] > 0
    # the same model served all-bf16 reproduces the reference exactly
    exact = hf.HFRuntime(spec, store, _engine(spec, store, "bf16"), "cpu")
    hf.install(model, exact)
    again = hf.generate(model, exact.engine, prompts, 4)
    assert float(hf.kl_divergence(hf.reference_logits(model, exact, again), again.logits).max()) < 1e-6


def test_trace_routing_replaces_the_router_in_live_runs_and_in_the_reference() -> None:
    from moebits.traces.replay import build_view
    from moebits.traces.zipf import synth_trace

    spec = ModelSpec("Qwen3-30B-A3B", layers=2, experts=16, top_k=4, hidden=128, expert_intermediate=128,
                     vocab_size=512)
    view = build_view(synth_trace(spec, np.random.default_rng(1), seqs=2, prompt_tokens=5, decode_tokens=4), 1)
    model, weights = hf.build_random_model(spec, seed=4, full_hidden=2048)
    store = HostStore(spec, pin=False).fill_bf16(weights)
    engine = _engine(spec, store, "bf16")
    runtime = hf.HFRuntime(spec, store, engine, "cpu", routing=hf.TraceRouting(view, spec.top_k))
    hf.install(model, runtime)
    prompts = torch.from_numpy(hf.random_prompts(2, 5, spec.vocab_size, np.random.default_rng(0)))
    for b in range(2):
        gen = hf.generate(model, engine, prompts[b : b + 1], 4, batch=b)
        assert float(hf.kl_divergence(hf.reference_logits(model, runtime, gen), gen.logits).max()) < 1e-6
    assert sum(engine.rec.act) == int(view.ex_tokens.sum())  # every routed pair came from the trace
    with pytest.raises(ValueError, match="no layer step"):
        hf.generate(model, engine, prompts[:1, :3], 1, batch=0)
