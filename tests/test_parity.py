"""Parity of the policy seam: one trace through the simulator and through the runtime (CPU).

What parity means here: the same policy configuration, given the same trace, budget, seed and
sensitivity table, makes the same calls with the same answers on both sides: the same
``initial_loads()``, the same actions returned by every ``on_layer_step`` (same layer step
index, in order), and the same ``on_refused`` reports. Each side wraps its policy in a
recording proxy and the two logs must be equal, element by element; the runtime side must
also have moved the same bytes and served the same precision mix.

Policies see time only through ``obs.now_s`` and the ledger (which copies are READY or still
LOADING, which slabs are free). None of the three policies tested reads ``now_s``; what they
read from the ledger depends on when copies land. So the comparison fixes the logical points
at which a copy turns READY, and both engines honour them: a copy issued at layer step i is
READY at layer step i + 1 (the simulator runs on a link so fast that every copy completes
within the next non-MoE time; the runtime's CPU mode completes copies synchronously but marks
them READY only at the next step's poll, or when a step waits for them, exactly as the
simulator's clock does), and a kernel's pins are released before the next policy call (the
simulator never holds them across steps; on CPU the runtime's fences close at once). On a
GPU, copies land when the PCIe link delivers them, so decisions may diverge from the
simulator's wherever the simulated and real copy times disagree: that is what calibration is
for, not a parity failure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moebits.core.config import BudgetConfig, ModelConfig, WorkloadConfig, WorkloadKind  # noqa: E402
from moebits.core.hardware import HardwareProfile, LinkCurve  # noqa: E402
from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.core.precision import get_channel_mix  # noqa: E402
from moebits.core.slabs import Refusal, SlabClass, SlabLedger  # noqa: E402
from moebits.drive.context import PolicyError  # noqa: E402
from moebits.policies.base import (  # noqa: E402
    Action,
    LayerObs,
    MissRule,
    Policy,
    PolicyContext,
    build_policy,
    policy_configs,
)
from moebits.policies.offload_cache import CacheScope  # noqa: E402
from moebits.runtime.engine import RuntimeEngine  # noqa: E402
from moebits.runtime.host_store import HostStore  # noqa: E402
from moebits.runtime.replay import replay  # noqa: E402
from moebits.sim import runner as sim_runner  # noqa: E402
from moebits.sim.config import RunConfig  # noqa: E402
from moebits.sim.engine import EngineOptions  # noqa: E402
from moebits.traces.format import write_trace  # noqa: E402
from moebits.traces.replay import load_view  # noqa: E402
from moebits.traces.zipf import synth_trace  # noqa: E402

SPEC = ModelSpec("parity", layers=3, experts=8, top_k=2, hidden=128, expert_intermediate=128, vocab_size=64)


class Recording(Policy):
    """A transparent proxy that logs every call of the seam and its answer."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.log: list[tuple[Any, ...]] = []
        self.observed: list[LayerObs] = []
        self.cfg = getattr(inner, "cfg", None)
        self.miss_rule = inner.miss_rule
        self.needs_future, self.needs_profile = inner.needs_future, inner.needs_profile  # type: ignore[misc]

    @property
    def is_static(self) -> bool:
        return self.inner.is_static

    def prepare(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.inner.prepare(ctx)

    def slab_plan(self) -> list[SlabClass]:
        plan = self.inner.slab_plan()
        self.log.append(("plan", tuple(plan)))
        return plan

    def staging(self) -> SlabClass | None:
        return self.inner.staging()

    def initial_loads(self) -> list[Action]:
        loads = self.inner.initial_loads()
        self.log.append(("initial", tuple(loads)))
        return loads

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        self.observed.append(obs)
        actions = self.inner.on_layer_step(obs, res)
        self.log.append(("step", obs.index, obs.layer, obs.phase, obs.pass_index, tuple(obs.experts.tolist()),
                         tuple(obs.tokens.tolist()), tuple(actions)))
        return actions

    def on_refused(self, action: Action, reason: Refusal) -> None:
        self.log.append(("refused", action, reason))
        self.inner.on_refused(action, reason)

    def __getattr__(self, name: str) -> Any:  # metrics() and friends
        return getattr(self.inner, name)


def fast_link_hw() -> HardwareProfile:
    """A machine whose PCIe copies finish within nanoseconds: every copy lands before the next step."""
    link = LinkCurve(latency_s=0.0, sizes_bytes=[1.0], gbps=[1e9])
    return HardwareProfile(name="fast_link", hbm_capacity_gb=80.0, hbm_gbps=2000.0, h2d=link, d2h=link,
                           peak_tflops={"bf16": 1000.0}, launch_s=20e-6)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    trace = synth_trace(SPEC, np.random.default_rng(3), seqs=3, prompt_tokens=4, decode_tokens=12, skew=1.2, reuse=0.4)
    return write_trace(trace, tmp_path_factory.mktemp("parity") / "parity.parquet")


@pytest.fixture(scope="module")
def store() -> HostStore:
    gen = torch.Generator().manual_seed(0)
    weights = [(0.05 * torch.randn(SPEC.experts, 2 * SPEC.expert_intermediate, SPEC.hidden, generator=gen),
                0.05 * torch.randn(SPEC.experts, SPEC.hidden, SPEC.expert_intermediate, generator=gen))
               for _ in range(SPEC.layers)]
    return HostStore(SPEC, pin=False).fill_bf16(lambda layer: weights[layer])


BUDGET = ("bf16", 0.6)  # 60 % of the experts in bf16: every registered policy fits and has to choose
KNOBS: dict[str, dict[str, Any]] = {  # knobs that make a policy act within this short trace
    "dynaexq": {"min_residency": 2, "max_promotions_per_step": 2},
    "dynamo": {"min_residency": 1, "mix_budget_share": 0.3},
    # the caches at their presets (a cache per layer, bypass through 2 staging slots), and lru_offload
    # also as one pool without staging (``lru_offload_global`` below)
}
BUDGETS = {"dynamo": ("int4", 0.9)}  # keeps low-baseline experts that channel-mix copies can raise


def policy_cases() -> list[Any]:
    """Every registered policy (from the registry) under every miss rule it supports."""
    out = []
    for name, cfg_type in sorted(policy_configs().items()):
        policy = build_policy(cfg_type())
        out += [pytest.param(name, rule) for rule in type(policy).supported_miss_rules]
    return out


def policy_config(name: str, rule: MissRule) -> Any:
    return dataclasses.replace(policy_configs()[name](**KNOBS.get(name, {})), miss_rule=rule)


def _sim_run(monkeypatch: pytest.MonkeyPatch, policy_cfg: Any, budget: tuple[str, float], path: Path,
             lag: int = 0, route_lag: int = 0) -> tuple:
    made: list[Recording] = []

    def recording_build(cfg: Any) -> Policy:
        made.append(Recording(build_policy(cfg)))
        return made[-1]

    monkeypatch.setattr(sim_runner, "build_policy", recording_build)
    cfg = RunConfig(model=ModelConfig.from_spec(SPEC), hardware=fast_link_hw(), policy=policy_cfg,
                    workload=WorkloadConfig(kind=WorkloadKind.FILE, path=str(path)),
                    budget=BudgetConfig(*budget), seed=5, quality_table="analytic", progress=False, figure=False,
                    observe_lag=lag, route_lag=route_lag)
    result, summary = sim_runner.simulate(cfg, EngineOptions(served=True))
    return made[-1].log, result, summary


def _runtime_run(policy_cfg: Any, budget: tuple[str, float], path: Path, store: HostStore, lag: int = 0) -> tuple:
    policy = Recording(build_policy(policy_cfg))
    budget_bytes = int(budget[1] * SPEC.all_experts_bytes(budget[0]))
    view = load_view(path, 1, cache=False)
    profile = view if policy.needs_profile else None
    engine = RuntimeEngine(SPEC, policy, budget_bytes, store, seed=5, profile=profile, future=view, served=True,
                           observe_lag=lag, hardware=fast_link_hw())  # the sim's profile: mxmoe weighs its kernel times
    return policy.log, replay(engine, view), engine


def _compare(sim: tuple, rt: tuple) -> None:
    (sim_log, sim_result, summary), (rt_log, rt_result, engine) = sim, rt
    assert len(rt_log) == len(sim_log)
    for i, (a, b) in enumerate(zip(sim_log, rt_log, strict=True)):
        assert a == b, f"decision {i} differs: sim {a} vs runtime {b}"
    for col in ("ls_batch", "ls_pass", "ls_tokens"):  # pass, phase (pass 0 = prefill) and tokens per step
        assert np.array_equal(getattr(sim_result, col), getattr(rt_result, col)), col
    assert len(sim_result.served) == len(rt_result.served) == sim_result.layer_steps
    for i, (a, b) in enumerate(zip(sim_result.served, rt_result.served, strict=True)):
        assert a == b, f"layer step {i} served differently: sim {a} vs runtime {b}"  # (expert, tokens, precision)
    rt = engine.snapshot()  # weight bytes (activations to and from the host differ: fp32 on the CPU)
    assert rt[3] == summary["promotions"] and rt[5] == summary["demotions"]
    copies = summary["promotions"] + summary["prefetches"]
    if any(get_channel_mix(p) for p in rt_result.precisions):  # a packed mix pads its planned bytes to 4
        assert 0 <= rt[2] - summary["h2d_weight_bytes"] <= 3 * copies
    else:
        assert rt[2] == summary["h2d_weight_bytes"]
    assert rt[6] == summary["refusals"]
    mix = dict(zip([*rt_result.precisions, "host"], rt_result.act.sum(0).tolist(), strict=True))
    assert mix == summary["activations"]


@pytest.mark.parametrize(("name", "rule"), policy_cases())
def test_same_decisions_in_sim_and_runtime(name: str, rule: MissRule, monkeypatch: pytest.MonkeyPatch,
                                           trace_path: Path, store: HostStore) -> None:
    torch.set_num_threads(1)
    cfg, budget = policy_config(name, rule), BUDGETS.get(name, BUDGET)
    sim = _sim_run(monkeypatch, cfg, budget, trace_path)
    if not build_policy(cfg).is_static:
        assert sum(len(e[-1]) for e in sim[0] if e[0] == "step") > 0, "the case must exercise decisions"
    _compare(sim, _runtime_run(cfg, budget, trace_path, store))


@pytest.mark.parametrize("name", ["lru_offload", "oracle", "hobbit"])
def test_same_decisions_one_pool_without_staging(name: str, monkeypatch: pytest.MonkeyPatch, trace_path: Path,
                                                 store: HostStore) -> None:
    """The caches as the old single pool with no bypass (scope GLOBAL, staging_experts 0)."""
    torch.set_num_threads(1)
    cfg = dataclasses.replace(policy_configs()[name](), scope=CacheScope.GLOBAL, staging_experts=0)
    _compare(_sim_run(monkeypatch, cfg, BUDGET, trace_path), _runtime_run(cfg, BUDGET, trace_path, store))


@pytest.mark.parametrize("lag", [1, 3])
@pytest.mark.parametrize(("name", "rule"), [c for c in policy_cases() if not c.marks])
def test_same_decisions_with_observation_lag(name: str, rule: MissRule, lag: int, monkeypatch: pytest.MonkeyPatch,
                                             trace_path: Path, store: HostStore) -> None:
    """With ``observe_lag`` on, both engines still match decision for decision, and the policy
    saw each step's routing ``lag`` steps late -- except under STALL, where the seam's rule
    (:func:`drive.driver.applied_lag`) is lag 0: demand fetch syncs per layer. A demand-fetch
    cache under SERVE_LOWER cannot fetch an expert for the step that needs it before it sees
    that step: both engines then stop with the same contract error."""
    torch.set_num_threads(1)
    cfg, budget = policy_config(name, rule), BUDGETS.get(name, BUDGET)
    try:
        sim = _sim_run(monkeypatch, cfg, budget, trace_path, lag)
    except PolicyError as exc:
        assert rule is MissRule.SERVE_LOWER and "has no copy and none in flight" in str(exc)
        with pytest.raises(PolicyError) as rt_exc:
            _runtime_run(cfg, budget, trace_path, store, lag)
        assert str(rt_exc.value) == str(exc)
        return
    rt = _runtime_run(cfg, budget, trace_path, store, lag)
    _compare(sim, rt)
    steps = [e for e in sim[0] if e[0] == "step"]
    if not build_policy(cfg).is_static:
        applied = 0 if rule is MissRule.STALL else lag
        assert len(steps) == sim[1].layer_steps - applied and [e[1] for e in steps] == list(range(len(steps)))


def test_parity_fails_when_copies_land_late(monkeypatch: pytest.MonkeyPatch, trace_path: Path,
                                            store: HostStore) -> None:
    """The comparison can fail: a runtime whose copies never turn READY at the step poll decides otherwise."""
    cfg = policy_config("dynaexq", MissRule.SERVE_LOWER)
    sim_log = _sim_run(monkeypatch, cfg, BUDGET, trace_path)[0]
    from moebits.runtime import promote
    monkeypatch.setattr(promote.Promoter, "poll", lambda self: 0)
    rt_log = _runtime_run(cfg, BUDGET, trace_path, store)[0]
    assert len(rt_log) == len(sim_log) and rt_log != sim_log


def test_policy_observes_what_the_models_router_produced() -> None:
    """Live generation: the routing a policy observes is exactly the tiny model's router output."""
    from moebits.runtime import hf
    from moebits.traces.capture import find_routers, parse_router_output

    spec = ModelSpec("Qwen3-30B-A3B", layers=2, experts=16, top_k=4, hidden=128, expert_intermediate=128,
                     vocab_size=512)
    model, weights = hf.build_random_model(spec, seed=3, full_hidden=2048)
    store = HostStore(spec, pin=False).fill_bf16(weights)
    policy = Recording(build_policy(policy_config("dynaexq", MissRule.SERVE_LOWER)))
    engine = RuntimeEngine(spec, policy, int(spec.all_experts_bytes("int4") + 6 * spec.expert_bytes("bf16")), store)
    runtime = hf.HFRuntime(spec, store, engine, "cpu")
    hf.install(model, runtime)
    produced: list[tuple] = []

    def hook(site: Any) -> Any:
        def record(module: Any, args: Any, output: Any) -> None:
            ids, w = parse_router_output(output, spec.top_k, site.name)
            e = ids.reshape(-1).long()
            used = torch.unique(e)
            produced.append((site.moe_layer, tuple(used.tolist()), tuple((e[:, None] == used).sum(0).tolist()),
                             tuple(torch.zeros(spec.experts, dtype=torch.float64).index_add_(
                                 0, e, w.reshape(-1).double())[used].tolist())))
        return record

    handles = [s.module.register_forward_hook(hook(s)) for s in find_routers(model)]
    prompts = torch.from_numpy(hf.random_prompts(2, 5, spec.vocab_size, np.random.default_rng(0)))
    hf.generate(model, engine, prompts, 3)
    for h in handles:
        h.remove()
    observed = [(o.layer, tuple(o.experts.tolist()), tuple(o.tokens.tolist()), tuple(o.gate.tolist()))
                for o in policy.observed]
    assert len(observed) == len(produced) == 4 * spec.layers
    for (la, ea, ta, ga), (lb, eb, tb, gb) in zip(observed, produced, strict=True):
        assert (la, ea, ta) == (lb, eb, tb)
        assert ga == pytest.approx(gb, rel=1e-6)
