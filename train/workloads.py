"""Workloads from the trained model: routing traces captured on corpus text, with their tokens.

A workload is ``seqs`` non-overlapping windows of ``prompt_tokens + decode_tokens`` bytes of one
split and kind (e.g. EVALUATION code), picked at seeded random offsets in text order. Its trace
holds the routing of the bf16 model on those bytes, one full forward per batch with the
routers hooked (:class:`traces.capture.RoutingRecorder`): the first ``prompt_tokens`` steps of
each sequence are prefill, the rest decode. Decode here is teacher-forced: each decode step
reads the text's next byte, not a generated one, so that bits per byte and KL can be measured
on the same positions later. In a causal model a decode step with a KV cache computes what the
full forward computes at that position, so the routing is the decode routing (up to float
rounding). The window offsets go into the trace's provenance; :func:`tokens_of` recovers the
exact bytes from the corpus. An EVALUATION trace names its CALIBRATION twin (provenance
``calibration_profile``), which the simulator and the runtime then take as the default profile
of offline policies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moebits.traces.capture import RoutingRecorder, find_routers, model_spec, routing_to_trace
from moebits.traces.format import Trace
from moebits.traces.replay import PROFILE_KEY
from moebits.train import corpus


@dataclass(frozen=True)
class WorkloadRequest:
    """One workload (see the module docstring)."""

    split: str          # calibration | evaluation
    kind: str           # code | prose
    seqs: int = 8
    prompt_tokens: int = 128
    decode_tokens: int = 64
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.split}_{self.kind}"

    @property
    def length(self) -> int:
        return self.prompt_tokens + self.decode_tokens


def offsets(data_len: int, req: WorkloadRequest) -> np.ndarray:
    """Start offsets of the request's windows: distinct, non-overlapping, ascending."""
    slots = data_len // req.length
    if slots < req.seqs:
        raise ValueError(f"{req.name} has {data_len} bytes: {slots} windows of {req.length}, fewer than {req.seqs}")
    pick = np.sort(np.random.default_rng(req.seed).choice(slots, size=req.seqs, replace=False))
    return pick * req.length


def windows_at(data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """``[S, length]`` int64 tokens at ``starts``."""
    return torch.from_numpy(np.stack([data[s : s + length] for s in starts]).astype(np.int64))


@torch.no_grad()
def capture(model: Any, data: np.ndarray, req: WorkloadRequest, name: str = "moebits-default") -> Trace:
    """The request's trace from ``model`` on ``data`` (the split's bytes)."""
    starts = offsets(len(data), req)
    tokens = windows_at(data, starts, req.length)                            # [S, P + N]
    spec = model_spec(model, name)
    sites = find_routers(model)
    with RoutingRecorder(sites, spec.top_k) as rec:
        rec.start_pass(tokens.numel())
        model(input_ids=tokens, use_cache=False)
        ids, gates = rec.end_pass()                                           # [S (P + N), L, k]
    s, t = tokens.shape
    provenance = {
        "model": name, "dataset": f"moebits stdlib corpus, split {req.name}", "capture_tool": "moebits train traces",
        "tokenizer": "bytes (vocab 256)", "seed": str(req.seed),
        "prompts": f"{s} windows of {t} bytes: {req.prompt_tokens} prefill + {req.decode_tokens} teacher-forced decode",
        "gates": "top-k weights the experts were given (normalized)",
        "window_offsets": json.dumps(starts.tolist()), "split": req.split, "kind": req.kind,
        "prompt_tokens": str(req.prompt_tokens), "decode_tokens": str(req.decode_tokens),
    }
    if req.split == "evaluation":  # offline policies learn from this, never from the replay graded
        provenance[PROFILE_KEY] = f"calibration_{req.kind}.parquet"
    return routing_to_trace(ids.reshape(s, t, *ids.shape[1:]), gates.reshape(s, t, *gates.shape[1:]),
                            req.prompt_tokens, spec, provenance)


def tokens_of(trace: Trace, data_dir: Path, manifest: Path = corpus.MANIFEST) -> torch.Tensor:
    """The ``[S, P + N]`` bytes a workload trace was captured on (from its provenance)."""
    prov = trace.meta.provenance
    try:
        starts = np.asarray(json.loads(prov["window_offsets"]), dtype=np.int64)
        name = f"{prov['split']}_{prov['kind']}"
        length = int(prov["prompt_tokens"]) + int(prov["decode_tokens"])
    except KeyError as exc:
        raise ValueError(f"the trace was not captured by 'moebits train traces' (no {exc} in its provenance)") from None
    return windows_at(corpus.load(data_dir, name, manifest), starts, length)
