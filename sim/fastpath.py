"""The vectorized replay of a static policy: nothing moves, so every step is known up front.

When a static policy's initial placement leaves a READY copy for every expert the workload
needs, each layer step serves the same copies the general loop would (the best READY one),
never stalls and never moves a byte. Kernel times, precision mix and quality then follow
from numpy over all layer steps at once; only the clock runs step by step (one SimPy timeout
per layer step, as in the general loop). The arithmetic is the general loop's, in the same
order, so both paths give the same numbers bit for bit (a test checks it).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy
from tqdm import tqdm

from policies.base import MissRule
from sim.metrics import Recorder

if TYPE_CHECKING:
    from sim.engine import Engine


class StaticPlan:
    """Per-step device compute, error and activations of a static placement."""

    def __init__(self, engine: Engine, gpu_s: np.ndarray, err: np.ndarray, act: np.ndarray) -> None:
        self.engine, self.gpu_s, self.err, self.act = engine, gpu_s, err, act

    def replay(self, env: simpy.Environment, rec: Recorder, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        eng = self.engine
        non_moe = eng.kernels.non_moe_s(np.asarray(eng.view.ls_tokens)).tolist()
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
        raise eng._no_copy(int(layer_of[j]), int(expert[j]))
    key = step_of * P + p_of
    tokens = np.asarray(v.ex_tokens, dtype=np.int64)
    tok = np.bincount(key, weights=tokens, minlength=S * P).astype(np.int64).reshape(S, P)
    cnt = np.bincount(key, minlength=S * P).reshape(S, P)
    gpu = np.zeros(S)
    for p in range(P):
        gpu += eng.kernels.group_s_vec(p, tok[:, p], cnt[:, p])
    err_table = np.asarray(eng.err_of, dtype=np.float64)  # [L, E, P]
    w = np.asarray(v.ex_gate, dtype=np.float64) * err_table[layer_of, expert, p_of]
    err = np.bincount(step_of, weights=w, minlength=S)
    act = np.concatenate([tok, np.zeros((S, 1), np.int64)], axis=1)
    return StaticPlan(eng, gpu, err, act)
