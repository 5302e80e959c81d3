"""Shortcuts of the replay that give the general loop's numbers bit for bit.

Three of them: the vectorized replay of a static policy (:func:`static_plan`), the one-class
server (:func:`single_class_server`, e.g. the offload caches) and, for pools with several
precision classes, the server of steps whose experts all have a READY copy that the miss rule
serves as it is (:func:`ready_server`, e.g. dynaexq's resident low copies).

The vectorized replay of a static policy: nothing moves, so every step is known up front.

When a static policy's initial placement leaves a READY copy for every expert the workload
needs, each layer step serves the same copies the general loop would (the best READY one),
never stalls and never moves a byte. Kernel times, precision mix and quality then follow
from numpy over all layer steps at once; only the clock runs step by step (one SimPy timeout
per layer step, as in the general loop). The arithmetic is the general loop's, in the same
order, so both paths give the same numbers bit for bit (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol

import numpy as np
import simpy
from moebits.core.model_spec import ModelSpec
from moebits.core.routing import LayerSteps
from moebits.drive.context import PolicyError
from moebits.drive.records import Recorder
from moebits.policies.base import MissRule, Policy
from moebits.sim.kernels import KernelModel
from moebits.sim.pool import SimPool
from tqdm import tqdm


class Engine(Protocol):
    """What the shortcuts read of the engine (:class:`sim.engine.Engine`): its public parts."""

    view: LayerSteps
    spec: ModelSpec
    policy: Policy
    pool: SimPool
    kernels: KernelModel
    err_table: np.ndarray
    err_of: list[list[list[float]]]
    P: int
    staging_slots: int

    def pass_ends(self) -> np.ndarray: ...

    def stream(self, t1: float, device_free: float, bypass: list[tuple[int, int]]) -> float: ...

    def snapshot(self) -> tuple[int, ...]: ...

    def no_copy(self, layer: int, e: int) -> PolicyError: ...

    def serve_general(self, i: int, layer: int, ex: tuple[list, list, list], a: int, b: int, t1: float,
                      rec: Recorder) -> float: ...


class StaticPlan:
    """Per-step device compute, error and activations of a static placement."""

    def __init__(self, engine: Engine, gpu_s: np.ndarray, err: np.ndarray, act: np.ndarray) -> None:
        self.engine, self.gpu_s, self.err, self.act = engine, gpu_s, err, act

    def replay(self, env: simpy.Environment, rec: Recorder, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        eng = self.engine
        last = eng.pass_ends()
        non_moe = eng.kernels.non_moe_s(np.asarray(eng.view.ls_tokens), np.r_[True, last[:-1]] if last.size else last).tolist()
        gpu = self.gpu_s.tolist()
        ends: list[float] = []
        t = 0.0
        for j in range(len(gpu)):
            t1 = t + non_moe[j]
            t = t1 + gpu[j]
            ends.append(t)
            yield env.timeout(max(0.0, t - env.now))
            if j % 4096 == 4095:
                bar.update(4096)
        bar.update(len(gpu) % 4096)
        S = len(gpu)
        rec.end_s = ends
        rec.stall_s = np.zeros(S)
        rec.host_wait_s = np.zeros(S)
        rec.err = self.err
        rec.act = self.act
        rec.hits = np.diff(np.asarray(eng.view.offsets, dtype=np.int64))  # everything is resident
        rec.snaps = [eng.snapshot()] * int(eng.pass_ends().sum())


def _best_ready(eng: Engine) -> np.ndarray:
    """Flat (layer * experts + expert) -> index of its best READY precision, or -1."""
    bits = np.asarray(eng.pool.ready, dtype=np.int64).ravel()
    best = np.full(bits.shape, -1, dtype=np.int64)
    for p in reversed(range(eng.P)):
        best[(bits >> p) & 1 == 1] = p
    return best


def static_plan(eng: Engine) -> StaticPlan | None:
    """The vectorized plan, or None when the general loop must run (host experts)."""
    v, P, E = eng.view, eng.P, eng.spec.experts
    S = v.layer_steps
    sizes = np.diff(np.asarray(v.offsets))
    step_of = np.repeat(np.arange(S, dtype=np.int64), sizes)
    layer_of = np.repeat(np.asarray(v.ls_layer, dtype=np.int64), sizes)
    expert = np.asarray(v.ex_expert, dtype=np.int64)
    p_of = _best_ready(eng)[layer_of * E + expert]
    missing = p_of < 0
    if missing.any():
        if eng.policy.miss_rule is MissRule.HOST:
            return None
        j = int(np.argmax(missing))
        raise eng.no_copy(int(layer_of[j]), int(expert[j]))
    key = step_of * P + p_of
    tokens = np.asarray(v.ex_tokens, dtype=np.int64)
    tok = np.bincount(key, weights=tokens, minlength=S * P).astype(np.int64).reshape(S, P)
    cnt = np.bincount(key, minlength=S * P).reshape(S, P)
    gpu = np.zeros(S)
    for p in range(P):
        gpu += eng.kernels.group_s_vec(p, tok[:, p], cnt[:, p])
    w = np.asarray(v.ex_gate, dtype=np.float64) * eng.err_table[layer_of, expert, p_of]
    err = np.bincount(step_of, weights=w, minlength=S)
    act = np.concatenate([tok, np.zeros((S, 1), np.int64)], axis=1)
    return StaticPlan(eng, gpu, err, act)


def single_class_steps(eng: Engine, c0: int, c1: int) -> tuple[list[int], list[float], list[float]]:
    """Layer steps ``c0:c1`` of a one-class pool: tokens, device seconds and gate-weighted
    error of each step as if every needed expert is served from that class (what the general
    loop computes whenever no expert goes to the host), as Python lists."""
    v = eng.view
    lo, hi = int(v.offsets[c0]), int(v.offsets[c1])
    n = c1 - c0
    sizes = np.diff(np.asarray(v.offsets[c0 : c1 + 1]))
    step_of = np.repeat(np.arange(n, dtype=np.int64), sizes)
    tok = np.bincount(step_of, weights=np.asarray(v.ex_tokens[lo:hi], dtype=np.int64), minlength=n).astype(np.int64)
    gpu = eng.kernels.group_s_vec(0, tok, sizes)
    layer_of = np.repeat(np.asarray(v.ls_layer[c0:c1], dtype=np.int64), sizes)
    w = np.asarray(v.ex_gate[lo:hi], dtype=np.float64) * eng.err_table[layer_of, np.asarray(v.ex_expert[lo:hi], np.int64), 0]
    err = np.bincount(step_of, weights=w, minlength=n)
    return tok.tolist(), gpu.tolist(), err.tolist()


def single_class_server(eng: Engine, c0: int, c: Any, rec: Recorder) -> Callable[[int, int, float], float]:
    """``serve(j, layer, t1)`` for step ``j`` of chunk ``c`` (an engine chunk starting at
    layer step ``c0``) of a one-class pool, without check or log. Every served copy is of
    the one precision, so tokens, kernel time and error come from :func:`single_class_steps`;
    per step only the copies to wait for, and the experts to stream through the staging slab
    (whose kernel time is then the cached experts' launch plus the streamed ones, as the
    engine computes it), are left. A step with an expert that has no copy and no staging
    slab goes through the engine's ``serve_general`` (HOST computes it on the host; the
    other rules raise). Same numbers as the general path, bit for bit."""
    tsum, gpu, err = single_class_steps(eng, c0, c0 + len(c.layers))
    (ex_e, ex_t, _), off, general = c.ex, c.off, eng.serve_general
    pool = eng.pool
    ready, loading, done_at, advance, E = pool.ready, pool.loading, pool.done_at, pool.advance, eng.spec.experts
    end_s, stall_s, host_wait_s, errs, act = rec.end_s, rec.stall_s, rec.host_wait_s, rec.err, rec.act
    host = eng.policy.miss_rule is MissRule.HOST
    staged = eng.staging_slots > 0
    group_s, stream = eng.kernels.group_s, eng.stream

    def serve(j: int, layer: int, t1: float) -> float:
        a, b = off[j], off[j + 1]
        rl = ready[layer]
        start = t1
        bypass: list[tuple[int, int]] | None = None
        if host:
            if not all(map(rl.__getitem__, ex_e[a:b])):  # some needed copy is not READY
                return general(c0 + j, layer, c.ex, a, b, t1, rec)
        else:
            # wait for the last needed copy in flight; experts with no copy at all stream
            # through the staging slab (without one, the general path raises)
            ll, base, wait = loading[layer], layer * E, 0.0
            for e, t in zip(ex_e[a:b], ex_t[a:b], strict=True):
                if rl[e]:
                    continue
                if not ll[e]:
                    if not staged:
                        return general(c0 + j, layer, c.ex, a, b, t1, rec)
                    if bypass is None:
                        bypass = []
                    bypass.append((e, t))
                    continue
                d = done_at[base + e]
                if d > wait:
                    wait = d
            if wait > t1:
                advance(wait)  # copies due by then turn READY
                start = wait
        if bypass is not None:
            n = b - a - len(bypass)
            tokens = tsum[j]
            for _, t in bypass:
                tokens -= t
            end = stream(t1, start + group_s(0, tokens, n) if n else start, bypass)
        else:
            end = start + gpu[j]
        end_s.append(end)
        stall_s.append(start - t1)
        host_wait_s.append(0.0)
        errs.append(err[j])
        act.append(tsum[j])
        act.append(0)
        return end

    return serve


def ready_server(eng: Engine, c0: int, c: Any, rec: Recorder, low: list[int],
                 rule: MissRule) -> Callable[[int, int, float], float]:
    """``serve(j, layer, t1)`` for step ``j`` of chunk ``c`` of a pool with several precision
    classes, without check or log: a step whose needed experts all have a READY copy that the
    miss rule serves as it is (any rule but STALL, or STALL with nothing better in flight) is
    served from those copies at once (no wait, no host, no bypass); any other step goes
    through the engine's ``serve_general``. Same numbers as the general path, bit for bit."""
    (ex_e, ex_t, ex_g), off, general = c.ex, c.off, eng.serve_general
    ready, loading, P, err_of = eng.pool.ready, eng.pool.loading, eng.P, eng.err_of
    end_s, stall_s, host_wait_s, errs, act = rec.end_s, rec.stall_s, rec.host_wait_s, rec.err, rec.act
    group_s, stall = eng.kernels.group_s, rule is MissRule.STALL

    def serve(j: int, layer: int, t1: float) -> float:
        a, b = off[j], off[j + 1]
        rl, ll, errl = ready[layer], loading[layer], err_of[layer]
        tok, cnt = [0] * P, [0] * P
        err = 0.0
        for e, t, g in zip(ex_e[a:b], ex_t[a:b], ex_g[a:b], strict=True):
            r = rl[e]
            if not r or (stall and ll[e] and low[ll[e]] < low[r]):
                return general(c0 + j, layer, c.ex, a, b, t1, rec)
            p = low[r]
            tok[p] += t
            cnt[p] += 1
            err += g * errl[e][p]
        gpu = 0.0
        for p in range(P):
            if cnt[p]:
                gpu += group_s(p, tok[p], cnt[p])
        end = t1 + gpu
        end_s.append(end)
        stall_s.append(0.0)
        host_wait_s.append(0.0)
        errs.append(err)
        act.extend(tok)
        act.append(0)
        return end

    return serve
