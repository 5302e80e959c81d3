"""Measured quality of serving decisions on a workload: next-byte KL against bf16, bits per byte.

Dimension legend: S sequences, T bytes per sequence (P prefill + N decode), L MoE layers,
E experts, k experts per token, V weight variants.

A workload (:class:`Workload`) is a trace captured by :mod:`train.workloads` plus its bytes.
Decisions arrive as *served precisions*: for every layer step (sequence, pass, layer) the
precision each routed expert was served in (a plain precision, a channel mix, or ``host``: the
exact bf16 copy), e.g. from the simulator's serve log. :func:`assignment` turns them into a
variant per routed (token, slot); :func:`measure` runs the model teacher-forced over the
workload's bytes with the trace's routing forced (so precision is the only difference from
the reference) and returns the mean KL(bf16 || served) per position and the bits per byte,
over all positions and over the decode positions alone. Pass ``p`` of a sequence is its
prefill (``p = 0``, positions ``< P``) or decode step ``p - 1`` (position ``P + p - 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moebits.runtime.hf import kl_divergence
from moebits.traces.format import Trace
from moebits.train import corpus, serve
from moebits.train.workloads import tokens_of

HOST = "host"
LN2 = float(np.log(2.0))


@dataclass
class Workload:
    """A captured workload: bytes ``[S, T]``, routing per layer (ids, gates ``[S T, k]``), P."""

    name: str
    tokens: torch.Tensor
    routing: list[tuple[torch.Tensor, torch.Tensor]]
    prompt_tokens: int

    @property
    def seqs(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def pass_of(self) -> np.ndarray:
        """Pass index of every position: ``[T]``."""
        t = np.arange(self.length)
        return np.where(t < self.prompt_tokens, 0, t - self.prompt_tokens + 1)


def workload(trace: Trace, data_dir: Path, manifest: Path = corpus.MANIFEST) -> Workload:
    """A :class:`Workload` from a trace of :mod:`train.workloads` and the built corpus."""
    tokens = tokens_of(trace, data_dir, manifest)
    s, t = tokens.shape
    layers, k = trace.meta.spec.layers, trace.meta.spec.top_k
    if trace.gate is None:
        raise ValueError("the workload trace has no gates; capture it with 'moebits train traces'")
    ids = torch.from_numpy(trace.expert.astype(np.int64)).reshape(s, t, layers, k)
    gates = torch.from_numpy(trace.gate.astype(np.float32)).reshape(s, t, layers, k)
    routing = [(ids[:, :, la].reshape(s * t, k), gates[:, :, la].reshape(s * t, k)) for la in range(layers)]
    prov = trace.meta.provenance
    return Workload(f"{prov['split']}_{prov['kind']}", tokens, routing, int(prov["prompt_tokens"]))


def assignment(wl: Workload, served: dict[tuple[int, int, int], dict[int, str]], variants: serve.Variants,
               experts: int) -> list[torch.Tensor]:
    """Per layer, the variant index of every routed (token, slot): ``[S T, k]`` each.

    ``served[(seq, pass, layer)][expert]`` is the precision name (``host`` = bf16)."""
    passes = wl.length - wl.prompt_tokens + 1
    lookup = np.full((wl.seqs, passes, len(wl.routing), experts), -1, dtype=np.int64)
    index = {name: i for i, name in enumerate(variants.names)}
    index[HOST] = 0
    for (s, p, la), by_expert in served.items():
        for e, name in by_expert.items():
            if name not in index:
                raise ValueError(f"served precision {name!r} has no weight variant (have {', '.join(variants.names)})")
            lookup[s, p, la, e] = index[name]
    pos_pass = np.tile(wl.pass_of(), wl.seqs)                                       # [S T]
    seq = np.repeat(np.arange(wl.seqs), wl.length)                                  # [S T]
    out = []
    for la, (ids, _) in enumerate(wl.routing):
        a = lookup[seq[:, None], pos_pass[:, None], la, ids.numpy()]                # [S T, k]
        if (a < 0).any():
            i = int(np.argwhere(a < 0)[0][0])
            raise ValueError(f"no served precision for layer {la}, sequence {seq[i]}, pass {pos_pass[i]}")
        out.append(torch.from_numpy(a))
    return out


@torch.no_grad()
def reference(model: Any, wl: Workload, variants: serve.Variants) -> tuple[serve.Served, torch.Tensor]:
    """Install a forced-routing context on ``model``; returns it and the bf16 logits ``[S, T, V]``."""
    ctx = serve.Served(variants, forced=wl.routing)
    serve.install(model, ctx)
    return ctx, serve.logits(model, wl.tokens, ctx)


@torch.no_grad()
def measure(model: Any, wl: Workload, ctx: serve.Served, ref: torch.Tensor,
            assign: list[torch.Tensor] | None) -> dict[str, float]:
    """KL vs ``ref`` and bits per byte of one assignment (None: bf16 everywhere)."""
    ctx.assign = assign
    try:
        logits = serve.logits(model, wl.tokens, ctx)                                 # [S, T, V]
    finally:
        ctx.assign = None
    kl = kl_divergence(ref[:, :-1], logits[:, :-1])                                  # [S, T - 1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), wl.tokens[:, 1:].reshape(-1),
                         reduction="none").reshape(wl.seqs, -1) / LN2                # [S, T - 1] bits
    dec = slice(wl.prompt_tokens, None)                                              # logits of decode passes
    return {"kl_mean": float(kl.mean()), "kl_decode": float(kl[:, dec].mean()),
            "bpb": float(ce.mean()), "bpb_decode": float(ce[:, dec].mean())}
