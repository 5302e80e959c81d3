"""The replay engine: layer steps through a SimPy model of PCIe, the slab pool and compute.

Batches run one after another; within a batch, the prefill pass (all prompt tokens of the
batch) and then each decode pass, and within a pass every MoE layer in order: one layer step
each (see :mod:`core.routing`). The compute stream is the engine's SimPy process; the copy
streams are the two PCIe directions (:mod:`sim.link`); the slab pool is :mod:`sim.pool`.

Timing of one layer step, starting at ``t0`` (the end of the previous one):

1. non-MoE part of the layer (attention, norms, router, shared experts): ``t1 = t0 + non_moe``;
   the router's output is known at ``t1``; copies complete by ``t1`` turn READY.
2. ``policy.on_layer_step(obs, ledger)`` with ``obs.now_s = t1`` (skipped for static
   policies); its actions run in order at ``t1``: DEMOTE evicts at once (a pinned slab drains),
   PROMOTE / PREFETCH reserve a slab and queue the copy on the host-to-device FIFO; each
   refusal is reported back through ``policy.on_refused``.
3. every needed expert is served per the policy's :class:`~policies.base.MissRule`:
   SERVE_LOWER serves its best READY copy now, and waits for the first copy in flight only if
   none is READY; STALL waits for the highest-precision copy in flight when it beats the best
   READY one, else serves the best READY one; HOST serves the best READY copy, and computes
   experts without one on the host (bf16, activations over PCIe both ways), in parallel with
   the device. An expert with no copy and nothing in flight under SERVE_LOWER or STALL is a
   policy bug: :class:`PolicyError`.
4. device compute starts at ``start = max(t1, last awaited copy)`` (``stall = start - t1``):
   one grouped launch per precision class (:mod:`sim.kernels`), summed; the step ends at
   ``max(start + compute, host results back)``. Served slabs are pinned for the compute and
   unpinned after (carried out in ``check`` mode; in this model the next policy call always
   comes after the unpin, so pins never change a decision).

Initial loads (``policy.initial_loads()``) are placed before t = 0, untimed and uncounted.
Copy completions are closed-form times, and copies turn READY lazily: when a step starts or
waits past the earliest pending completion (no event per copy); the engine yields one SimPy
timeout per layer step. The policy's actions of a step go to the pool in one call
(:meth:`sim.pool.SimPool.apply`). Routing is turned into Python lists a chunk of layer steps
at a time. Two shortcuts give the same numbers bit for bit (tests check it): static policies
whose experts are all resident take a vectorized path, and one-class pools (one precision,
e.g. the offload caches) take each step's tokens, kernel time and error from numpy per chunk
(both in :mod:`sim.fastpath`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import simpy
from moebits.core.hardware import HardwareProfile
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import PRECISIONS, get_channel_mix
from moebits.core.quality import SensitivityTable, analytic_error
from moebits.core.routing import LayerSteps
from moebits.core.slabs import Refusal, SlabLedger
from moebits.policies.base import Action, ActionKind, LayerObs, MissRule, Policy, PolicyContext
from moebits.sim.fastpath import single_class_server, static_plan
from moebits.sim.kernels import KernelModel
from moebits.sim.link import Link
from moebits.sim.metrics import Recorder, RunResult
from moebits.sim.pool import SimPool
from tqdm import tqdm

CHUNK = 4096  # layer steps converted to Python lists at a time
_STALL, _HOST = MissRule.STALL, MissRule.HOST


class _Chunk(NamedTuple):
    """Layer steps of one chunk as Python lists (entry offsets relative to ``lo``)."""

    lo: int
    off: list[int]
    ex: tuple[list[int], list[int], list[float]]  # expert, tokens, gate per entry
    layers: list[int]
    passes: list[int]
    non_moe_s: list[float]
    pass_end: list[bool]


class PolicyError(ValueError):
    """A policy broke the contract (e.g. left a needed expert with no copy at all)."""


class InfeasibleError(ValueError):
    """The run cannot be simulated as configured (e.g. the budget is too small)."""


@dataclass
class EngineOptions:
    """``check``: pin served slabs and assert the invariants at every step (slower).
    ``log``: keep an event log (times in µs) for tests. ``fast_static``: allow the vectorized
    path for static policies. ``progress``: a tqdm bar."""

    check: bool = False
    log: bool = False
    fast_static: bool = True
    progress: bool = False


def policy_name(policy: Policy) -> str:
    cfg = getattr(policy, "cfg", None)
    return getattr(cfg, "name", "") or type(policy).__name__


def _us(t: float) -> float:
    return round(t * 1e6, 6)


class Engine:
    """One replay of ``view`` under ``policy``; :meth:`run` returns a :class:`RunResult`."""

    def __init__(self, view: LayerSteps, spec: ModelSpec, hw: HardwareProfile, policy: Policy,
                 budget_bytes: int, *, seed: int = 0, sensitivity: SensitivityTable | None = None,
                 profile: LayerSteps | None = None, options: EngineOptions | None = None) -> None:
        if budget_bytes <= 0:
            raise InfeasibleError(f'"budget_gb" must be > 0, got {budget_bytes / 1e9:g}.')
        self.view, self.spec, self.hw, self.policy = view, spec, hw, policy
        self.name = policy_name(policy)
        self.opt = options or EngineOptions()
        self.budget_bytes = budget_bytes
        self.ledger = self._prepare_policy(seed, profile, sensitivity)
        self.h2d, self.d2h = Link(hw.h2d, "h2d"), Link(hw.d2h, "d2h")
        self.pool = SimPool(self.ledger, spec, self.h2d)
        self.P = len(self.pool.precisions)
        self._low = [(m & -m).bit_length() - 1 for m in range(1 << self.P)]  # bitmask -> best precision
        self.kernels = KernelModel(hw, spec, self.pool.precisions)
        self._errors(sensitivity)
        self.counts = {"promotions": 0, "prefetches": 0, "demotions": 0, "refusals": 0}
        self.host_io_bytes = 0
        self.log: list[tuple[Any, ...]] | None = [] if self.opt.log else None
        self._check_feasible()
        self._place_initial()

    # ---- set-up ----
    def _prepare_policy(self, seed: int, profile: LayerSteps | None, table: SensitivityTable | None) -> SlabLedger:
        spec = self.spec
        ctx = PolicyContext(
            spec=spec, budget_bytes=self.budget_bytes, rng=np.random.default_rng(seed),
            precision_bytes={p: spec.expert_bytes(p) for p in PRECISIONS},
            profile=profile, future=self.view if self.policy.needs_future else None, sensitivity=table,
        )
        self.policy.prepare(ctx)
        return SlabLedger(self.policy.slab_plan(), self.budget_bytes)

    def _errors(self, table: SensitivityTable | None) -> None:
        """Per (layer, expert): error per pool precision, and of the host's bf16 copy."""
        L, E, row = self.spec.layers, self.spec.experts, self.spec.hidden
        names = [*self.pool.precisions, "bf16"]
        mixes = {n: get_channel_mix(n) for n in names}
        base = sorted({b for n, m in mixes.items() for b in ((n,) if m is None else (m.low, m.high))})
        if table is None:
            arr = np.broadcast_to(np.array([analytic_error(p, row) for p in base]), (L, E, len(base)))
        else:
            arr = table.error_array(L, E, base, row)
        col: dict[str, Any] = {b: arr[:, :, i] for i, b in enumerate(base)}
        per = []
        for n in names:
            mix = mixes[n]
            per.append(col[n] if mix is None else np.asarray(mix.error(col[mix.low], col[mix.high])))
        self.err_table = np.stack(per[: self.P], axis=2).astype(np.float64)  # [L, E, P]
        self.err_of = self.err_table.tolist()  # [L][E][P]
        self.host_err = per[self.P].tolist()  # [L][E]

    def _check_feasible(self) -> None:
        sizes = np.diff(np.asarray(self.view.offsets))
        need = int(sizes.max()) if sizes.size else 0
        slabs = sum(c.count for c in self.ledger.classes.values())
        if self.policy.miss_rule is not MissRule.HOST and slabs < need:
            smallest = min((c.slab_bytes for c in self.ledger.classes.values()), default=0)
            raise InfeasibleError(
                f"budget_gb={self.budget_bytes / 1e9:g} gives {self.name} {slabs} expert slabs, but a layer step "
                f"of this workload needs {need} experts at once; raise budget_gb to at least "
                f"{need * smallest / 1e9:.3f} or lower the batch size"
            )

    def _place_initial(self) -> None:
        for a in self.policy.initial_loads():
            self._check_key(a.key)
            r = self.pool.evict(a.key, a.precision) if a.kind is ActionKind.DEMOTE else self.pool.place(a.key, a.precision)
            if isinstance(r, Refusal):
                self.counts["refusals"] += 1
                self.policy.on_refused(a, r)

    def _check_key(self, key: ExpertKey) -> None:
        if not (0 <= key[0] < self.spec.layers and 0 <= key[1] < self.spec.experts):
            raise PolicyError(f"policy {self.name} named expert {key}, outside {self.spec.name}'s "
                              f"{self.spec.layers} layers x {self.spec.experts} experts")

    # ---- running ----
    def run(self) -> RunResult:
        """Replay every layer step; returns the measured arrays."""
        rec = Recorder(self.pool.precisions)
        env = simpy.Environment()
        wall0 = time.perf_counter()
        bar = tqdm(total=self.view.layer_steps, unit="step", mininterval=0.5, desc=f"sim {self.name}",
                   disable=not self.opt.progress or self.view.layer_steps < 20_000)
        env.process(self._process(env, rec, bar))
        env.run()
        bar.close()
        wall = time.perf_counter() - wall0
        info = {"policy": self.name, "precisions": list(self.pool.precisions),
                "kernel_source": {p: self.kernels.source(i) for i, p in enumerate(self.pool.precisions)}}
        return RunResult.from_recorder(rec, self.view, wall, info)

    def _process(self, env: simpy.Environment, rec: Recorder, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        if self.policy.is_static and self.opt.fast_static and not self.opt.check and not self.opt.log:
            plan = static_plan(self)
            if plan is not None:
                yield from plan.replay(env, rec, bar)
                return
        yield from self._replay(env, rec, bar)

    def pass_ends(self) -> np.ndarray:
        """True at the last layer step of every pass."""
        v = self.view
        key = np.asarray(v.ls_batch, np.int64) * (int(np.max(v.ls_pass, initial=0)) + 1) + np.asarray(v.ls_pass)
        return np.r_[key[1:] != key[:-1], True] if key.size else np.zeros(0, bool)

    def snapshot(self) -> tuple[int, ...]:
        """Counters in :data:`sim.metrics.COUNTERS` order."""
        c = self.counts
        return (self.h2d.bytes_total, self.d2h.bytes_total, self.pool.loaded_bytes, c["promotions"],
                c["prefetches"], c["demotions"], c["refusals"], self.ledger.used_bytes, self.pool.peak_bytes)

    def _chunk(self, c0: int, c1: int, non_moe: np.ndarray, ends: np.ndarray) -> _Chunk:
        """Layer steps ``c0:c1`` as Python lists for the event loop (one numpy pass per chunk)."""
        v = self.view
        lo, hi = int(v.offsets[c0]), int(v.offsets[c1])
        ex = (np.asarray(v.ex_expert[lo:hi]).tolist(), np.asarray(v.ex_tokens[lo:hi]).tolist(),
              np.asarray(v.ex_gate[lo:hi], dtype=np.float64).tolist())
        return _Chunk(lo, (np.asarray(v.offsets[c0 : c1 + 1]) - lo).tolist(), ex, v.ls_layer[c0:c1].tolist(),
                      v.ls_pass[c0:c1].tolist(), non_moe[c0:c1].tolist(), ends[c0:c1].tolist())

    def _replay(self, env: simpy.Environment, rec: Recorder, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        """The event loop: per layer step, finish due copies, consult the policy, serve."""
        v, pool, ledger = self.view, self.pool, self.ledger
        non_moe, ends = self.kernels.non_moe_s(np.asarray(v.ls_tokens)), self.pass_ends()
        on_step = None if self.policy.is_static else self.policy.on_layer_step
        single = self.P == 1 and not self.opt.check and self.log is None
        ex_expert, ex_tokens, ex_gate = v.ex_expert, v.ex_tokens, v.ex_gate
        pending, advance, apply, timeout = pool.pending, pool.advance, self._apply, env.timeout
        t = now = 0.0
        for c0 in range(0, v.layer_steps, CHUNK):
            c = self._chunk(c0, min(v.layer_steps, c0 + CHUNK), non_moe, ends)
            serve = single_class_server(self, c0, c, rec) if single else self._server(c0, c, rec)
            lo, off, _, layers, passes, nm, pe = c
            for j in range(len(nm)):
                t1 = t + nm[j]
                if pending and pending[0][0] <= t1:
                    advance(t1)
                layer = layers[j]
                if on_step is not None:
                    pi, a, b = passes[j], lo + off[j], lo + off[j + 1]
                    actions = on_step(LayerObs(c0 + j, layer, 1 if pi else 0, pi, ex_expert[a:b], ex_tokens[a:b],
                                               ex_gate[a:b], t1), ledger)
                    if actions:
                        apply(actions, t1)
                t = serve(j, layer, t1)
                if pe[j]:
                    rec.snaps.append(self.snapshot())
                d = t - now  # SimPy's clock, tracked here: env.now + d is what the timeout sets
                if d < 0.0:
                    d = 0.0
                now += d
                yield timeout(d)
            bar.update(len(nm))

    def _server(self, c0: int, c: _Chunk, rec: Recorder) -> Callable[[int, int, float], float]:
        """``serve(j, layer, t1)`` for step ``j`` of chunk ``c``: the general :meth:`_serve`."""
        off, ex, serve = c.off, c.ex, self._serve

        def serve_step(j: int, layer: int, t1: float) -> float:
            return serve(c0 + j, layer, ex, off[j], off[j + 1], t1, rec)

        return serve_step

    def _apply(self, actions: Sequence[Action], now: float) -> None:
        """Carry out a policy's actions in order at ``now``; report refusals back."""
        if self.log is None:
            self.pool.apply(actions, now, self.counts, self._refused, self._check_key)
        else:
            self.pool.apply(actions, now, self.counts, lambda a, r: self._refused(a, r, now), self._check_key,
                            self._log_action)

    def _log_action(self, a: Action, now: float, done: float) -> None:
        self.log.append((a.kind.name.lower(), str(a.key), a.precision, _us(now), _us(done)))  # type: ignore[union-attr]

    def _refused(self, a: Action, reason: Refusal, now: float = 0.0) -> None:
        self.counts["refusals"] += 1
        if self.log is not None:
            self.log.append(("refused", a.kind.name, str(a.key), a.precision, reason.name, _us(now)))
        self.policy.on_refused(a, reason)

    # ---- serving one layer step ----
    def _serve(self, i: int, layer: int, ex: tuple[list, list, list], a: int, b: int, t1: float,
               rec: Recorder) -> float:
        """Serve layer step ``i`` (entries ``a:b`` of the chunk lists); returns its end time."""
        wait, tok, cnt, err, host, served = self._choose(layer, ex, a, b)
        start = t1 if wait <= t1 else wait
        if start > t1:
            self.pool.advance(start)
        if served is not None:
            self._pin(layer, served, +1)
        gpu = 0.0
        group_s = self.kernels.group_s
        for p in range(self.P):
            if cnt[p]:
                gpu += group_s(p, tok[p], cnt[p])
        gpu_end = start + gpu
        end = gpu_end
        host_tokens = 0
        if host:
            back, host_tokens = self._host(t1, host)
            end = back if back > gpu_end else gpu_end
        if served is not None:
            self._pin(layer, served, -1)
            self._check_invariants(i)
        if self.log is not None:
            self.log.append(("serve", i, _us(t1), _us(start), _us(end),
                             tuple(f"L{layer}E{e}@{self._pname(p)}" for e, p in served or ())))
        rec.end_s.append(end)
        rec.stall_s.append(start - t1)
        rec.host_wait_s.append(end - gpu_end)
        rec.err.append(err)
        rec.act.extend(tok)
        rec.act.append(host_tokens)
        return end

    def _pname(self, p: int) -> str:
        return "host" if p < 0 else self.pool.precisions[p]

    def _choose(self, layer: int, ex: tuple[list, list, list], a: int, b: int) -> tuple:
        """Pick each needed expert's copy per the miss rule (see the module docstring).

        Returns (time of the last awaited copy, tokens per precision, experts per precision,
        gate-weighted error, host entries [(expert, tokens)], served [(expert, p)] or None)."""
        pool, P, low = self.pool, self.P, self._low
        rule = self.policy.miss_rule
        stall, host_rule = rule is _STALL, rule is _HOST
        rl, ll, errl = pool.ready[layer], pool.loading[layer], self.err_of[layer]
        ex_e, ex_t, ex_g = ex
        tok, cnt = [0] * P, [0] * P
        host: list[tuple[int, int]] = []
        track = self.opt.check or self.log is not None
        served: list[tuple[int, int]] | None = [] if track else None
        err, wait = 0.0, 0.0
        for j in range(a, b):
            e = ex_e[j]
            r, ld = rl[e], ll[e]
            if ld and ((stall and (not r or low[ld] < low[r])) or (not r and not host_rule)):
                p = low[ld] if stall else self._first_done(layer, e, ld)  # wait for a copy in flight
                d = pool.ready_time(layer, e, p)
                if d > wait:
                    wait = d
            elif r:
                p = low[r]  # the best READY copy
            elif host_rule:
                host.append((e, ex_t[j]))
                err += ex_g[j] * self.host_err[layer][e]
                if served is not None:
                    served.append((e, -1))
                continue
            else:
                raise self._no_copy(layer, e)
            tok[p] += ex_t[j]
            cnt[p] += 1
            err += ex_g[j] * errl[e][p]
            if served is not None:
                served.append((e, p))
        return wait, tok, cnt, err, host, served

    def _first_done(self, layer: int, e: int, bits: int) -> int:
        """The precision index of the copy in flight that completes first."""
        best, best_t = -1, float("inf")
        for p in range(self.P):
            if bits >> p & 1:
                d = self.pool.ready_time(layer, e, p)
                if d < best_t:
                    best, best_t = p, d
        return best

    def _no_copy(self, layer: int, e: int) -> PolicyError:
        return PolicyError(
            f"policy {self.name}: expert L{layer}E{e} is needed but has no copy and none in flight "
            f"(miss rule {self.policy.miss_rule.name}); the policy must promote it or use MissRule.HOST"
        )

    def _host(self, t1: float, host: list[tuple[int, int]]) -> tuple[float, int]:
        """Experts on the host: activations down, compute, results up; (time back, tokens)."""
        tokens = sum(t for _, t in host)
        io = self.kernels.activation_bytes(tokens)
        arrive = self.d2h.submit(t1, io)
        done = arrive + sum(self.kernels.host_expert_s(t) for _, t in host)
        self.host_io_bytes += io
        return self.h2d.submit(done, io), tokens

    def _pin(self, layer: int, served: list[tuple[int, int]], sign: int) -> None:
        for e, p in served:
            if p < 0:
                continue
            slab = self.ledger.slab_of(ExpertKey(layer, e), self.pool.precisions[p])
            if slab is None:
                raise PolicyError(f"L{layer}E{e}@{self.pool.precisions[p]} vanished while being served")
            (self.ledger.pin if sign > 0 else self.ledger.unpin)(slab)

    def _check_invariants(self, i: int) -> None:
        led = self.ledger
        if led.used_bytes > self.budget_bytes or led.used_bytes > led.pool_bytes:
            raise AssertionError(f"step {i}: resident {led.used_bytes} B exceeds budget {self.budget_bytes} B")
        done = [d[0] for d in self.pool.pending]
        if done != sorted(done):
            raise AssertionError(f"step {i}: copies would complete out of FIFO order: {done}")
        if self.h2d.bytes_total != self.pool.loaded_bytes + self.host_io_bytes:
            raise AssertionError(f"step {i}: {self.h2d.bytes_total} B on the link but {self.pool.loaded_bytes} B "
                                 f"of loads and {self.host_io_bytes} B of host results")
