"""The replay engine: layer steps through a SimPy model of PCIe, the slab pool and compute.

Batches run one after another; within a batch, the prefill pass (all prompt tokens of the
batch) and then each decode pass, and within a pass every MoE layer in order: one layer step
each (see :mod:`core.routing`). The compute stream is the engine's SimPy process; the copy
streams are the two PCIe directions (:mod:`sim.link`); the slab pool is :mod:`sim.pool`, the
mechanism the policy driver (:class:`drive.driver.Driver`, shared with the runtime) hands
actions to. This module keeps time; the decisions are the driver's.

Timing of one layer step, starting at ``t0`` (the end of the previous one):

1. non-MoE part of the layer (attention, norms, router, shared experts): ``t1 = t0 + non_moe``;
   the router's output is known at ``t1``; copies complete by ``t1`` turn READY.
2. the driver gives the policy the step's routing (``obs.now_s = t1``; skipped for static
   policies; with ``observe_lag`` d, the routing of step i - d) and hands its actions to the
   pool in order at ``t1``: DEMOTE evicts at once (a pinned slab drains), PROMOTE / PREFETCH
   reserve a slab and queue the copy on the host-to-device FIFO; each refusal goes back
   through ``policy.on_refused``.
3. every needed expert is served per the miss rule (:func:`drive.missrule.choose`, the same
   code as the runtime's); experts the rule sends to the host are computed there (bf16,
   activations over PCIe both ways), in parallel with the device. An expert with no copy and
   nothing in flight under SERVE_LOWER or STALL is *bypassed* when the policy has a staging
   slab (``policy.staging()``: S expert slots at one precision, their bytes taken from the
   budget): streamed through it and dropped (step 5); without one it is a policy bug:
   :class:`PolicyError`.
4. device compute starts at ``start = max(t1, last awaited copy)`` (``stall = start - t1``):
   one grouped launch per precision class (:mod:`sim.kernels`), summed; the step ends at
   ``max(start + compute, host results back)``. Served slabs are pinned for the compute and
   unpinned after (carried out in ``check`` mode; in this model the next policy call always
   comes after the unpin, so pins never change a decision).
5. bypassed experts stream through the staging slots in ascending expert id: expert j's copy
   is queued on the host-to-device link when slot ``j mod S`` is free (at ``t1``, or once the
   expert before it in that slot is computed), and it is computed, one launch per expert,
   when its copy is done and the device is free (after the step's cached experts); the step
   ends when the last one is computed. On a graph profile (the graph-captured runtime,
   :mod:`runtime.graph_engine`) the staged launches come first, from ``start``: the host issues
   each copy and launch (``HostCosts.stage_s`` apiece), a launch costs one expert of the graph
   table plus ``launch_s``, and the cached experts start once both the staged launches and the
   host are done (:meth:`Engine.stream_first`).

Hit rate: a layer step requests each distinct expert it needs once; a request hits when the
expert has a READY copy (any precision) when the step's routing is known (at ``t1``, before
the policy acts). Bypassed experts are misses by definition.

With ``route_lag`` >= 1 a policy that never waits for a copy runs on the per-pass seam of the
graph-captured runtime instead (:func:`drive.driver.per_pass`): :mod:`sim.passes` has its loop.

Initial loads (``policy.initial_loads()``) are placed before t = 0, untimed and uncounted.
Copy completions are closed-form times, and copies turn READY lazily: when a step starts or
waits past the earliest pending completion (no event per copy); the engine yields one SimPy
timeout per layer step. The policy's actions of a step go to the pool in one call
(:meth:`sim.pool.SimPool.apply`). Routing is turned into Python lists a chunk of layer steps
at a time. Three shortcuts give the same numbers bit for bit (tests check it): static policies
whose experts are all resident take a vectorized path, one-class pools (one precision, e.g. the
offload caches) take each step's tokens, kernel time and error from numpy per chunk, and in
pools of several classes a step whose experts all have a READY copy the miss rule serves as it
is skips the general loop (all in :mod:`sim.fastpath`; `tests/test_sim_paths.py` runs every
registered policy under every miss rule it supports through both and compares every step
record; `EngineOptions.fast=False` turns them off).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import simpy
from moebits.core.hardware import HardwareProfile
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.quality import SensitivityTable
from moebits.core.routing import LayerSteps
from moebits.core.slabs import InfeasibleError, Refusal  # InfeasibleError: re-exported (__all__)
from moebits.drive.context import PolicyError, policy_name, prepare_policy
from moebits.drive.driver import Driver, per_pass
from moebits.drive.missrule import Choice, Residency, choose, lowest_bits, no_copy, served_row, tokens_served
from moebits.drive.quality import error_table
from moebits.drive.records import Recorder, RunResult, snapshot
from moebits.policies.base import Action, LayerObs, MissRule, Policy
from moebits.sim.fastpath import ready_server, single_class_server, static_plan
from moebits.sim.kernels import KernelModel
from moebits.sim.link import Link
from moebits.sim.passes import replay_passes
from moebits.sim.pool import SimPool
from tqdm import tqdm

__all__ = ["CHUNK", "Engine", "EngineOptions", "InfeasibleError", "PolicyError", "policy_name"]

CHUNK = 4096  # layer steps converted to Python lists at a time


class _Chunk(NamedTuple):
    """Layer steps of one chunk as Python lists (entry offsets relative to ``lo``)."""

    lo: int
    off: list[int]
    ex: tuple[list[int], list[int], list[float]]  # expert, tokens, gate per entry
    layers: list[int]
    passes: list[int]
    non_moe_s: list[float]
    pass_end: list[bool]


@dataclass
class EngineOptions:
    """``check``: pin served slabs and assert the invariants at every step (slower).
    ``log``: keep an event log (times in µs) for tests. ``served``: record what every step
    served (:attr:`drive.records.RunResult.served`; the general path). ``fast``: allow the
    shortcuts of :mod:`sim.fastpath` (the vectorized path of static policies, the one-class
    server); off, every step takes the general path. ``progress``: a tqdm bar."""

    check: bool = False
    log: bool = False
    served: bool = False
    fast: bool = True
    progress: bool = False


def _us(t: float) -> float:
    return round(t * 1e6, 6)


class Engine:
    """One replay of ``view`` under ``policy``; :meth:`run` returns a :class:`RunResult`.

    ``policy_hw``: the profile the policy plans with (mxmoe weighs kernel times), when it is not
    the one that prices the replay (validation: the runtime's policy saw the run's profile)."""

    def __init__(self, view: LayerSteps, spec: ModelSpec, hw: HardwareProfile, policy: Policy,
                 budget_bytes: int, *, seed: int = 0, sensitivity: SensitivityTable | None = None,
                 profile: LayerSteps | None = None, options: EngineOptions | None = None,
                 observe_lag: int = 0, route_lag: int = 0, policy_hw: HardwareProfile | None = None) -> None:
        if budget_bytes <= 0:
            raise InfeasibleError(f'"budget_gb" must be > 0, got {budget_bytes / 1e9:g}.')
        self.view, self.spec, self.hw, self.policy = view, spec, hw, policy
        self.name = policy_name(policy)
        self.opt = options or EngineOptions()
        self.budget_bytes = budget_bytes
        self.ledger = prepare_policy(policy, spec, budget_bytes, seed, profile=profile,
                                     future=view if policy.needs_future else None, sensitivity=sensitivity,
                                     hardware=policy_hw or hw)
        self.driver = Driver(policy, self.ledger, spec, observe_lag)
        self.route_lag = route_lag
        self.whole_steps = per_pass(policy, route_lag)   # the runtime serves whole-step graphs
        self.per_pass = self.whole_steps and not self.driver.static  # static: the same decisions either way
        self.copy_wait_s = 0.0  # per-pass seam: host seconds waiting for copies (sim.passes)
        self.h2d, self.d2h = Link(hw.h2d, "h2d"), Link(hw.d2h, "d2h")
        self.pool = SimPool(self.ledger, spec, self.h2d)
        self._stage_p, self.staging_slots, self._stage_bytes = self._staging_slab()
        self._stage_s: dict[int, float] = {}  # tokens -> seconds of one staged expert's launch
        self.P = len(self.pool.precisions)
        self._low = lowest_bits(self.P)  # bitmask -> best precision
        self.res = [Residency(self.pool.ready[i], self.pool.loading[i], self._ready_time(i)) for i in range(spec.layers)]
        self.kernels = KernelModel(hw, spec, self.pool.precisions)
        self._graph = self._graph_costs() if self.kernels.graphed else None
        self.host_costs = hw.host_costs if self._graph is not None else None   # the controller's host work
        if self.host_costs is not None:
            self.per_pass = self.per_pass or self.whole_steps   # a static policy's passes wait for the host too
            first, each = (0.0, self.host_costs.copy_s) if self.per_pass else self.host_costs.layer_copy()
            self.pool.issue_s, self.pool.issue_first_s = each, first
        if self._graph is not None or hw.stall_sync_s:
            self.opt = dataclasses.replace(self.opt, fast=False)  # the shortcuts price with the per-class model
        errors = error_table(spec, self.pool.precisions, sensitivity)
        self.err_table, self.err_of, self.host_err = errors.table, errors.of, errors.host
        self.counts = self.driver.counts
        self.host_io_bytes = 0
        self.staged_bytes = 0
        self.log: list[tuple[Any, ...]] | None = [] if self.opt.log else None
        self._track = self.opt.check or self.opt.log or self.opt.served  # list what each step serves
        self._check_feasible()
        if self.log is not None:
            self.driver.watch(self._log_refused, self._log_action)
        self.driver.attach(self.pool)

    # ---- set-up ----
    def _graph_costs(self) -> tuple[np.ndarray, list[list[float]], list[list[float]]]:
        """Per-step costs from the profile's graph table: (outside the experts, per-token, per-expert)."""
        v = self.view
        passes, tokens = np.asarray(v.ls_pass), np.asarray(v.ls_tokens)
        prompt: dict[int, int] = {}
        for b, p, t in zip(np.asarray(v.ls_batch).tolist(), passes.tolist(), tokens.tolist(), strict=True):
            if p == 0:
                prompt.setdefault(b, t)
        context = np.array([prompt.get(b, 0) + p - 1 if p else 0 for b, p in zip(np.asarray(v.ls_batch).tolist(),
                                                                                  passes.tolist(), strict=True)])
        ends = self.pass_ends()
        first = np.r_[True, ends[:-1]] if ends.size else ends
        base, tok_s, cnt_s = self.kernels.graph_steps(tokens, passes == 0, context, first)
        return base, tok_s.tolist(), cnt_s.tolist()

    def step_non_moe_s(self, per_layer_seam: bool) -> np.ndarray:
        """Seconds of every layer step outside its experts (the pass's fixed part at its first step);
        on a graph profile's per-layer seam plus the host turnaround ``layer_sync_s``."""
        if self._graph is not None:
            return self._graph[0] + (self.hw.layer_sync_s + self._layer_host_s() if per_layer_seam else 0.0)
        ends = self.pass_ends()
        return self.kernels.non_moe_s(np.asarray(self.view.ls_tokens), np.r_[True, ends[:-1]] if ends.size else ends)

    def _layer_host_s(self) -> np.ndarray | float:
        """Per layer step on the per-layer seam, the host costs that grow with its experts: the miss rule
        and record (``entry_s``, plus the policy's own ``layer_s``), the policy's observation (``observe_s``);
        copies are charged as issued."""
        hc = self.host_costs
        if hc is None:
            return 0.0
        entries = np.diff(np.asarray(self.view.offsets, np.int64)).astype(np.float64)
        if self.driver.static:
            return hc.entry_s * entries
        (obs_step, obs_expert), (own_step, own_expert) = hc.observe(self.name), hc.layer(self.name)
        return obs_step + own_step + (hc.entry_s + obs_expert + own_expert) * entries

    def copies_issued(self) -> int:
        """Copies the policy has issued so far (promotions and prefetches)."""
        return self.counts["promotions"] + self.counts["prefetches"]

    def _ready_time(self, layer: int) -> Callable[[int, int], float]:
        ready_time = self.pool.ready_time
        return lambda e, p: ready_time(layer, e, p)

    def _staging_slab(self) -> tuple[int, int, int]:
        """(precision index, slots, bytes per slot) of the policy's staging slab; (-1, 0, 0) if none."""
        staging = self.policy.staging()
        if staging is None or staging.count == 0:
            return -1, 0, 0
        if staging.precision not in self.pool.index:
            raise PolicyError(f"policy {self.name}: staging precision {staging.precision} has no slab class "
                              f"(pool precisions: {', '.join(self.pool.precisions)})")
        return self.pool.index[staging.precision], staging.count, staging.slab_bytes

    def _check_feasible(self) -> None:
        sizes = np.diff(np.asarray(self.view.offsets))
        need = int(sizes.max()) if sizes.size else 0
        slabs = sum(c.count for c in self.ledger.classes.values())
        if self.policy.miss_rule is not MissRule.HOST and slabs < need and not self.staging_slots:
            smallest = min((c.slab_bytes for c in self.ledger.classes.values()), default=0)
            raise InfeasibleError(
                f"budget_gb={self.budget_bytes / 1e9:g} gives {self.name} {slabs} expert slabs, but a layer step "
                f"of this workload needs {need} experts at once; raise budget_gb to at least "
                f"{need * smallest / 1e9:.3f} or lower the batch size"
            )

    # ---- running ----
    def run(self) -> RunResult:
        """Replay every layer step; returns the measured arrays."""
        rec = Recorder(self.pool.precisions, served=[] if self.opt.served else None)
        rec.requests = np.diff(np.asarray(self.view.offsets, dtype=np.int64))  # each distinct expert, once
        env = simpy.Environment()
        wall0 = time.perf_counter()
        bar = tqdm(total=self.view.layer_steps, unit="step", mininterval=0.5, desc=f"sim {self.name}",
                   disable=not self.opt.progress or self.view.layer_steps < 20_000)
        env.process(self._process(env, rec, bar))
        env.run()
        bar.close()
        wall = time.perf_counter() - wall0
        info: dict[str, Any] = {"policy": self.name, "precisions": list(self.pool.precisions),
                "kernel_source": {p: self.kernels.source(i) for i, p in enumerate(self.pool.precisions)}}
        if self.per_pass:
            info.update(observe="per-pass", copy_wait_s=self.copy_wait_s)
        return RunResult.from_recorder(rec, self.view, wall, info)

    def _process(self, env: simpy.Environment, rec: Recorder, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        if self.per_pass:
            yield from replay_passes(self, env, rec, bar)
            return
        if self.policy.is_static and self.opt.fast and not self._track:
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
        """Counters in :data:`drive.records.COUNTERS` order."""
        return snapshot((self.h2d.bytes_total, self.d2h.bytes_total, self.pool.loaded_bytes), self.counts,
                        (self.ledger.used_bytes, self.pool.peak_bytes))

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
        v, pool = self.view, self.pool
        ends = self.pass_ends()
        non_moe = self.step_non_moe_s(per_layer_seam=not self.whole_steps)
        observe = None if self.driver.static else self.driver.observe
        single = self.P == 1 and self.opt.fast and not self._track
        ex_expert, ex_tokens, ex_gate = v.ex_expert, v.ex_tokens, v.ex_gate
        pending, advance, timeout = pool.pending, pool.advance, env.timeout
        ready, hits = pool.ready, rec.hits
        step_s, copy_s = self.host_costs.layer_copy() if self.host_costs is not None else (0.0, 0.0)
        io_s = self.hw.pass_io_s if self.host_costs is not None else 0.0
        firsts = set(np.flatnonzero(np.r_[True, ends[:-1]]).tolist()) if io_s else set()   # first step of each pass
        issued = self.copies_issued()
        t = now = 0.0
        for c0 in range(0, v.layer_steps, CHUNK):
            c = self._chunk(c0, min(v.layer_steps, c0 + CHUNK), non_moe, ends)
            serve = single_class_server(self, c0, c, rec) if single else self._server(c0, c, rec)
            lo, off, (exs, _, _), layers, passes, nm, pe = c
            for j in range(len(nm)):
                t1 = t + nm[j]
                if io_s and c0 + j in firsts:   # the pass's own copies (inputs up) before its first graph
                    t1 += io_s
                if pending and pending[0][0] <= t1:
                    advance(t1)
                layer = layers[j]
                rl, n = ready[layer], 0
                for e in exs[off[j] : off[j + 1]]:  # requests that hit (a plain loop is fastest here)
                    if rl[e]:
                        n += 1
                hits.append(n)
                if observe is not None:
                    pi, a, b = passes[j], lo + off[j], lo + off[j + 1]
                    observe(LayerObs(c0 + j, layer, 1 if pi else 0, pi, ex_expert[a:b], ex_tokens[a:b], ex_gate[a:b], t1))
                    if copy_s or step_s:   # the host issues the new copies before the step's experts are launched
                        k = self.copies_issued()
                        if k > issued:
                            t1 += step_s + copy_s * (k - issued)
                        issued = k
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
        """``serve(j, layer, t1)`` for step ``j`` of chunk ``c``: :func:`sim.fastpath.ready_server`
        (steps served from READY copies) when shortcuts are on and nothing is tracked, else the
        general :meth:`serve_general`."""
        if self.opt.fast and not self._track:
            return ready_server(self, c0, c, rec, self._low, self.policy.miss_rule)
        off, ex, serve = c.off, c.ex, self.serve_general

        def serve_step(j: int, layer: int, t1: float) -> float:
            return serve(c0 + j, layer, ex, off[j], off[j + 1], t1, rec)

        return serve_step

    def _log_action(self, a: Action, now: float, done: float) -> None:
        self.log.append((a.kind.name.lower(), str(a.key), a.precision, _us(now), _us(done)))  # type: ignore[union-attr]

    def _log_refused(self, a: Action, reason: Refusal, now: float) -> None:
        self.log.append(("refused", a.kind.name, str(a.key), a.precision, reason.name, _us(now)))  # type: ignore[union-attr]

    # ---- serving one layer step ----
    def serve_general(self, i: int, layer: int, ex: tuple[list, list, list], a: int, b: int, t1: float,
                      rec: Recorder) -> float:
        """Serve layer step ``i`` (entries ``a:b`` of the chunk lists); returns its end time."""
        choice = self._choose(layer, ex, a, b)
        wait, tok, cnt, err, host, served, _, bypass = choice
        if rec.served is not None:
            rec.served.append(served_row(choice, ex[1], a, self.pool.precisions))
        start = t1 if wait <= t1 else wait + self.hw.stall_sync_s
        if start > t1:
            self.pool.advance(start)
        if served is not None:
            self._pin(layer, served, +1)
        gpu = 0.0
        if self._graph is not None:
            ts, cs = self._graph[1][i], self._graph[2][i]
            for p in range(self.P):
                if cnt[p]:
                    gpu += tok[p] * ts[p] + cnt[p] * cs[p]
        else:
            group_s = self.kernels.group_s
            for p in range(self.P):
                if cnt[p]:
                    gpu += group_s(p, tok[p], cnt[p])
        if not bypass:
            gpu_end = start + gpu
        elif self._graph is not None:   # the graph runtime: staged launches first, then the layer's graph
            staged_end, host_end = self.stream_first(start, bypass, i)
            gpu_end = (staged_end if staged_end > host_end else host_end) + gpu
        else:
            gpu_end = self.stream(t1, start + gpu, bypass)
        if bypass:
            tok = tokens_served(choice, self._stage_p)
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

    def stream(self, t1: float, device_free: float, bypass: list[tuple[int, int]]) -> float:
        """Stream bypassed experts through the staging slots (module docstring, step 5);
        returns when the last one is computed."""
        nbytes, submit, one_s = self._stage_bytes, self.h2d.submit, self._stage_s
        slots = self.staging_slots
        slot_free = [t1] * slots
        for j, (_, tokens) in enumerate(bypass):
            s = j % slots
            ready = submit(slot_free[s], nbytes)
            compute = one_s.get(tokens)
            if compute is None:  # one launch of one staged expert (memoized by tokens)
                compute = one_s[tokens] = self.kernels.group_s(self._stage_p, tokens, 1)
            device_free = (ready if ready > device_free else device_free) + compute
            slot_free[s] = device_free
        self.counts["bypasses"] += len(bypass)
        self.staged_bytes += nbytes * len(bypass)
        return device_free

    def stream_first(self, t0: float, bypass: list[tuple[int, int]], i: int) -> tuple[float, float]:
        """The graph runtime's staging (module docstring, step 5): from ``t0`` the host issues, per bypassed
        expert, its copy and launch (``HostCosts.stage_s`` each, else ``copy_s``); copy ``j`` is queued once the
        host issued it and slot ``j mod S`` is free, the launch runs when the copy is done and the device is free
        (graph-table seconds of one expert plus a launch). Returns (device free, host done)."""
        nbytes, submit, slots = self._stage_bytes, self.h2d.submit, self.staging_slots
        hc = self.host_costs
        issue_s = (hc.stage_s or hc.copy_s) if hc is not None else 0.0
        ts, cs = self._graph[1][i][self._stage_p], self._graph[2][i][self._stage_p]   # type: ignore[index]
        slot_free, device_free, host = [t0] * slots, t0, t0
        for j, (_, tokens) in enumerate(bypass):
            s = j % slots
            host += issue_s
            ready = submit(host if host > slot_free[s] else slot_free[s], nbytes)
            device_free = (ready if ready > device_free else device_free) + tokens * ts + cs + self.hw.launch_s
            slot_free[s] = device_free
        self.counts["bypasses"] += len(bypass)
        self.staged_bytes += nbytes * len(bypass)
        return device_free, host

    def _pname(self, p: int) -> str:
        return "host" if p < 0 else self.pool.precisions[p]

    def _choose(self, layer: int, ex: tuple[list, list, list], a: int, b: int) -> Choice:
        """Each needed expert's copy per the miss rule (:func:`drive.missrule.choose`)."""
        return choose(self.policy.miss_rule, self.res[layer], self._low, self.P, self.err_of[layer],
                      self.host_err[layer], ex, a, b, track=self._track,
                      layer=layer, policy=self.name, stage_p=self._stage_p)

    def no_copy(self, layer: int, e: int) -> PolicyError:
        """The error for a needed expert with no copy and none in flight."""
        return no_copy(self.name, self.policy.miss_rule, layer, e)

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
        if self.h2d.bytes_total != self.pool.loaded_bytes + self.host_io_bytes + self.staged_bytes:
            raise AssertionError(f"step {i}: {self.h2d.bytes_total} B on the link but {self.pool.loaded_bytes} B "
                                 f"of loads, {self.staged_bytes} B staged and {self.host_io_bytes} B of host results")
