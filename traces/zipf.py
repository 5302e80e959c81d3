"""A small synthetic routing generator for ``workload=synth``, tests and benchmarks.

Not the fitted generator of ``moebits traces synth``: a two-knob model that is enough to
exercise an engine. Every layer has its own random popularity order with Zipf weights
``(rank + 1) ** -skew``; each token draws its top-k without replacement by Gumbel-top-k on
the log weights, except that each expert of the same sequence's previous token (same layer)
is kept with probability ``reuse``. Gates are a softmax over random logits of the chosen k.
"""

from __future__ import annotations

import numpy as np
from moebits.core.model_spec import ModelSpec
from moebits.traces.format import Phase, Trace, TraceMeta


def synth_trace(spec: ModelSpec, rng: np.random.Generator, *, seqs: int = 4, prompt_tokens: int = 16,
                decode_tokens: int = 32, skew: float = 1.0, reuse: float = 0.3) -> Trace:
    """A valid trace of ``seqs`` sequences of ``prompt_tokens`` + ``decode_tokens`` tokens."""
    if seqs < 1 or prompt_tokens < 1 or decode_tokens < 0:
        raise ValueError(f"synth needs seqs >= 1, prompt_tokens >= 1, decode_tokens >= 0; got {seqs}, "
                         f"{prompt_tokens}, {decode_tokens}")
    if skew < 0 or not 0 <= reuse <= 1:
        raise ValueError(f'"skew" must be >= 0 and "reuse" in [0, 1]; got {skew}, {reuse}')
    L, E, k = spec.layers, spec.experts, spec.top_k
    T = prompt_tokens + decode_tokens
    ranks = np.argsort(rng.random((L, E)), axis=1)  # [L, E] popularity rank of each expert
    logw = -skew * np.log1p(ranks)  # [L, E]
    experts = np.empty((seqs, T, L, k), dtype=np.int16)
    prev = None
    for s in range(T):
        score = logw[None] + rng.gumbel(size=(seqs, L, E))  # [seqs, L, E]
        if prev is not None and reuse > 0:
            keep = rng.random(prev.shape) < reuse  # [seqs, L, k]
            bonus = np.zeros_like(score)
            np.put_along_axis(bonus, prev.astype(np.int64), np.where(keep, 1e9, 0.0), axis=2)
            score += bonus
        top = np.argpartition(-score, k - 1, axis=2)[:, :, :k]
        experts[:, s] = top
        prev = top
    logits = rng.normal(size=(seqs, T, L, k))
    gate = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    seq_ids, steps, layers = np.meshgrid(np.arange(seqs), np.arange(T), np.arange(L), indexing="ij")
    phase = np.where(steps < prompt_tokens, Phase.PREFILL, Phase.DECODE)
    meta = TraceMeta(spec, {"source": "sim.synth", "skew": str(skew), "reuse": str(reuse)})
    return Trace(
        meta=meta,
        seq=seq_ids.ravel().astype(np.int32),
        step=steps.ravel().astype(np.int32),
        phase=phase.ravel().astype(np.uint8),
        layer=layers.ravel().astype(np.uint16),
        expert=experts.reshape(-1, k),
        gate=gate.reshape(-1, k).astype(np.float16),
    )
