"""The graph-captured runtime engine: fast-model steps with the policy run by :class:`drive.driver.Driver`.

Dimension legend: L layers, T rows of a pass, k experts per row, E experts per layer.

:class:`GraphEngine` serves passes of a :class:`runtime.fast_model.FastModel` (static buffers, a
device residency table) through a :class:`runtime.graph_serve.StepRunner`, and runs the policy
through the same :class:`~drive.driver.Driver` as the simulator and the eager runtime, with the
graph path's mechanism (:class:`runtime.mechanism.MoverMechanism`: the
:class:`~runtime.expert_mover.ExpertMover`'s copies, table writes and fences). The policy is
built, placed and consulted, its refusals counted, its misses served and the run recorded
exactly as elsewhere: records and summary are :mod:`drive.records`' (one step table).

Two ways of observing routing:

* **per layer** (``GraphMode.EAGER``, the CPU path; ``GraphMode.LAYER`` graphs; and every
  ``MissRule.STALL`` policy, whose step is split per layer whatever mode was asked): before each
  layer's experts the host reads that layer's routing (a sync on a GPU), the mover finishes
  completed copies and writes the table, the driver observes (with the seam's lag,
  :func:`drive.driver.applied_lag`: 0 under STALL), the mover issues the new copies, the miss
  rule (:func:`drive.missrule.choose`) says what the step is served from and, where it waits for
  a copy, the host drains the copy stream (stall). A copy issued at layer step i is servable
  from layer step i + 1: this is the simulator's seam, and the parity test checks it decision
  for decision (CPU).
* **per pass** (``GraphMode.WHOLE``, non-STALL policies): the pass replays untouched; its routing
  reaches the host through one asynchronous copy per pass (:class:`runtime.route_observer.
  RouteObserver`, ``route_lag`` passes later); at the boundary before a pass the driver observes
  the layer steps of every due pass in order (``observe_lag`` layer steps on top), then the
  mover waits for the copies of earlier boundaries, writes the table and issues the new copies
  (:func:`drive.driver.per_pass`: the seam the simulator replays with ``route_lag``, decision for
  decision). No host sync per layer; a policy's actions take effect at pass boundaries. What
  each layer step was served from is read from the table as the pass saw it, so the step table
  is exact. This is the fast GPU mode.

A policy's staging slab (``staging_experts`` > 0, :meth:`policies.base.Policy.staging`): spare slots of
the pool (:meth:`runtime.pool.DevicePool.staging_slot`). On the per-layer seam only (a bypassed expert is
known once its layer's routing is read): after the miss rule (and a STALL drain), each bypassed expert
``j`` (ascending id) is copied into slot ``j mod S`` once the launch that last read that slot is done (a
fence), and served by one launch of the layer's fused kernel over a code row naming only it
(:meth:`runtime.fast_model.FastModel.staged_experts`), all before the layer's graph computes its cached
experts. The simulator prices the same order on a graph profile (:mod:`sim.engine`, step 5).

Channel-mix precisions (DynaMo's, :mod:`runtime.channelmix`): one per pool, served by the fused kernels'
mix class (:data:`runtime.residency.MIX_CLASS`).

Not supported (one clear error): ``MissRule.HOST`` (the graph path computes no expert on the
host), a staging slab on the per-pass seam (``route_lag`` >= 1 with a policy that never waits: run it
with ``route_lag=0``) and two channel mixes in one pool. The eager runtime
(:class:`runtime.engine.RuntimeEngine`) serves all three.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from moebits.core.hardware import HardwareProfile
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.quality import SensitivityTable
from moebits.core.routing import LayerSteps
from moebits.drive.context import policy_name, precision_order, prepare_policy
from moebits.drive.driver import Driver, read_lag
from moebits.drive.missrule import Choice, Residency, choose, lowest_bits, no_copy, served_row, tokens_served
from moebits.drive.quality import error_table
from moebits.drive.records import Recorder, RunResult, StepIndex, snapshot
from moebits.policies.base import LayerObs, MissRule, Policy
from moebits.runtime.engine import Clock
from moebits.runtime.expert_mover import CudaStreams, ExpertMover, RowFn, SyncStreams
from moebits.runtime.fast_model import FastModel, StepBuffers
from moebits.runtime.graph_serve import GraphMode, StepRunner
from moebits.runtime.host_log import HostLog
from moebits.runtime.mechanism import MoverMechanism
from moebits.runtime.pool import DevicePool
from moebits.runtime.residency import (
    CLASS_BITS,
    KERNEL_CLASS,
    ResidencyTable,
    encode,
    kernel_class,
    write_slots,
)
from moebits.runtime.route_observer import RouteObserver, routing_of

WeightsFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> (gate_up [E, 2I, H], down [E, H, I])
ModelFn = Callable[[DevicePool, ResidencyTable], FastModel]
CLASS_MASK = (1 << CLASS_BITS) - 1  # a table code's kernel class bits
SLACK_BYTES = 64 << 20  # alignment room beyond the policy's budget (the fused kernels need 16-byte slabs)


@dataclass(frozen=True)
class PassInput:
    """One pass: ``tokens``, ``row_seq``, ``row_pos [T]`` and, when replaying, ``ids``/``weights [L, T, k]``.

    ``ends_pass``: False for every chunk of a chunked prefill but its last (one pass in the records)."""

    batch: int
    pass_index: int
    tokens: torch.Tensor
    row_seq: torch.Tensor
    row_pos: torch.Tensor
    ids: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    ends_pass: bool = True
    flat: np.ndarray | None = None   # replay: layer * E + ids, flattened (:func:`flat_routing`)


def flat_routing(ids: np.ndarray, experts: int) -> np.ndarray:
    """``layer * experts + ids`` of routing ``ids [L, T, k]``, flattened: (layer, expert) as one index."""
    L = ids.shape[0]
    return (ids.reshape(L, -1).astype(np.int64) + (np.arange(L, dtype=np.int64) * experts)[:, None]).ravel()


@dataclass
class _Pending:
    """A WHOLE-mode pass whose routing the host has not read yet, and the table it was served from."""

    batch: int
    pass_index: int
    codes: np.ndarray  # [L, E] table codes during the pass


@dataclass
class _Served:
    """A WHOLE-mode pass read back: its routing ``ids``/``weights [L, T, k]`` and the table codes it was
    served from; its step records are built at the end of the run (off the host loop)."""

    pend: _Pending
    ids: np.ndarray
    weights: np.ndarray
    rows: int


@dataclass
class _PassRouting:
    """One pass's routing by layer step: (layer, expert) entries in layer then expert order, the tokens and
    summed gate of each, and where each layer's entries start (``bounds [L + 1]``)."""

    layer: np.ndarray    # [n] int64
    expert: np.ndarray   # [n] int64
    tokens: np.ndarray   # [n] int32
    gate: np.ndarray     # [n] float32
    bounds: list[int]

    @classmethod
    def of(cls, ids: np.ndarray, weights: np.ndarray, layers: int, experts: int) -> _PassRouting:
        L, E = layers, experts
        flat = flat_routing(ids, E)
        counts = np.bincount(flat, minlength=L * E)
        used = np.flatnonzero(counts)                     # layer-major, experts ascending
        gates = np.bincount(flat, weights=weights.reshape(-1).astype(np.float64), minlength=L * E)[used]
        layer = used // E
        return cls(layer, used % E, counts[used].astype(np.int32), gates.astype(np.float32),
                   np.searchsorted(layer, np.arange(L + 1)).tolist())


class GraphEngine:
    """One policy over the graph path; see the module docstring."""

    def __init__(self, spec: ModelSpec, policy: Policy, budget_bytes: int, make_model: ModelFn, weights: WeightsFn,
                 rows: RowFn, *, device: torch.device | str = "cpu", mode: GraphMode = GraphMode.EAGER,
                 seed: int = 0, sensitivity: SensitivityTable | None = None, profile: LayerSteps | None = None,
                 future: LayerSteps | None = None, observe_lag: int = 0, route_lag: int = 1, replay: bool = False,
                 served: bool = False, max_rows: int = 1, per_pass: bool | None = None,
                 hardware: HardwareProfile | None = None) -> None:
        if policy.miss_rule is MissRule.HOST:
            raise ValueError("the graph path computes no expert on the host: MissRule.HOST runs in the eager runtime")
        self.spec, self.policy, self.device = spec, policy, torch.device(device)
        self.ledger = prepare_policy(policy, spec, budget_bytes, seed, profile=profile, future=future,
                                     sensitivity=sensitivity, slack_bytes=SLACK_BYTES, hardware=hardware)
        self.precisions = precision_order(self.ledger.precisions())
        staging = policy.staging()
        self.staging = (staging.precision, staging.count) if staging is not None and staging.count else None
        if self.staging and self.staging[0] not in self.precisions:
            raise ValueError(f"policy {policy_name(policy)}: staging precision {self.staging[0]} has no slab class")
        mixes = [p for p in self.precisions if p not in KERNEL_CLASS]
        if len(mixes) > 1:
            raise ValueError(f"the graph path's kernels serve one channel mix per pool, not {mixes}; "
                             "run this policy in the eager runtime")
        self.driver = Driver(policy, self.ledger, spec, observe_lag)
        self.name, self.counts = self.driver.name, self.driver.counts
        self.pool = DevicePool(self.ledger, spec, self.device, staging=self.staging)
        self.table = ResidencyTable(spec.layers, spec.experts, self.device, mix=mixes[0] if mixes else None)
        self.model = make_model(self.pool, self.table)
        self.model.forced = replay
        cuda = self.device.type == "cuda"
        self.mover = ExpertMover(self.pool, self.table, rows, CudaStreams(self.device) if cuda else SyncStreams())
        keys = [[ExpertKey(layer, e) for e in range(spec.experts)] for layer in range(spec.layers)]
        self.mech = MoverMechanism(self.mover, self.precisions, keys)
        self.driver.attach(self.mech)
        self.mech.write_placed(self._writer(weights))
        per_pass = mode is GraphMode.WHOLE if per_pass is None else per_pass  # the CPU tests the per-pass seam eagerly
        self.per_layer = not per_pass or policy.miss_rule is MissRule.STALL
        if self.staging and not self.per_layer:
            raise ValueError(f"policy {policy_name(policy)}: a staging slab streams bypassed experts on the per-layer "
                             "seam only; run it with route_lag=0 (or staging_experts=0)")
        self._stage_p = self.precisions.index(self.staging[0]) if self.staging else -1
        self._stage_codes = self._staging_codes()      # [S, E, E]: row (s, e) names expert e in slot s only
        self._stage_fence: list[Any] = [None] * (self.staging[1] if self.staging else 0)
        self.staged_bytes = 0
        self.mode = GraphMode.LAYER if mode is GraphMode.WHOLE and self.per_layer else mode
        self.observer = None if self.per_layer else RouteObserver(
            spec.layers, max_rows, spec.top_k, read_lag(self.driver.static, route_lag), self.device)
        self.errors = error_table(spec, self.precisions, sensitivity)
        self._class_to_p = np.full(1 << CLASS_BITS, -1, np.int64)   # kernel class -> pool precision index
        for i, name in enumerate(self.precisions):
            self._class_to_p[kernel_class(name)] = i
        self.res = [Residency(self.mech.ready[i], self.mech.loading[i], self._ready_time(i)) for i in range(spec.layers)]
        self._low = lowest_bits(len(self.precisions))
        self.rec, self.index = Recorder(list(self.precisions), served=[] if served else None), StepIndex()
        self.runners: dict[int, StepRunner] = {}
        self._pending: dict[int, _Pending] = {}
        self._served: list[_Served] = []   # WHOLE mode: passes read back, recorded in finish (off the host loop)
        self._codes, self._codes_version = self.table.host.copy(), self.table.version
        self._observed = 0                 # layer steps observed on the per-pass seam (LayerObs.step)
        self.host_log = HostLog()
        self._marks: list[Any] = []
        self._busy: list[tuple[int, Any, Any]] = []   # WHOLE mode: (pass, start mark, end mark) of every graph launch
        self.steps = self.passes = 0
        self.route_read_s = 0.0   # per-layer seam: seconds reading a layer's routing (a sync: the device's time)
        self.stall_wait_s = 0.0   # per-layer seam: seconds draining copies for a waiting step
        self.clock = Clock(self.device)

    # ---- set-up ----
    def _writer(self, weights: WeightsFn) -> Callable[[int, str, list[int], list[int]], None]:
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def write(layer: int, precision: str, experts: list[int], slabs: list[int]) -> None:
            if layer not in cache:
                cache.clear()
                cache[layer] = weights(layer)
            write_slots(self.pool, precision, [self.pool.slot(s)[1] for s in slabs], *cache[layer], experts)
        return write

    def _staging_codes(self) -> torch.Tensor | None:
        """Per staging slot ``s`` and expert ``e``, the code row of a launch serving only ``e`` from slot ``s``."""
        if not self.staging:
            return None
        S, E = self.staging[1], self.spec.experts
        codes = torch.full((S, E, E), -1, dtype=torch.int32)
        for s in range(S):
            codes[s, torch.arange(E), torch.arange(E)] = encode(self.staging[0], self.pool.staging_slot(s))
        return codes.to(self.device)

    def _ready_time(self, layer: int) -> Callable[[int, int], float]:
        ready_time = self.mech.ready_time
        return lambda e, p: ready_time(layer, e, p)

    def runner(self, rows: int) -> StepRunner:
        """The step runner of ``rows``-row passes (buffers, graphs captured on first use)."""
        if rows not in self.runners:
            r = StepRunner(self.model, self.model.buffers(rows), self.mode)
            r.capture()
            self.runners[rows] = r
        return self.runners[rows]

    def start(self) -> None:
        """Start the run's clock (after capture and warm-up)."""
        self.clock.start()

    # ---- passes ----
    def run_pass(self, p: PassInput) -> torch.Tensor:
        """Serve one pass; its logits buffer ``[T, N]`` (valid until the next pass of that size)."""
        log = self.host_log
        log.begin(self._waited_s(), self._copies())
        T = int(p.tokens.shape[0])
        runner = self.runner(T)
        buf = runner.buf
        if not self.per_layer:
            self._deliver(self.passes)
            if self.table.version != self._codes_version:   # the table as this pass reads it (records)
                self._codes, self._codes_version = self.table.host.copy(), self.table.version
            if p.ids is not None:
                self._check_resident(self._codes, p)
            self._pending[self.passes] = _Pending(p.batch, p.pass_index, self._codes)
            log.tick("table")
        buf.set_rows(p.tokens, p.row_seq, p.row_pos)
        if p.ids is not None and p.weights is not None:
            buf.set_routing(p.ids, p.weights)
        log.tick("inputs")
        if self.per_layer:
            runner.run(lambda layer: self._layer_step(p, buf, T, layer))
        else:
            start = self.clock.mark()
            runner.run()
            self._busy.append((len(self.rec.snaps), start, self.clock.mark()))
            log.tick("launch")
            assert self.observer is not None
            self.observer.record(self.passes, buf.ids, buf.weights, T)
            log.tick("record")
        self._marks.append(self.clock.mark())
        if p.ends_pass:
            self.rec.snaps.append(self.snapshot())
        log.tick("mark")
        log.end(self._waited_s(), self._copies())
        self.passes += 1
        return buf.logits

    def _layer_step(self, p: PassInput, buf: StepBuffers, T: int, layer: int) -> None:
        """Per-layer seam: observe, act, serve per the miss rule (see the module docstring)."""
        ids, weights = buf.ids[layer, :T], buf.weights[layer, :T]
        log = self.host_log
        log.tick("launch")                                     # the previous piece's graph
        before = self._copies()
        now = self.clock.now()
        self.mover.boundary()                                  # copies done -> READY, table written
        t0 = time.perf_counter()
        log.tick("boundary")
        routing = routing_of(ids, weights, self.spec.experts)  # host sync on a GPU
        self.route_read_s += time.perf_counter() - t0
        log.tick("route")
        ready = self.mech.ready[layer]
        hits = sum(1 for e in routing[0].tolist() if ready[e])  # before the policy acts
        if not self.driver.static:
            self.host_log.observe(self.driver.observe, LayerObs(self.steps, layer, 0 if p.pass_index == 0 else 1,
                                                                p.pass_index, *routing, now), len(routing[0]))
        log.tick("observe")
        self.mover.boundary()                                  # demotions written, new copies issued
        log.issued(self._copies() - before)
        log.tick("issue")
        ex = (routing[0].tolist(), routing[1].tolist(), np.asarray(routing[2], np.float64).tolist())
        choice = choose(self.policy.miss_rule, self.res[layer], self._low, len(self.precisions),
                        self.errors.of[layer], self.errors.host[layer], ex, 0, len(ex[0]), track=True,
                        layer=layer, policy=self.name, stage_p=self._stage_p)
        stall = 0.0
        log.tick("choose")
        if choice.waited:
            t0 = time.perf_counter()
            self.mover.drain()                                 # STALL: the copies land, the table points at them
            stall = time.perf_counter() - t0
            self.stall_wait_s += stall
            log.tick("drain")
        if choice.bypass:
            self._stream(layer, buf, choice.bypass)
            log.tick("stage")
        self._record(p, T=T, choice=choice, ex=ex, stall=stall, hits=hits)
        log.tick("records")

    def _stream(self, layer: int, buf: StepBuffers, bypass: list[tuple[int, int]]) -> None:
        """Bypassed experts of ``layer`` through the staging slots (see the module docstring): copy, wait, one launch."""
        assert self.staging is not None and self._stage_codes is not None
        precision, S = self.staging
        streams = self.mover.streams
        for j, (e, _) in enumerate(bypass):
            s = j % S
            row = self.mover.rows(ExpertKey(layer, e), precision)
            ev = streams.copy(self.pool.staging_bytes(s), row, self._stage_fence[s])
            streams.wait(ev)
            self.model.staged_experts(layer, buf, self._stage_codes[s, e])
            self._stage_fence[s] = streams.fence()
            self.staged_bytes += row.numel()
        self.counts["bypasses"] += len(bypass)

    def _deliver(self, serving: int, observe: bool = True) -> None:
        """Per-pass seam: observe every due pass's layer steps in order, then the boundary
        (``observe=False`` at the end of a run: records only, like the routing a lag never delivers)."""
        assert self.observer is not None
        now = self.clock.now()
        log = self.host_log
        due = self.observer.due(serving)
        log.tick("route")
        for r in due:
            self._deliver_pass(self._pending.pop(r.step), r.ids, r.weights, r.rows, now, observe)
        log.tick("observe")
        if observe:
            self.mover.boundary(wait=True)   # the per-pass seam: copies of earlier boundaries are servable now
            log.tick("boundary")

    def _deliver_pass(self, pend: _Pending, ids: np.ndarray, weights: np.ndarray, rows: int, now: float,
                      observe: bool) -> None:
        """One pass's routing ``[L, T, k]``: every layer's observation, in order (a static policy
        observes nothing); its records are built in :meth:`finish` (off the host loop)."""
        self._served.append(_Served(pend, ids, weights, rows))
        step0 = self._observed
        self._observed += self.spec.layers
        if not observe or self.driver.static:
            return
        r = _PassRouting.of(ids, weights, self.spec.layers, self.spec.experts)
        e16, b = r.expert.astype(np.int16), r.bounds
        phase = 0 if pend.pass_index == 0 else 1
        for li in range(self.spec.layers):
            self.host_log.observe(self.driver.observe, LayerObs(step0 + li, li, phase, pend.pass_index,
                                                                e16[b[li] : b[li + 1]], r.tokens[b[li] : b[li + 1]],
                                                                r.gate[b[li] : b[li + 1]], now), b[li + 1] - b[li])

    def _record_served(self) -> None:
        """The step records of every pass read back on the per-pass seam, in pass order (vectorized per
        pass; the gate-weighted error summed in expert order, as the miss rule sums it)."""
        L, E, P = self.spec.layers, self.spec.experts, len(self.precisions)
        table, rec = self.errors.table, self.rec
        zeros = [0.0] * L
        for d in self._served:
            r = _PassRouting.of(d.ids, d.weights, L, E)
            codes = d.pend.codes[r.layer, r.expert]
            if (codes < 0).any():
                j = int(np.argmax(codes < 0))
                raise no_copy(self.name, self.policy.miss_rule, int(r.layer[j]), int(r.expert[j]))
            served = self._class_to_p[codes & CLASS_MASK]
            err = np.bincount(r.layer, weights=r.gate.astype(np.float64) * table[r.layer, r.expert, served],
                              minlength=L)
            tok = np.zeros((L, P + 1), np.int64)
            tok[:, :P] = np.bincount(r.layer * P + served, weights=r.tokens, minlength=L * P).reshape(L, P)
            n = np.diff(r.bounds).tolist()
            rec.err.extend(err.tolist())
            rec.act.extend(tok.ravel().tolist())
            rec.hits.extend(n)
            rec.requests.extend(n)
            rec.stall_s.extend(zeros)
            rec.host_wait_s.extend(zeros)
            for _ in range(L):
                self.index.append(d.pend.batch, d.pend.pass_index, d.rows)
            if rec.served is not None:
                names = [self.precisions[int(x)] for x in served]
                ex, tk = r.expert.tolist(), r.tokens.tolist()
                for li in range(L):
                    rec.served.append(tuple((ex[j], tk[j], names[j]) for j in range(r.bounds[li], r.bounds[li + 1])))
        self.steps += L * len(self._served)
        self._served.clear()

    def _check_resident(self, codes: np.ndarray, p: PassInput) -> None:
        """A replayed pass (routing known before it runs) must find a copy of every expert it routes to."""
        assert p.ids is not None
        flat = p.flat if p.flat is not None else flat_routing(p.ids.numpy(), self.spec.experts)
        bad = codes.reshape(-1)[flat] < 0
        if bad.any():
            j = int(flat[int(np.argmax(bad))])
            raise no_copy(self.name, self.policy.miss_rule, j // self.spec.experts, j % self.spec.experts)

    def _record(self, p: PassInput, *, T: int, choice: Choice, ex: tuple[list, list, list], stall: float,
                hits: int) -> None:
        rec = self.rec
        self.index.append(p.batch, p.pass_index, T)
        rec.hits.append(hits)
        rec.requests.append(len(ex[0]))
        rec.stall_s.append(stall)
        rec.host_wait_s.append(0.0)
        rec.err.append(choice.err)
        rec.act.extend(tokens_served(choice, self._stage_p))
        rec.act.append(0)
        if rec.served is not None:
            rec.served.append(served_row(choice, ex[1], 0, self.precisions))
        self.steps += 1

    # ---- end ----
    def snapshot(self) -> tuple[int, ...]:
        """Counters in :data:`drive.records.COUNTERS` order."""
        w = self.mover.stats.h2d_bytes   # weight copies; staged experts move over the link too
        return snapshot((w + self.staged_bytes, 0, w), self.counts, (self.ledger.used_bytes, self.mech.peak_bytes))

    def finish(self, info: dict[str, Any] | None = None) -> RunResult:
        """Read the routing still in flight, complete every copy; the run's arrays."""
        if self.observer is not None:
            self._deliver(1 << 62, observe=False)
            self._record_served()
        self.mover.drain()
        ends = self.clock.resolve(self._marks)
        self.rec.end_s = np.repeat(np.asarray(ends, np.float64), self.spec.layers)
        self.rec.busy_s = self._busy_per_pass()
        extra = {"graph": self.mode.value, "observe": "per-layer" if self.per_layer else "per-pass",
                 "route_wait_s": self.observer.wait_s if self.observer is not None else 0.0,
                 "copy_wait_s": self.mover.stats.wait_s,
                 "host_ms_per_pass": 1e3 * sum(self.host_log.pass_s) / max(self.passes, 1)}
        out = RunResult.from_recorder(self.rec, self.index, self.clock.now(), {**extra, **(info or {})})
        out.host = self.host_log.arrays()
        return out

    def _busy_per_pass(self) -> list[float]:
        """Device seconds of every pass's graphs (WHOLE mode; after :meth:`Clock.resolve`); [] per-layer."""
        if not self._busy:
            return []
        out = np.zeros(len(self.rec.snaps))
        for n, a, b in self._busy:
            if n < out.size:   # a pass still open at the end has no row
                out[n] += self.clock.span_s(a, b)
        return out.tolist()

    def _waited_s(self) -> float:
        """Host seconds spent waiting for the device so far (routing read-back, copies)."""
        route = self.observer.wait_s if self.observer is not None else self.route_read_s
        return route + self.mover.stats.wait_s + self.stall_wait_s

    def _copies(self) -> int:
        return self.counts["promotions"] + self.counts["prefetches"]
