"""The runtime engine: the policy seam on real tensors (the decisions are :mod:`drive`'s).

Dimension legend: T tokens of a layer step, k experts per token, H hidden, L MoE layers,
E experts per layer.

:class:`RuntimeEngine` runs a :class:`policies.base.Policy` through the same
:class:`drive.driver.Driver` as the simulator, with the runtime's mechanism
(:class:`runtime.residency.DeviceMechanism`: the device slab pool and the copy stream):

1. set-up: :func:`drive.context.prepare_policy` (the same context as the simulator), the
   :class:`runtime.pool.DevicePool` of its slab plan, ``initial_loads()`` copied synchronously
   before serving (untimed, uncounted);
2. every layer step, once the router has run (:meth:`RuntimeEngine.layer_step`): copies whose
   events completed turn READY and finished kernels unpin their slabs; then the driver gives
   the policy a :class:`~policies.base.LayerObs` of the router's real output (or of a replayed
   trace) and hands its actions to the mechanism;
3. each needed expert is served per the miss rule (:func:`drive.missrule.choose`, the
   simulator's code); experts for the host are computed on the CPU from the host store's bf16
   copy (activations over PCIe both ways);
4. the served slabs are pinned, their ids written into the layer's expert -> group table, and
   the mixed-precision layer (:class:`runtime.moe_layer.MixedPrecisionMoE`, one grouped launch
   per precision over pools shared by all layers) computes; a fence unpins the slabs once the
   kernels have finished.

Timing is measured: stall = host time waiting for copies; each step's end is a CUDA event on
the compute stream (wall clock on CPU). With a static policy whose every expert is resident
the engine does not read the routing on the host per layer (no sync): it reads it after the
pass, for the records only. Records and summary are :mod:`drive.records`'.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from moebits.core.hardware import HardwareProfile
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.quality import SensitivityTable
from moebits.core.routing import LayerSteps
from moebits.drive.context import PolicyError, precision_order, prepare_policy
from moebits.drive.driver import Driver
from moebits.drive.missrule import Choice, Residency, choose, lowest_bits, served_row, tokens_served
from moebits.drive.quality import error_table
from moebits.drive.records import Recorder, RunResult, StepIndex, snapshot
from moebits.policies.base import LayerObs, MissRule, Policy
from moebits.runtime.host_store import HostStore
from moebits.runtime.mechanism import DeviceMechanism
from moebits.runtime.moe_layer import ExpertPool, MixedPrecisionMoE
from moebits.runtime.pool import DevicePool
from moebits.runtime.promote import Fences, Promoter
from moebits.runtime.quant import DenseStack
from moebits.runtime.route_observer import routing_of

__all__ = ["PolicyError", "RuntimeEngine", "routing_of"]


class Clock:
    """Run time: wall seconds for decisions, CUDA events for the ends of layer steps."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.ev0: torch.cuda.Event | None = None
        if self.cuda:
            self.ev0 = torch.cuda.Event(enable_timing=True)
            self.ev0.record()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def mark(self) -> Any:
        if self.ev0 is None:
            return self.now()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    @staticmethod
    def span_s(a: Any, b: Any) -> float:
        """Seconds from mark ``a`` to mark ``b`` (events: on the device's stream; ``b`` complete)."""
        return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else float(b - a)

    def resolve(self, marks: list[Any]) -> list[float]:
        if self.ev0 is None or not marks:
            return [float(m) for m in marks]
        marks[-1].synchronize()
        return [self.ev0.elapsed_time(m) / 1e3 for m in marks]


class RuntimeEngine:
    """One policy driving the real slab pool; see the module docstring."""

    def __init__(self, spec: ModelSpec, policy: Policy, budget_bytes: int, store: HostStore, *,
                 device: torch.device | str = "cpu", seed: int = 0, sensitivity: SensitivityTable | None = None,
                 profile: LayerSteps | None = None, future: LayerSteps | None = None, served: bool = False,
                 observe_lag: int = 0, hardware: HardwareProfile | None = None) -> None:
        if budget_bytes <= 0:
            raise ValueError(f'"budget_gb" must be > 0, got {budget_bytes / 1e9:g}.')
        self.spec, self.policy, self.store = spec, policy, store
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.ledger = prepare_policy(policy, spec, budget_bytes, seed, profile=profile, future=future,
                                     sensitivity=sensitivity, hardware=hardware)
        self.driver = Driver(policy, self.ledger, spec, observe_lag)
        self.name, self.counts = self.driver.name, self.driver.counts
        self.precisions = precision_order(self.ledger.precisions())
        store.require(["bf16", *self.precisions])
        self.pool = DevicePool(self.ledger, spec, self.device)
        self.promoter = Promoter(self.pool, store, self.ledger)
        self.fences = Fences(self.ledger, self.device)
        self._build_layer()
        self.errors = error_table(spec, self.precisions, sensitivity)
        self.keys = [[ExpertKey(layer, e) for e in range(spec.experts)] for layer in range(spec.layers)]
        self.mech = DeviceMechanism(self.ledger, self.promoter, self.precisions, self.keys)
        self.res = [Residency(self.mech.ready[i], self.mech.loading[i], self._ready_time(i)) for i in range(spec.layers)]
        self._low = lowest_bits(len(self.precisions))
        self.host_h2d_bytes = self.host_d2h_bytes = 0
        self._stage_p = self._staging_precision()
        self.staged_bytes = 0
        self.rec, self.index = Recorder(list(self.precisions), served=[] if served else None), StepIndex()
        self._marks: list[Any] = []
        self._deferred: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.steps, self.batch, self.pass_index = 0, 0, 0
        self.driver.attach(self.mech)
        self.defer_routing = self._can_defer()
        self.clock = Clock(self.device)

    # ---- set-up ----
    def _staging_precision(self) -> int:
        """Index of the policy's staging precision (bypassed experts stream at it), -1 if none."""
        staging = self.policy.staging()
        if staging is None or staging.count == 0:
            return -1
        if staging.precision not in self.precisions:
            raise PolicyError(f"policy {self.name}: staging precision {staging.precision} has no slab class")
        return self.precisions.index(staging.precision)

    def _ready_time(self, layer: int) -> Any:
        ready_time = self.mech.ready_time
        return lambda e, p: ready_time(layer, e, p)

    @property
    def peak_bytes(self) -> int:
        return self.mech.peak_bytes

    def _build_layer(self) -> None:
        """One mixed-precision layer over every non-empty class; per-layer expert -> group tables."""
        L, E = self.spec.layers, self.spec.experts
        pools = {r.precision: ExpertPool(*self.pool.stacks[r.precision]) for r in self.pool.regions if r.count}
        self.moe = MixedPrecisionMoE(pools, []) if pools else None
        bases = dict(zip(self.moe.layout.precisions, self.moe.layout.bases, strict=False)) if self.moe else {}
        self._group_base = {r.precision: bases.get(r.precision, 0) - r.first for r in self.pool.regions}
        self.groups_host = np.zeros((L, E), np.int32)  # what the device tables hold
        self.groups = torch.zeros((L, E), dtype=torch.int32, device=self.device)  # [L, E]
        cuda = self.device.type == "cuda"
        self._stage = torch.zeros((L, E), dtype=torch.int32, pin_memory=cuda)
        self._stage_ev: list[torch.cuda.Event | None] = [None] * L

    def _can_defer(self) -> bool:
        """A static policy with every expert READY on a GPU: routing is read after the pass."""
        if not self.driver.static or self.device.type != "cuda" or self.policy.miss_rule is MissRule.HOST:
            return False
        if not all(self._best_ready(layer, e) is not None
                   for layer in range(self.spec.layers) for e in range(self.spec.experts)):
            return False
        for layer in range(self.spec.layers):
            self._set_groups(layer, [(e, *self._best_ready(layer, e)) for e in range(self.spec.experts)])  # type: ignore[misc]
        return True

    def warmup(self, token_counts: Sequence[int]) -> None:
        """Run every precision class once per token count outside the books (compiles and
        autotunes the Triton kernels before the clock starts; touches no ledger state)."""
        if self.moe is None or self.device.type != "cuda":
            return
        spec, gen = self.spec, torch.Generator().manual_seed(0)
        for t in token_counts:
            x = torch.randn(t, spec.hidden, generator=gen).to(self.device, torch.bfloat16)
            ids = torch.rand(t, spec.experts, generator=gen).topk(spec.top_k, dim=1).indices.to(self.device)
            w = torch.full((t, spec.top_k), 1.0 / spec.top_k, device=self.device)
            for r in self.pool.regions:
                if r.count:
                    table = (self._group_base[r.precision] + r.first + torch.arange(spec.experts) % r.count)
                    self.moe(x, ids, w, group_of_expert=table.to(self.device, torch.int32))
        torch.cuda.synchronize(self.device)

    # ---- passes ----
    def start(self) -> None:
        """Start the run's clock (call after warm-up, before the first measured pass)."""
        self.clock.start()

    def begin_pass(self, batch: int, pass_index: int) -> None:
        self.batch, self.pass_index = batch, pass_index

    def end_pass(self) -> None:
        """A forward pass ended: process deferred routing, snapshot the counters."""
        if self._deferred:
            self._flush_deferred()
        self.rec.snaps.append(self.snapshot())

    def snapshot(self) -> tuple[int, ...]:
        """Counters in :data:`drive.records.COUNTERS` order."""
        w = self.promoter.loaded_bytes
        return snapshot((w + self.host_h2d_bytes + self.staged_bytes, self.host_d2h_bytes, w), self.counts,
                        (self.ledger.used_bytes, self.peak_bytes))

    def finish(self, info: dict[str, Any] | None = None) -> RunResult:
        """Wait for everything in flight, fill in the measured end times; the run's arrays."""
        self.promoter.drain()
        self.fences.drain()
        self.rec.end_s = self.clock.resolve(self._marks)
        return RunResult.from_recorder(self.rec, self.index, self.clock.now(), dict(info or {}))

    # ---- one layer step ----
    def layer_step(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   routing: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
        """Serve MoE layer ``layer`` for ``x [T, H]`` routed to ``ids``/``weights [T, k]``; ``[T, H]``.

        ``routing`` (experts, tokens, gate) replaces what would be read from ``ids`` (replay)."""
        if self.defer_routing and routing is None:
            return self._static_step(layer, x, ids, weights)
        now = self.clock.now()
        self.promoter.poll()
        self.fences.poll()
        if routing is None:
            routing = routing_of(ids, weights, self.spec.experts)
        experts, tokens, gate = routing
        ready = self.mech.ready[layer]
        needed = np.asarray(experts).tolist()
        self.rec.hits.append(sum(1 for e in needed if ready[e]))  # before the policy acts
        self.rec.requests.append(len(needed))
        if not self.driver.static:
            self.driver.observe(LayerObs(self.steps, layer, 0 if self.pass_index == 0 else 1, self.pass_index,
                                         experts, tokens, gate, now))
        ex = (np.asarray(experts).tolist(), np.asarray(tokens).tolist(), np.asarray(gate, np.float64).tolist())
        choice = self._choose(layer, ex)
        if self.rec.served is not None:
            self.rec.served.append(served_row(choice, ex[1], 0, self.precisions))
        stall = self._wait(layer, choice)
        served = [(e, p, self._slab(layer, e, p)) for e, p in choice.served or () if p >= 0]
        streamed = [e for e, _ in choice.bypass]
        y, host_s = self._compute(layer, x, ids, weights, served, [e for e, _ in choice.host], streamed)
        if streamed:
            y = y + self._stream(layer, x, ids, weights, streamed)
        self._record(x.shape[0], choice, stall, host_s)
        return y

    def _choose(self, layer: int, ex: tuple[list, list, list]) -> Choice:
        """Each needed expert's copy per the miss rule (:func:`drive.missrule.choose`)."""
        return choose(self.policy.miss_rule, self.res[layer], self._low, len(self.precisions),
                      self.errors.of[layer], self.errors.host[layer], ex, 0, len(ex[0]), track=True,
                      layer=layer, policy=self.name, stage_p=self._stage_p)

    def _wait(self, layer: int, choice: Choice) -> float:
        """Wait for the last copy the step waits for (copies land in FIFO order); seconds waited."""
        if not choice.waited:
            return 0.0
        copies = [self.promoter.in_flight(self.keys[layer][e], self.precisions[p]) for e, p in choice.waited]
        return self.promoter.wait(max((c for c in copies if c is not None), key=lambda c: c.seq))

    def _slab(self, layer: int, e: int, p: int) -> int:
        slab = self.ledger.slab_of(self.keys[layer][e], self.precisions[p])
        assert slab is not None
        return slab

    def _best_ready(self, layer: int, e: int) -> tuple[int, int] | None:
        """(precision index, slab) of the best READY copy, or None."""
        bits = self.mech.ready[layer][e]
        if not bits:
            return None
        p = self._low[bits]
        return p, self._slab(layer, e, p)

    def _set_groups(self, layer: int, served: list[tuple[int, int, int]]) -> None:
        """Point the layer's device table at the served slabs (one small copy when it changed)."""
        row = self.groups_host[layer]
        changed = False
        for e, p, slab in served:
            g = self._group_base[self.precisions[p]] + slab
            if row[e] != g:
                row[e] = g
                changed = True
        if changed:
            self._upload(layer)

    def _upload(self, layer: int) -> None:
        """Host table row -> device, through a pinned stage row that no copy still reads."""
        if self.device.type != "cuda":
            self.groups[layer].copy_(torch.from_numpy(self.groups_host[layer]))
            return
        ev = self._stage_ev[layer]
        if ev is not None:
            ev.synchronize()  # the previous upload of this row has been read
        self._stage[layer].copy_(torch.from_numpy(self.groups_host[layer]))
        self.groups[layer].copy_(self._stage[layer], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._stage_ev[layer] = ev

    def _compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 served: list[tuple[int, int, int]], host: list[int],
                 streamed: Sequence[int] = ()) -> tuple[torch.Tensor, float]:
        """Device experts ``served`` (expert, precision index, slab; pinned, fenced) plus ``host``
        experts (``streamed`` ones are left out: :meth:`_stream`); returns (y [T, H], host seconds)."""
        slabs = [s for _, _, s in served]
        w = weights
        off = [*host, *streamed]  # experts with no slab: masked out of the grouped launch
        if off and served:
            self._set_groups(layer, served + [(e, served[0][1], served[0][2]) for e in off])
            off_ids = torch.tensor(off, device=ids.device)
            w = weights.masked_fill(torch.isin(ids, off_ids), 0)
        elif served:
            self._set_groups(layer, served)
        self.fences.pin(slabs)
        if served and self.moe is not None:
            y = self.moe(x, ids, w, group_of_expert=self.groups[layer])
        else:
            y = torch.zeros_like(x)
        self.fences.close(slabs)
        host_s = 0.0
        if host:
            t0 = time.perf_counter()
            y = y + self._host(layer, x, ids, weights, host)
            host_s = time.perf_counter() - t0
        return y, host_s

    def _stream(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                experts: list[int]) -> torch.Tensor:
        """Bypassed ``experts`` of ``layer``: their host copies at the staging precision go to the
        device, are used once and dropped. A faithful equivalent of the simulator's staging slab:
        the rows are dequantized on the host and the expert FFN runs in float32 on the device
        (the copy is counted at the staging precision's bytes); y [T, H]."""
        p = self.precisions[self._stage_p]
        gu, dn = self.store.layer_stacks(p, layer)
        slots = torch.tensor(experts)
        w_gu = gu.dequantize(slots, torch.float32).to(x.device)                          # [n, 2I, H]
        w_dn = dn.dequantize(slots, torch.float32).to(x.device)                          # [n, H, I]
        inter = self.spec.expert_intermediate
        y = torch.zeros_like(x, dtype=torch.float32)                                     # [T, H]
        for i, e in enumerate(experts):
            tok, j = torch.nonzero(ids == e, as_tuple=True)
            h = x[tok].float() @ w_gu[i].T                                               # [n, 2I]
            h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            y.index_add_(0, tok, (h @ w_dn[i].T) * weights[tok, j, None].float())
        self.counts["bypasses"] += len(experts)
        self.staged_bytes += len(experts) * self.spec.expert_bytes(p)
        return y.to(x.dtype)

    def _host(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              host: list[int]) -> torch.Tensor:
        """Experts ``host`` of ``layer`` on the CPU from the bf16 host copies: rows down, compute, results up."""
        ids_c, w_c = ids.cpu(), weights.float().cpu()
        rows = torch.nonzero(torch.isin(ids_c, torch.tensor(host)).any(-1)).flatten()   # tokens needing the host
        xh = x[rows.to(x.device)].float().cpu()                                          # [R, H]
        gu, dn = self.store.layer_stacks("bf16", layer)
        assert isinstance(gu, DenseStack) and isinstance(dn, DenseStack)  # the host keeps bf16 dense
        inter = self.spec.expert_intermediate
        out = torch.zeros_like(xh)
        for e in host:
            tok, j = torch.nonzero(ids_c[rows] == e, as_tuple=True)
            h = xh[tok] @ gu.weight[e].float().T                                         # [n, 2I]
            h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            out.index_add_(0, tok, (h @ dn.weight[e].float().T) * w_c[rows][tok, j, None])
        nbytes = rows.numel() * x.shape[1] * x.element_size()
        self.host_d2h_bytes += nbytes
        self.host_h2d_bytes += nbytes
        y = torch.zeros_like(x)
        y[rows.to(x.device)] = out.to(x.device, x.dtype)
        return y

    def _record(self, n_tokens: int, choice: Choice, stall: float, host_s: float) -> None:
        rec = self.rec
        self.index.append(self.batch, self.pass_index, n_tokens)
        rec.stall_s.append(stall)
        rec.host_wait_s.append(host_s)
        rec.err.append(choice.err)
        rec.act.extend(tokens_served(choice, self._stage_p))
        rec.act.append(sum(t for _, t in choice.host))
        self._marks.append(self.clock.mark())
        self.steps += 1

    # ---- static, all resident: no host sync per layer ----
    def _static_step(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.fences.poll()
        assert self.moe is not None
        y = self.moe(x, ids, weights, group_of_expert=self.groups[layer])
        self._deferred.append((layer, ids, weights))  # read back once per pass, for the records
        self.index.append(self.batch, self.pass_index, x.shape[0])
        self.rec.stall_s.append(0.0)
        self.rec.host_wait_s.append(0.0)
        self._marks.append(self.clock.mark())
        self.steps += 1
        return y

    def _flush_deferred(self) -> None:
        """Routing metrics of the static steps of this pass: one read-back of all their routing."""
        P = len(self.precisions)
        ids_all = torch.cat([i.reshape(-1) for _, i, _ in self._deferred]).cpu()
        w_all = torch.cat([w.reshape(-1).float() for _, _, w in self._deferred]).cpu()
        start = 0
        for layer, ids, _ in self._deferred:
            n = ids.numel()
            experts, tokens, gate = routing_of(ids_all[start : start + n], w_all[start : start + n], self.spec.experts)
            start += n
            tok = [0] * (P + 1)
            err, errl = 0.0, self.errors.of[layer]
            for e, t, g in zip(experts.tolist(), tokens.tolist(), gate.tolist(), strict=True):
                p = self._best_ready(layer, e)[0]  # type: ignore[index]
                tok[p] += t
                err += g * errl[e][p]
            self.rec.err.append(err)
            self.rec.act.extend(tok)
            self.rec.hits.append(len(experts))  # static, every expert resident
            self.rec.requests.append(len(experts))
        self._deferred.clear()
