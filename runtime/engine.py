"""The runtime adapter of the policy seam: the same policies as the simulator, on real tensors.

Dimension legend: T tokens of a layer step, k experts per token, H hidden, L MoE layers,
E experts per layer.

:class:`RuntimeEngine` consults a :class:`policies.base.Policy` at the simulator's points, with
the same observations, and carries out its answers with the same rules (``sim/engine.py``):

1. set-up: ``prepare(ctx)`` (same :class:`~policies.base.PolicyContext`: spec, budget, a
   ``numpy`` Generator seeded with the run's seed, bytes per precision, profile, future,
   sensitivity), ``slab_plan()`` -> :class:`core.slabs.SlabLedger` + :class:`runtime.pool.DevicePool`,
   ``initial_loads()`` copied synchronously before serving (untimed, uncounted);
2. every layer step, once the router has run (:meth:`RuntimeEngine.layer_step`): copies whose
   events completed turn READY and finished kernels unpin their slabs; then
   ``on_layer_step(obs, ledger)`` (skipped for static policies) with a :class:`~policies.base.LayerObs`
   of the router's real output (or of a replayed trace); its actions run in order: DEMOTE
   evicts (a pinned slab drains), PROMOTE / PREFETCH reserve a slab and start the copy on
   the copy stream (:mod:`runtime.promote`); refusals go back through ``on_refused``;
3. each needed expert is served per the :class:`~policies.base.MissRule`, exactly as the
   simulator decides: SERVE_LOWER serves the best READY copy and waits for the copy in flight
   that completes first only if none is READY; STALL waits for the highest-precision copy in
   flight when it beats the best READY one; HOST computes experts without a READY copy on
   the host from the host store's bf16 copy (activations over PCIe both ways). An expert with
   no copy and nothing in flight under SERVE_LOWER or STALL is a :class:`PolicyError`;
4. the served slabs are pinned, their ids written into the layer's expert -> group table, and
   the mixed-precision layer (:class:`runtime.moe_layer.MixedPrecisionMoE`, one grouped launch
   per precision over pools shared by all layers) computes; a fence unpins the slabs once the
   kernels have finished.

Timing is measured: stall = host time waiting for copies; each step's end is a CUDA event on
the compute stream (wall clock on CPU). With a static policy whose every expert is resident
the engine does not read the routing on the host per layer (no sync): it reads it after the
pass, for the metrics only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import PRECISIONS, get_channel_mix, get_precision
from moebits.core.quality import SensitivityTable, analytic_error
from moebits.core.routing import LayerSteps
from moebits.core.slabs import PoolError, Refusal, SlabLedger
from moebits.drive.records import RuntimeRecords
from moebits.policies.base import Action, ActionKind, LayerObs, MissRule, Policy, PolicyContext
from moebits.runtime.host_store import HostStore
from moebits.runtime.moe_layer import ExpertPool, MixedPrecisionMoE
from moebits.runtime.pool import DevicePool
from moebits.runtime.promote import Copy, Fences, Promoter


class PolicyError(ValueError):
    """A policy broke the contract (e.g. left a needed expert with no copy at all)."""


def policy_name(policy: Policy) -> str:
    cfg = getattr(policy, "cfg", None)
    return getattr(cfg, "name", "") or type(policy).__name__


def precision_order(names: Sequence[str]) -> list[str]:
    """Precisions highest first (by effective bits, then name), as the simulator orders them."""
    return sorted(names, key=lambda p: (-get_precision(p).effective_bits, p))


def routing_of(ids: torch.Tensor, weights: torch.Tensor, experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct experts ascending, tokens routed to each, their summed gate weight) of ``ids [T, k]``."""
    e = ids.reshape(-1).to("cpu", torch.int64).numpy()
    w = weights.reshape(-1).to("cpu", torch.float64).numpy()
    counts = np.bincount(e, minlength=experts)
    used = np.flatnonzero(counts)
    gate = np.bincount(e, weights=w, minlength=experts)[used]
    return used.astype(np.int16), counts[used].astype(np.int32), gate.astype(np.float32)


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

    def resolve(self, marks: list[Any]) -> list[float]:
        if self.ev0 is None or not marks:
            return [float(m) for m in marks]
        marks[-1].synchronize()
        return [self.ev0.elapsed_time(m) / 1e3 for m in marks]


@dataclass
class Choice:
    """How one layer step is served: copies to wait for, (expert, precision index, slab), host experts."""

    waits: list[Copy] = field(default_factory=list)
    served: list[tuple[int, int, int]] = field(default_factory=list)
    host: list[int] = field(default_factory=list)
    err: float = 0.0


class RuntimeEngine:
    """One policy driving the real slab pool; see the module docstring."""

    def __init__(self, spec: ModelSpec, policy: Policy, budget_bytes: int, store: HostStore, *,
                 device: torch.device | str = "cpu", seed: int = 0, sensitivity: SensitivityTable | None = None,
                 profile: LayerSteps | None = None, future: LayerSteps | None = None) -> None:
        if budget_bytes <= 0:
            raise ValueError(f'"budget_gb" must be > 0, got {budget_bytes / 1e9:g}.')
        self.spec, self.policy, self.store = spec, policy, store
        self.device = torch.device(device)
        self.name = policy_name(policy)
        self.budget_bytes = budget_bytes
        self.ledger = self._prepare_policy(seed, profile, future, sensitivity)
        self.precisions = precision_order(self.ledger.precisions())
        self.pindex = {p: i for i, p in enumerate(self.precisions)}
        store.require(["bf16", *self.precisions])
        self.pool = DevicePool(self.ledger, spec, self.device)
        self.promoter = Promoter(self.pool, store, self.ledger)
        self.fences = Fences(self.ledger, self.device)
        self._build_layer()
        self._errors(sensitivity)
        self.keys = [[ExpertKey(layer, e) for e in range(spec.experts)] for layer in range(spec.layers)]
        self.counts = {"promotions": 0, "prefetches": 0, "demotions": 0, "refusals": 0}
        self.host_h2d_bytes = self.host_d2h_bytes = 0
        self.peak_bytes = 0
        self.rec = RuntimeRecords(list(self.precisions))
        self._marks: list[Any] = []
        self._deferred: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.steps, self.batch, self.pass_index = 0, 0, 0
        self._call = not policy.is_static
        self._place_initial()
        self.defer_routing = self._can_defer()
        self.clock = Clock(self.device)

    # ---- set-up ----
    def _prepare_policy(self, seed: int, profile: LayerSteps | None, future: LayerSteps | None,
                        table: SensitivityTable | None) -> SlabLedger:
        spec = self.spec
        ctx = PolicyContext(
            spec=spec, budget_bytes=self.budget_bytes, rng=np.random.default_rng(seed),
            precision_bytes={p: spec.expert_bytes(p) for p in PRECISIONS},
            profile=profile, future=future if self.policy.needs_future else None, sensitivity=table,
        )
        if self.policy.needs_future and future is None:
            raise ValueError(f"policy {self.name} needs the future routing: run it on a trace (runtime.mode=REPLAY)")
        self.policy.prepare(ctx)
        plan = self.policy.slab_plan()
        for c in plan:
            if get_channel_mix(c.precision) is not None:
                raise PoolError(f"policy {self.name} plans channel-mix slabs ({c.precision}); the runtime has no "
                                "kernel for them")
        return SlabLedger(plan, self.budget_bytes)

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

    def _errors(self, table: SensitivityTable | None) -> None:
        """Per (layer, expert): error per pool precision, and of the host's bf16 copy (as the simulator)."""
        L, E, row = self.spec.layers, self.spec.experts, self.spec.hidden
        names = sorted({*self.precisions, "bf16"})
        if table is None:
            arr = np.broadcast_to(np.array([analytic_error(p, row) for p in names]), (L, E, len(names)))
        else:
            arr = table.error_array(L, E, names, row)
        col = {n: arr[:, :, i] for i, n in enumerate(names)}
        self.err_of = np.stack([col[p] for p in self.precisions], axis=2).tolist()  # [L][E][P]
        self.host_err = np.asarray(col["bf16"]).tolist()  # [L][E]

    def _place_initial(self) -> None:
        for a in self.policy.initial_loads():
            self._check_key(a.key)
            if a.kind is ActionKind.DEMOTE:
                r: int | Refusal = self.ledger.evict(a.key, a.precision)
            else:
                r = self.ledger.begin_load(a.key, a.precision)
                if not isinstance(r, Refusal):
                    self.promoter.place(a.key, a.precision, r)
            if isinstance(r, Refusal):
                self.counts["refusals"] += 1
                self.policy.on_refused(a, r)
        self.peak_bytes = self.ledger.used_bytes

    def _can_defer(self) -> bool:
        """A static policy with every expert READY on a GPU: routing is read after the pass."""
        if self._call or self.device.type != "cuda" or self.policy.miss_rule is MissRule.HOST:
            return False
        if not all(self._best_ready(layer, e) is not None
                   for layer in range(self.spec.layers) for e in range(self.spec.experts)):
            return False
        for layer in range(self.spec.layers):
            self._set_groups(layer, [(e, *self._best_ready(layer, e)) for e in range(self.spec.experts)])  # type: ignore[misc]
        return True

    def _check_key(self, key: ExpertKey) -> None:
        if not (0 <= key.layer < self.spec.layers and 0 <= key.expert < self.spec.experts):
            raise PolicyError(f"policy {self.name} named expert {key}, outside {self.spec.name}'s "
                              f"{self.spec.layers} layers x {self.spec.experts} experts")

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
        """Counters in :data:`runtime.metrics.COUNTERS` order."""
        c, w = self.counts, self.promoter.loaded_bytes
        return (w + self.host_h2d_bytes, self.host_d2h_bytes, w, c["promotions"], c["prefetches"],
                c["demotions"], c["refusals"], self.ledger.used_bytes, self.peak_bytes)

    def finish(self) -> RuntimeRecords:
        """Wait for everything in flight and fill in the measured end times."""
        self.promoter.drain()
        self.fences.drain()
        self.rec.end_s = self.clock.resolve(self._marks)
        self.rec.wall_s = self.clock.now()
        return self.rec

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
        if self._call:
            obs = LayerObs(self.steps, layer, 0 if self.pass_index == 0 else 1, self.pass_index,
                           experts, tokens, gate, now)
            actions = self.policy.on_layer_step(obs, self.ledger)
            if actions:
                self._apply(actions)
        choice = self._choose(layer, experts.tolist(), gate.tolist())
        stall = self.promoter.wait(max(choice.waits, key=lambda c: c.seq)) if choice.waits else 0.0
        y, host_s = self._compute(layer, x, ids, weights, choice)
        self._record(layer, x.shape[0], tokens.tolist(), choice, stall, host_s)
        return y

    def _apply(self, actions: Sequence[Action]) -> None:
        """Carry out a policy's actions in order; report refusals back (as the simulator)."""
        ledger, counts = self.ledger, self.counts
        for a in actions:
            self._check_key(a.key)
            if a.kind is ActionKind.DEMOTE:
                r = ledger.evict(a.key, a.precision)
                if isinstance(r, Refusal):
                    self._refused(a, r)
                else:
                    counts["demotions"] += 1
                continue
            slab = ledger.begin_load(a.key, a.precision)
            if isinstance(slab, Refusal):
                self._refused(a, slab)
                continue
            self.promoter.submit(a.key, a.precision, slab)
            counts["prefetches" if a.kind is ActionKind.PREFETCH else "promotions"] += 1
            self.peak_bytes = max(self.peak_bytes, ledger.used_bytes)

    def _refused(self, a: Action, reason: Refusal) -> None:
        self.counts["refusals"] += 1
        self.policy.on_refused(a, reason)

    def _best_ready(self, layer: int, e: int) -> tuple[int, int] | None:
        """(precision index, slab) of the best READY copy, or None."""
        key, led = self.keys[layer][e], self.ledger
        for i, p in enumerate(self.precisions):
            if led.is_ready(key, p):
                return i, led.slab_of(key, p)  # type: ignore[return-value]
        return None

    def _choose(self, layer: int, experts: list[int], gate: list[float]) -> Choice:
        """Pick each needed expert's copy per the miss rule (see the module docstring)."""
        rule = self.policy.miss_rule
        stall, host_rule = rule is MissRule.STALL, rule is MissRule.HOST
        led, promoter, errl = self.ledger, self.promoter, self.err_of[layer]
        out = Choice()
        for e, g in zip(experts, gate, strict=True):
            key = self.keys[layer][e]
            r = next((i for i, p in enumerate(self.precisions) if led.is_ready(key, p)), None)
            loading = [i for i, p in enumerate(self.precisions) if led.is_loading(key, p)]
            if loading and ((stall and (r is None or loading[0] < r)) or (r is None and not host_rule)):
                copies = [promoter.in_flight(key, self.precisions[i]) for i in loading]
                c = copies[0] if stall else min(copies, key=lambda c: c.seq)  # type: ignore[union-attr]
                assert c is not None
                out.waits.append(c)
                p = self.pindex[c.precision]
                out.served.append((e, p, c.slab))
            elif r is not None:
                p = r
                out.served.append((e, p, led.slab_of(key, self.precisions[p])))  # type: ignore[arg-type]
            elif host_rule:
                out.host.append(e)
                out.err += g * self.host_err[layer][e]
                continue
            else:
                raise PolicyError(
                    f"policy {self.name}: expert L{layer}E{e} is needed but has no copy and none in flight "
                    f"(miss rule {rule.name}); the policy must promote it or use MissRule.HOST")
            out.err += g * errl[e][p]
        return out

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
                 choice: Choice) -> tuple[torch.Tensor, float]:
        """Device experts (pinned, fenced) plus host experts; returns (y [T, H], host seconds)."""
        served = choice.served
        slabs = [s for _, _, s in served]
        w = weights
        if choice.host and served:
            self._set_groups(layer, served + [(e, served[0][1], served[0][2]) for e in choice.host])
            host_ids = torch.tensor(choice.host, device=ids.device)
            w = weights.masked_fill(torch.isin(ids, host_ids), 0)
        elif served:
            self._set_groups(layer, served)
        self.fences.pin(slabs)
        if served and self.moe is not None:
            y = self.moe(x, ids, w, group_of_expert=self.groups[layer])
        else:
            y = torch.zeros_like(x)
        self.fences.close(slabs)
        host_s = 0.0
        if choice.host:
            t0 = time.perf_counter()
            y = y + self._host(layer, x, ids, weights, choice.host)
            host_s = time.perf_counter() - t0
        return y, host_s

    def _host(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              host: list[int]) -> torch.Tensor:
        """Experts ``host`` of ``layer`` on the CPU from the bf16 host copies: rows down, compute, results up."""
        ids_c, w_c = ids.cpu(), weights.float().cpu()
        rows = torch.nonzero(torch.isin(ids_c, torch.tensor(host)).any(-1)).flatten()   # tokens needing the host
        xh = x[rows.to(x.device)].float().cpu()                                          # [R, H]
        gu, dn = self.store.layer_stacks("bf16", layer)
        inter = self.spec.expert_intermediate
        out = torch.zeros_like(xh)
        for e in host:
            tok, j = torch.nonzero(ids_c[rows] == e, as_tuple=True)
            h = xh[tok] @ gu.weight[e].float().T                                         # [n, 2I]
            h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            out.index_add_(0, tok, (h @ dn.weight[e].float().T) * w_c[rows][tok, j, None])  # type: ignore[union-attr]
        nbytes = rows.numel() * x.shape[1] * x.element_size()
        self.host_d2h_bytes += nbytes
        self.host_h2d_bytes += nbytes
        y = torch.zeros_like(x)
        y[rows.to(x.device)] = out.to(x.device, x.dtype)
        return y

    def _record(self, layer: int, n_tokens: int, tokens: list[int], choice: Choice, stall: float,
                host_s: float) -> None:
        P = len(self.precisions)
        tok = [0] * (P + 1)
        served = {e: p for e, p, _ in choice.served}
        experts = [e for e, _, _ in choice.served] + choice.host
        for e, t in zip(sorted(experts), tokens, strict=True):
            tok[served.get(e, P)] += t
        rec = self.rec
        rec.ls_batch.append(self.batch)
        rec.ls_pass.append(self.pass_index)
        rec.ls_tokens.append(n_tokens)
        rec.stall_s.append(stall)
        rec.host_wait_s.append(host_s)
        rec.err.append(choice.err)
        rec.act.extend(tok)
        self._marks.append(self.clock.mark())
        self.steps += 1

    # ---- static, all resident: no host sync per layer ----
    def _static_step(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.fences.poll()
        assert self.moe is not None
        y = self.moe(x, ids, weights, group_of_expert=self.groups[layer])
        self._deferred.append((layer, ids, weights))  # read back once per pass, for the metrics
        self.rec.ls_batch.append(self.batch)
        self.rec.ls_pass.append(self.pass_index)
        self.rec.ls_tokens.append(x.shape[0])
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
            err, errl = 0.0, self.err_of[layer]
            for e, t, g in zip(experts.tolist(), tokens.tolist(), gate.tolist(), strict=True):
                p = self._best_ready(layer, e)[0]  # type: ignore[index]
                tok[p] += t
                err += g * errl[e][p]
            self.rec.err.append(err)
            self.rec.act.extend(tok)
        self._deferred.clear()


def assignment(experts: np.ndarray, tokens: np.ndarray, gate: np.ndarray, n_tokens: int,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """A token -> expert assignment ``(ids, weights) [T, k]`` with the given per-expert token counts.

    A replayed trace keeps, per layer step, only each expert's token count and summed gate: the
    pairs sorted by expert are dealt round-robin over the tokens (pair j to token j mod T), so
    no token gets an expert twice (each count is at most T), and each pair's weight is its
    expert's mean gate."""
    pairs = np.repeat(np.asarray(experts, np.int64), tokens)                       # [T*k]
    if pairs.size != n_tokens * k:
        raise ValueError(f"layer step routes {pairs.size} (token, expert) pairs, expected {n_tokens} x {k}")
    w = np.repeat(np.asarray(gate, np.float64) / np.maximum(tokens, 1), tokens)
    ids = pairs.reshape(k, n_tokens).T                                              # [T, k]
    return ids, w.reshape(k, n_tokens).T.astype(np.float32)


def replay(engine: RuntimeEngine, view: LayerSteps, *, seed: int = 0, dtype: torch.dtype | None = None,
           progress: bool = False) -> RuntimeRecords:
    """Trace-driven replay: every layer step of ``view`` through ``engine`` with real expert
    compute on random activations (the trace fixes routing, not hidden states)."""
    from tqdm import tqdm

    spec, dev = engine.spec, engine.device
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    t_max = int(np.max(view.ls_tokens, initial=1))
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn(t_max, spec.hidden, generator=gen).to(dev, dtype)
    S = view.layer_steps
    key = np.asarray(view.ls_batch, np.int64) * (int(np.max(view.ls_pass, initial=0)) + 1) + np.asarray(view.ls_pass)
    ends = np.r_[key[1:] != key[:-1], True] if S else np.zeros(0, bool)
    engine.start()
    for i in tqdm(range(S), desc=f"replay {engine.name}", disable=not progress, unit="step"):
        a, b = int(view.offsets[i]), int(view.offsets[i + 1])
        routing = (view.ex_expert[a:b], view.ex_tokens[a:b], view.ex_gate[a:b])
        T = int(view.ls_tokens[i])
        ids, w = assignment(*routing, T, spec.top_k)
        engine.begin_pass(int(view.ls_batch[i]), int(view.ls_pass[i]))
        engine.layer_step(int(view.ls_layer[i]), x_all[:T], torch.from_numpy(ids).to(dev),
                          torch.from_numpy(w).to(dev), routing=routing)
        if ends[i]:
            engine.end_pass()
    return engine.finish()
