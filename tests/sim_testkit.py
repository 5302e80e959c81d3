"""Test helpers for the simulator: a tiny model, a round-number machine, hand-made traces, and
minimal test-only policies (so sim tests do not depend on the real policies)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from moebits.core.hardware import HardwareProfile, KernelTable, LinkCurve
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.routing import LayerSteps
from moebits.core.slabs import Refusal, SlabClass, SlabLedger, SlabState
from moebits.policies.base import Action, ActionKind, LayerObs, MissRule, Policy, demote, prefetch, promote
from moebits.traces.format import Phase, Trace, TraceMeta

# 2 layers x 4 experts, top-1; bf16 expert = 3 * 64 * 128 * 2 = 49152 B, int4 = 13568 B
TINY = ModelSpec("tiny", layers=2, experts=4, top_k=1, hidden=64, expert_intermediate=128, vocab_size=16)
BF16_BYTES, INT4_BYTES = 49152, 13568
LINK_GBPS = BF16_BYTES / 1e-3 / 1e9  # a bf16 expert crosses PCIe in exactly 1 ms


def round_hw(**kw: object) -> HardwareProfile:
    """Round numbers: non-MoE 500 us per layer, a grouped launch 100 us, +200 us per bf16
    expert-token and +100 us per int4 expert-token, 1 ms per bf16 copy, no latency."""
    link = LinkCurve(latency_s=0.0, sizes_bytes=[1.0], gbps=[LINK_GBPS])
    tables = [
        KernelTable("bf16", 64, 128, tokens=[1.0], seconds=[200e-6]),
        KernelTable("int4", 64, 128, tokens=[1.0], seconds=[100e-6]),
    ]
    base: dict[str, object] = dict(
        name="round", hbm_capacity_gb=1.0, hbm_gbps=1e12, h2d=link, d2h=link, peak_tflops={"bf16": 1e6},
        launch_s=100e-6, expert_launch_ops=1, non_moe_launches=5, kernel_tables=tables,
        host_gflops=1e3, host_gbps=BF16_BYTES / 1e-3 / 1e9, host_overhead_s=50e-6,
    )
    base.update(kw)
    return HardwareProfile(**base)  # type: ignore[arg-type]


def make_trace(spec: ModelSpec, seqs: Sequence[Sequence[Sequence[Sequence[int]]]], prompt: int = 1) -> Trace:
    """``seqs[s][token][layer]`` = the k experts of that token at that layer; the first
    ``prompt`` tokens of each sequence are prefill. Gates are 1/k."""
    rows = [(s, t, layer, ex) for s, toks in enumerate(seqs) for t, layers in enumerate(toks)
            for layer, ex in enumerate(layers)]
    k = spec.top_k
    return Trace(
        meta=TraceMeta(spec, {"source": "test"}),
        seq=np.array([r[0] for r in rows], np.int32),
        step=np.array([r[1] for r in rows], np.int32),
        phase=np.array([Phase.PREFILL if r[1] < prompt else Phase.DECODE for r in rows], np.uint8),
        layer=np.array([r[2] for r in rows], np.uint16),
        expert=np.array([r[3] for r in rows], np.int16).reshape(-1, k),
        gate=np.full((len(rows), k), 1.0 / k, np.float16),
    )


@dataclass
class TestCfg:
    name: ClassVar[str] = "test"


class Scripted(Policy):
    """Plays a fixed list of actions per layer step; records refusals."""

    def __init__(self, plan: list[SlabClass], initial: list[Action], script: dict[int, list[Action]],
                 rule: MissRule = MissRule.STALL) -> None:
        self.plan, self.initial, self.script, self.miss_rule = plan, initial, script, rule
        self.refused: list[tuple[Action, Refusal]] = []
        self.cfg = TestCfg()

    def slab_plan(self) -> list[SlabClass]:
        return self.plan

    def initial_loads(self) -> list[Action]:
        return self.initial

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        return self.script.get(obs.index, [])

    def on_refused(self, action: Action, reason: Refusal) -> None:
        self.refused.append((action, reason))


class TinyStatic(Policy):
    """Every expert resident; ``precision_of(layer, expert)`` says at which precision."""

    def __init__(self, precisions: Sequence[str], rule: MissRule = MissRule.SERVE_LOWER, seed: int = 0) -> None:
        self.precs, self.miss_rule, self.seed = list(precisions), rule, seed
        self.cfg = TestCfg()

    @property
    def is_static(self) -> bool:
        return True

    def _choice(self) -> list[tuple[int, int, str]]:
        spec, rng = self.ctx.spec, np.random.default_rng(self.seed)
        return [(l, e, self.precs[int(rng.integers(len(self.precs)))])
                for l in range(spec.layers) for e in range(spec.experts)]

    def slab_plan(self) -> list[SlabClass]:
        counts: dict[str, int] = {}
        for _, _, p in self._choice():
            counts[p] = counts.get(p, 0) + 1
        return [SlabClass(p, self.ctx.precision_bytes[p], n) for p, n in counts.items()]

    def initial_loads(self) -> list[Action]:
        return [promote(l, e, p) for l, e, p in self._choice()]


class TinyLru(Policy):
    """One precision, demand fetch, evict the least recently used READY expert not needed now."""

    def __init__(self, precision: str = "bf16", slabs: int = 4, rule: MissRule = MissRule.STALL) -> None:
        self.p, self.slabs, self.miss_rule = precision, slabs, rule
        self.lru: OrderedDict[ExpertKey, None] = OrderedDict()
        self.cfg = TestCfg()

    def slab_plan(self) -> list[SlabClass]:
        return [SlabClass(self.p, self.ctx.precision_bytes[self.p], self.slabs)]

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        needed = [ExpertKey(obs.layer, int(e)) for e in obs.experts]
        acts, free = [], res.free_slabs(self.p)
        for k in needed:
            if k in self.lru:
                self.lru.move_to_end(k)
                continue
            if free:
                free -= 1
            else:
                victim = next(v for v in self.lru if v not in needed and res.is_ready(v, self.p))
                del self.lru[victim]
                acts.append(demote(victim.layer, victim.expert, self.p))
            self.lru[k] = None
            acts.append(promote(k.layer, k.expert, self.p))
        return acts


@dataclass
class Chaos(Policy):
    """Random but contract-abiding: every needed expert gets a copy (unless the rule is HOST),
    plus random demotes, upgrades and prefetches, some of which the pool refuses. It keeps the
    bytes of every load it issued, and forgets the refused ones, for the invariant tests."""

    plan: list[SlabClass]
    rule: MissRule
    extra: float = 0.3
    issued_bytes: int = 0
    refused: list[tuple[Action, Refusal]] = field(default_factory=list)
    cfg: TestCfg = field(default_factory=TestCfg)

    def __post_init__(self) -> None:
        self.miss_rule = self.rule
        self.bytes_of = {c.precision: c.slab_bytes for c in self.plan}

    def slab_plan(self) -> list[SlabClass]:
        return self.plan

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        rng, layer = self.ctx.rng, obs.layer
        needed = {ExpertKey(layer, int(e)) for e in obs.experts}
        copies = res.copies()
        free = {p: res.free_slabs(p) for p in self.bytes_of}
        evictable = [(k, p) for k, p, s in copies if s == SlabState.READY and k not in needed]
        rng.shuffle(evictable)
        acts: list[Action] = []
        for k, p in list(evictable):
            if rng.random() < self.extra:
                acts.append(demote(k.layer, k.expert, p))
                free[p] += 1
                evictable.remove((k, p))
        have = {k for k, _, s in copies if s in (SlabState.READY, SlabState.LOADING)}
        for k in sorted(needed - have):
            if self.rule is MissRule.HOST and rng.random() < 0.5:
                continue
            p = self._slab_for(free, evictable, acts)
            if p is not None:
                acts.append(promote(k.layer, k.expert, p))
        self._extras(needed, res, acts)
        return self._count(acts)

    def _slab_for(self, free: dict[str, int], evictable: list, acts: list[Action]) -> str | None:
        for p in sorted(free):
            if free[p] > 0:
                free[p] -= 1
                return p
        if evictable:
            k, p = evictable.pop()
            acts.append(demote(k.layer, k.expert, p))
            return p
        return None

    def _extras(self, needed: set[ExpertKey], res: SlabLedger, acts: list[Action]) -> None:
        rng, spec = self.ctx.rng, self.ctx.spec
        loading = sum(1 for _, _, s in res.copies() if s == SlabState.LOADING)
        if loading or rng.random() > self.extra:
            return
        p = sorted(self.bytes_of)[int(rng.integers(len(self.bytes_of)))]
        layer, expert = int(rng.integers(spec.layers)), int(rng.integers(spec.experts))
        make = prefetch if rng.random() < 0.5 else promote
        acts.append(make(layer, expert, p))  # may be refused: no slab, present or in flight
        if rng.random() < 0.2 and ExpertKey(layer, expert) not in needed:
            acts.append(demote(layer, expert, "bf16"))  # often NOT_PRESENT or IN_FLIGHT

    def _count(self, acts: list[Action]) -> list[Action]:
        for a in acts:
            if a.kind is not ActionKind.DEMOTE:
                self.issued_bytes += self.bytes_of.get(a.precision, 0)
        return acts

    def on_refused(self, action: Action, reason: Refusal) -> None:
        self.refused.append((action, reason))
        if action.kind is not ActionKind.DEMOTE:
            self.issued_bytes -= self.bytes_of.get(action.precision, 0)


def layer_steps(steps: list[tuple[int, list[int]]]) -> LayerSteps:
    """LayerSteps from ``[(layer, [experts]), ...]``, one token per routed expert."""
    experts = [sorted(set(es)) for _, es in steps]
    sizes = [len(es) for es in experts]
    n = sum(sizes)
    return LayerSteps(
        ls_layer=np.array([layer for layer, _ in steps], dtype=np.uint16),
        ls_batch=np.zeros(len(steps), dtype=np.int32),
        ls_pass=np.arange(len(steps), dtype=np.int32),
        ls_tokens=np.array(sizes, dtype=np.int32),
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        ex_expert=np.array([e for es in experts for e in es], dtype=np.int16),
        ex_tokens=np.ones(n, dtype=np.int32),
        ex_gate=np.ones(n, dtype=np.float32),
    )
