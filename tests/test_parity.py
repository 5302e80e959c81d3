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
from moebits.core.slabs import Refusal, SlabClass, SlabLedger  # noqa: E402
from moebits.policies.base import Action, LayerObs, Policy, PolicyContext, build_policy  # noqa: E402
from moebits.policies.dynaexq import DynaExqConfig  # noqa: E402
from moebits.policies.lru_offload import LruOffloadConfig  # noqa: E402
from moebits.policies.static_frequency import StaticFrequencyConfig  # noqa: E402
from moebits.runtime.engine import RuntimeEngine, replay  # noqa: E402
from moebits.runtime.host_store import HostStore  # noqa: E402
from moebits.sim import runner as sim_runner  # noqa: E402
from moebits.sim.config import RunConfig  # noqa: E402
from moebits.traces.format import write_trace  # noqa: E402
from moebits.traces.replay import load_view  # noqa: E402
from moebits.traces.zipf import synth_trace  # noqa: E402

SPEC = ModelSpec("parity", layers=3, experts=8, top_k=2, hidden=128, expert_intermediate=128, vocab_size=64)


class Recording(Policy):
    """A transparent proxy that logs every call of the seam and its answer."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.log: list[tuple[Any, ...]] = []
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

    def initial_loads(self) -> list[Action]:
        loads = self.inner.initial_loads()
        self.log.append(("initial", tuple(loads)))
        return loads

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        actions = self.inner.on_layer_step(obs, res)
        self.log.append(("step", obs.index, obs.layer, obs.pass_index, tuple(obs.experts.tolist()), tuple(actions)))
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


CASES = {
    # (policy config, budget: (all_at, fraction))
    "lru_offload": (LruOffloadConfig(), ("bf16", 0.5)),
    "dynaexq": (dataclasses.replace(DynaExqConfig(), min_residency=2, max_promotions_per_step=2), ("int4", 1.6)),
    "static_frequency": (StaticFrequencyConfig(), ("bf16", 0.6)),
}


def _sim_log(monkeypatch: pytest.MonkeyPatch, policy_cfg: Any, budget: tuple[str, float], path: Path) -> tuple:
    made: list[Recording] = []

    def recording_build(cfg: Any) -> Policy:
        made.append(Recording(build_policy(cfg)))
        return made[-1]

    monkeypatch.setattr(sim_runner, "build_policy", recording_build)
    cfg = RunConfig(model=ModelConfig.from_spec(SPEC), hardware=fast_link_hw(), policy=policy_cfg,
                    workload=WorkloadConfig(kind=WorkloadKind.FILE, path=str(path)),
                    budget=BudgetConfig(*budget), seed=5, quality_table="analytic", progress=False, figure=False)
    _, summary = sim_runner.simulate(cfg)
    return made[0].log, summary


def _runtime_log(policy_cfg: Any, budget: tuple[str, float], path: Path, store: HostStore) -> tuple:
    policy = Recording(build_policy(policy_cfg))
    budget_bytes = int(budget[1] * SPEC.all_experts_bytes(budget[0]))
    view = load_view(path, 1, cache=False)
    profile = view if policy.needs_profile else None
    engine = RuntimeEngine(SPEC, policy, budget_bytes, store, seed=5, profile=profile)
    replay(engine, view)
    return policy.log, engine


@pytest.mark.parametrize("name", list(CASES))
def test_same_decisions_in_sim_and_runtime(name: str, monkeypatch: pytest.MonkeyPatch, trace_path: Path,
                                           store: HostStore) -> None:
    torch.set_num_threads(1)
    policy_cfg, budget = CASES[name]
    sim_log, summary = _sim_log(monkeypatch, policy_cfg, budget, trace_path)
    rt_log, engine = _runtime_log(policy_cfg, budget, trace_path, store)
    steps = [e for e in sim_log if e[0] == "step"]
    if name != "static_frequency":
        assert sum(len(e[-1]) for e in steps) > 0, "the case must exercise decisions"
    assert len(rt_log) == len(sim_log)
    for i, (a, b) in enumerate(zip(sim_log, rt_log, strict=True)):
        assert a == b, f"decision {i} differs: sim {a} vs runtime {b}"
    rt = engine.snapshot()
    assert rt[0] == summary["h2d_bytes"] and rt[3] == summary["promotions"] and rt[5] == summary["demotions"]
    mix = dict(zip([*engine.precisions, "host"], np.asarray(engine.rec.act).reshape(-1, len(engine.precisions) + 1)
                   .sum(0).tolist(), strict=True))
    assert mix == summary["activations"]


def test_parity_fails_when_copies_land_late(monkeypatch: pytest.MonkeyPatch, trace_path: Path,
                                            store: HostStore) -> None:
    """The comparison can fail: a runtime whose copies never turn READY at the step poll decides otherwise."""
    policy_cfg, budget = CASES["dynaexq"]
    sim_log, _ = _sim_log(monkeypatch, policy_cfg, budget, trace_path)
    from moebits.runtime import promote
    monkeypatch.setattr(promote.Promoter, "poll", lambda self: 0)
    rt_log, _ = _runtime_log(policy_cfg, budget, trace_path, store)
    assert len(rt_log) == len(sim_log) and rt_log != sim_log
