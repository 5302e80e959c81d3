"""Trace-driven replay on the runtime: a workload's routing drives a :class:`RuntimeEngine`
(:func:`replay`) or the graph path's :class:`GraphEngine` (:func:`graph_replay`, routing forced
into the fast model's routing buffers).

Dimension legend: T tokens of a layer step, k experts per token, H hidden.

A replayed trace fixes routing, not hidden states: each layer step gets random activations and
a token -> expert assignment with the trace's per-expert token counts (:func:`assignment`),
and the engine serves it with the trace's own routing as the policy's observation.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from moebits.core.routing import LayerSteps
from moebits.drive.records import RunResult
from moebits.runtime.engine import RuntimeEngine
from moebits.runtime.graph_engine import GraphEngine, PassInput, flat_routing
from tqdm import tqdm


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
           progress: bool = False) -> RunResult:
    """Trace-driven replay: every layer step of ``view`` through ``engine`` with real expert
    compute on random activations (the trace fixes routing, not hidden states)."""
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


def pass_routing(view: LayerSteps, i: int, layers: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The routing ``ids``/``weights [L, T, k]`` of the pass whose first layer step is ``i``, from
    ``view`` (each layer step dealt by :func:`assignment`)."""
    T = int(view.ls_tokens[i])
    ids = np.zeros((layers, T, top_k), np.int32)
    w = np.zeros((layers, T, top_k), np.float32)
    for j in range(i, i + layers):
        a, b = int(view.offsets[j]), int(view.offsets[j + 1])
        ids[int(view.ls_layer[j])], w[int(view.ls_layer[j])] = assignment(
            view.ex_expert[a:b], view.ex_tokens[a:b], view.ex_gate[a:b], T, top_k)
    return ids, w


def replay_shape(view: LayerSteps) -> tuple[int, int, int]:
    """(most rows of a pass, most sequences, cache positions) a fast model needs to replay ``view``
    as :func:`graph_replay` lays it out (a prefill pass is one sequence, a decode row one sequence)."""
    tokens, passes = np.asarray(view.ls_tokens), np.asarray(view.ls_pass)
    rows = int(np.max(tokens, initial=1))
    seqs = int(np.max(tokens[passes > 0], initial=1))
    prompt = int(np.max(tokens[passes == 0], initial=1))
    return rows, seqs, prompt + int(np.max(passes, initial=0)) + 1


def graph_replay(engine: GraphEngine, view: LayerSteps, *, seed: int = 0, progress: bool = False) -> RunResult:
    """Trace-driven replay on the graph path: every pass of ``view`` with its routing forced
    (``engine`` built with ``replay=True``) over random tokens; prefill rows are one sequence's
    positions, decode rows one sequence each. Every pass's inputs are prepared (pinned on a GPU)
    before the clock starts, so the timed loop holds only what a serving engine does per pass."""
    L = engine.spec.layers
    if view.layer_steps % L or not np.array_equal(view.ls_layer[:L], np.arange(L)):
        raise ValueError(f"the graph path replays whole passes of {L} layers in order; this trace's layer steps are not")
    inputs = [_pass_input(engine, view, i, p) for p, i in enumerate(range(0, view.layer_steps, L))]
    _fill_tokens(inputs, engine.spec.vocab_size, seed)
    for rows in sorted({int(t) for t in np.unique(view.ls_tokens)}):
        engine.runner(rows)       # capture every pass size before the clock starts
    pin_host_thread()
    with no_gc_pauses():
        engine.host_log.probe()   # the host's speed around the timed loop (runtime.host_log.host_probe_s)
        engine.start()
        for p in tqdm(inputs, desc=f"graph replay {engine.name}", disable=not progress, unit="pass"):
            engine.run_pass(p)
        engine.host_log.probe()
    return engine.finish()


def pin_host_thread() -> None:
    """``MOEBITS_PIN_CPU=N``: run the host loop on CPU ``N`` only (an experiment, ``benchmarks/host_modes.sh``: the
    H200 machine's host speed has two modes ~2x apart, docs/FIDELITY.md session 5; does one core keep one mode?)."""
    cpu = os.environ.get("MOEBITS_PIN_CPU")
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu)})


@contextmanager
def no_gc_pauses() -> Iterator[None]:
    """The timed loop without Python's cyclic garbage collector: what exists before it is frozen (never
    scanned again) and collection is off inside it, as latency-critical Python servers do. A full
    collection there scans every object the run set up (trace view, policy state, inputs): measured
    150-185 ms pauses inside single passes on the H200 host before this."""
    gc.collect()
    gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.unfreeze()


def _pass_input(engine: GraphEngine, view: LayerSteps, i: int, n: int) -> PassInput:
    """The pass whose first layer step is ``i``: rows (sequence, position) and routing, on the engine's device
    (``MOEBITS_INPUTS=host``: pinned host memory, uploaded per pass)."""
    batch, pidx, T = int(view.ls_batch[i]), int(view.ls_pass[i]), int(view.ls_tokens[i])
    if pidx == 0:
        seq, pos = torch.zeros(T, dtype=torch.int32), torch.arange(T, dtype=torch.int32)
    else:
        prompt = int(view.ls_tokens[i - int(view.ls_pass[i]) * engine.spec.layers])  # this batch's prefill pass
        seq, pos = torch.arange(T, dtype=torch.int32), torch.full((T,), prompt + pidx - 1, dtype=torch.int32)
    ids, w = pass_routing(view, i, engine.spec.layers, engine.spec.top_k)
    # on the device before the clock starts, as a serving engine's inputs are (sampled tokens, positions and the
    # router's output never leave the GPU): uploaded per pass, these small copies queued on the copy engine
    # behind the expert copies of the boundary before the pass (+33% on those passes, benchmarks/copy_bubble.sh)
    on_device = os.environ.get("MOEBITS_INPUTS", "device") == "device"   # "host": pinned uploads (copy_bubble.sh)
    pin = engine.device.type == "cuda" and not on_device
    t, s, p, i_t, w_t = (x.pin_memory() if pin else x.to(engine.device)
                         for x in (torch.zeros(T, dtype=torch.long), seq, pos, torch.from_numpy(ids), torch.from_numpy(w)))
    return PassInput(batch, pidx, t, s, p, i_t, w_t, flat=flat_routing(ids, engine.spec.experts))


def _fill_tokens(inputs: list[PassInput], vocab: int, seed: int) -> None:
    """Random tokens for every pass, drawn in pass order (one generator)."""
    gen = torch.Generator().manual_seed(seed)
    for p in inputs:
        p.tokens.copy_(torch.randint(0, vocab, (int(p.tokens.shape[0]),), generator=gen))
