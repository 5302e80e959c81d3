"""Importer for ``mixtral-jsonl``: the vLLM-profiler JSON lines of Mixtral-8x7B (speculative-moe).

One object per (problem, layer, token): ``dataset, problem_id, layer, experts[2],
gating_probs[2]`` plus either

- ``token_idx`` (``*_routing.jsonl``, decode only): the generated token's index, renumbered per
  layer after the collector dropped rows whose weights were exactly [0.5, 0.5]. Layers of one
  sequence therefore hold slightly different token counts and cross-layer alignment can drift
  by 1-2 tokens near the end. Each sequence is truncated to the smallest count over its layers;
  the dropped rows are counted in provenance ``repairs``.
- ``token_pos`` (``routing_raw.jsonl``, prefill + decode): the row inside the forward batch, in
  forward order. The prefill pass is one multi-row call per layer (token_pos = prompt position),
  then one single-row call per layer per decode step, layers ascending. Steps are therefore
  exact: prefill step = token_pos, decode step = prompt length + pass index. Rows the collector
  dropped are simply absent (counted in ``repairs``).

Sequences are (dataset, problem_id). If one appears in several files (``routing_raw.jsonl``
re-records HumanEval problem 0 of ``humaneval_2_routing.jsonl``: same greedy generation), the
recording with prefill is kept and the other dropped, so nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from moebits.traces.format import Phase, Trace, TraceError
from moebits.traces.importers._common import RowCollector, first_json_object, json_lines
from moebits.traces.importers._common import field as get

NAME = "mixtral-jsonl"
MODEL = "Mixtral-8x7B"
LAYERS = 32
SUFFIXES = (".jsonl",)
_KEYS = {"dataset", "problem_id", "layer", "experts", "gating_probs"}


def sniff(path: Path, head: str) -> bool:
    """A .jsonl whose first object has the profiler's fields."""
    obj = first_json_object(head)
    return obj is not None and _KEYS <= obj.keys() and ("token_idx" in obj or "token_pos" in obj)


@dataclass
class _Seq:
    """Rows of one (dataset, problem_id) from one file, in file order."""

    file: Path
    raw: bool  # token_pos (prefill + decode, forward order) vs token_idx (decode only)
    layer: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    expert: list[list[int]] = field(default_factory=list)
    gate: list[list[float]] = field(default_factory=list)


def _read_file(path: Path) -> dict[tuple[str, int], _Seq]:
    out: dict[tuple[str, int], _Seq] = {}
    raw: bool | None = None
    for lineno, obj in json_lines(path):
        where = f"{path}:{lineno}"
        is_raw = "token_pos" in obj
        if raw is None:
            raw = is_raw
        if is_raw != raw or not (is_raw or "token_idx" in obj):
            raise TraceError(f"{where}: mixes 'token_pos' and 'token_idx' rows (or has neither)")
        key = (str(get(obj, "dataset", where)), int(get(obj, "problem_id", where)))
        s = out.setdefault(key, _Seq(file=path, raw=raw))
        s.layer.append(int(get(obj, "layer", where)))
        s.pos.append(int(get(obj, "token_pos" if raw else "token_idx", where)))
        s.expert.append(get(obj, "experts", where))
        s.gate.append(get(obj, "gating_probs", where))
    return out


def _arrays(s: _Seq, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        expert = np.asarray(s.expert, dtype=np.int64)
        gate = np.asarray(s.gate, dtype=np.float32)
    except (ValueError, TypeError):
        raise TraceError(f"{where}: 'experts'/'gating_probs' are not equal-length number lists") from None
    if expert.ndim != 2 or gate.shape != expert.shape:
        raise TraceError(f"{where}: 'experts' {expert.shape} and 'gating_probs' {gate.shape} do not match")
    return np.asarray(s.layer), np.asarray(s.pos), expert, gate


def _add_decode_only(rows: RowCollector, seq: int, s: _Seq, layers: int, where: str) -> str:
    """Truncate to the smallest per-layer token count; return the repair note."""
    layer, idx, expert, gate = _arrays(s, where)
    counts = np.bincount(layer, minlength=layers)
    if (counts == 0).any():
        raise TraceError(f"{where}: no rows for layer(s) {np.flatnonzero(counts == 0).tolist()}")
    n = int(counts.min())
    kept = 0
    for lay in range(layers):
        rows_l = np.flatnonzero(layer == lay)
        rows_l = rows_l[np.argsort(idx[rows_l], kind="stable")]
        if np.unique(idx[rows_l]).shape[0] != rows_l.shape[0]:
            raise TraceError(f"{where}: layer {lay} repeats a token_idx")
        keep = rows_l[:n]
        rows.add(seq, np.arange(n), Phase.DECODE, lay, expert[keep], gate[keep])
        kept += keep.shape[0]
    dropped = layer.shape[0] - kept
    return f"truncated to {n} decode tokens (min over layers; counts {counts.min()}-{counts.max()}), dropped {dropped} rows"


def _passes(layer: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Forward-pass index per row of a raw file: a call is a run of one layer with rising
    token_pos; a new pass starts when a call's layer is not above the previous call's."""
    new_call = np.ones(layer.shape[0], dtype=bool)
    new_call[1:] = (layer[1:] != layer[:-1]) | (pos[1:] <= pos[:-1])
    call_starts = np.flatnonzero(new_call)
    call_layer = layer[call_starts]
    new_pass = np.ones(call_starts.shape[0], dtype=bool)
    new_pass[1:] = call_layer[1:] <= call_layer[:-1]
    pass_of_call = np.cumsum(new_pass) - 1
    return pass_of_call[np.cumsum(new_call) - 1]


def _add_raw(rows: RowCollector, seq: int, s: _Seq, layers: int, where: str) -> str:
    """Exact steps from forward order; absent rows stay absent. Return the repair note."""
    layer, pos, expert, gate = _arrays(s, where)
    pass_idx = _passes(layer, pos)
    has_prefill = bool((pos[pass_idx == 0] > 0).any())  # pass 0 is multi-token
    prefill = (pass_idx == 0) & has_prefill
    if (pos[~prefill] != 0).any():
        raise TraceError(
            f"{where}: a multi-token forward pass after the prefill; expected one decode token per pass"
        )
    prompt_len = int(pos[prefill].max()) + 1 if has_prefill else 0
    first_decode_pass = int(has_prefill)
    step = np.where(prefill, pos, prompt_len + pass_idx - first_decode_pass)
    for phase, mask in ((Phase.PREFILL, prefill), (Phase.DECODE, ~prefill)):
        rows.add(seq, step[mask], phase, layer[mask], expert[mask], gate[mask])
    decode_steps = int(pass_idx.max()) + 1 - first_decode_pass
    missing_pre = prompt_len * layers - int(prefill.sum())
    missing_dec = decode_steps * layers - int((~prefill).sum())
    return (
        f"{prompt_len} prefill + {decode_steps} decode tokens aligned from token_pos and forward order; "
        f"{missing_pre} prefill and {missing_dec} decode (step, layer) rows absent in the source, left absent"
    )


def _merge(files: list[Path]) -> tuple[dict[tuple[str, int], _Seq], list[str]]:
    """All sequences of all files; on a duplicate key keep the recording with prefill."""
    seqs: dict[tuple[str, int], _Seq] = {}
    notes: list[str] = []
    for path in files:
        for key, s in _read_file(path).items():
            old = seqs.get(key)
            if old is None:
                seqs[key] = s
                continue
            if old.raw == s.raw:
                raise TraceError(f"sequence {key[0]}/{key[1]} appears in both {old.file} and {s.file}")
            keep, drop = (s, old) if s.raw else (old, s)
            seqs[key] = keep
            notes.append(
                f"{key[0]}/{key[1]}: kept {keep.file.name} (has prefill), dropped the decode-only "
                f"duplicate in {drop.file.name} ({len(drop.layer)} rows, same generation)"
            )
    return seqs, notes


def load(files: list[Path], root: Path) -> Trace:
    """Import Mixtral profiler files (one file or a folder's) as one trace."""
    seqs, repairs = _merge(files)
    rows = RowCollector(k=2, has_gates=True)
    names = []
    for seq, key in enumerate(sorted(seqs)):
        s = seqs[key]
        where = f"{s.file} ({key[0]}/{key[1]})"
        add = _add_raw if s.raw else _add_decode_only
        repairs.append(f"{key[0]}/{key[1]}: " + add(rows, seq, s, LAYERS, where))
        names.append(f"{seq}={key[0]}/{key[1]} ({s.file.name})")
    provenance = {
        "model": "mistralai/Mixtral-8x7B-Instruct-v0.1 (FP8 experts, vLLM; router in bf16)",
        "dataset": ", ".join(sorted({k[0] for k in seqs})) + " (batch 1, greedy, max_tokens 256)",
        "capture_tool": "vLLM FusedMoE.select_experts hook (Mario928/speculative-moe)",
        "source": str(root),
        "format": NAME,
        "sequences": "; ".join(names),
        "gates": "top-2 softmax weights renormalised to sum 1, as recorded",
        "repairs": "; ".join(repairs)
        + "; the collector drops rows whose weights are exactly [0.5, 0.5] (padding filter), so a few real tokens are missing",
    }
    return rows.to_trace(MODEL, provenance, str(root))
