"""Importer for ``vllm-logger``: Qwen1.5-MoE per-layer routing logs (weiran0129/vLLM-MoE-Logger).

Each JSONL file is a separate vLLM run that logged ONE MoE layer: a ``{"type": "meta", ...}``
line, then ``{"type": "route", "token_idx", "layer", "topk_ids"[4], "topk_weights"[4]}`` per
row of every forward call. ``token_idx`` is the row inside the call (it restarts at 0 at each
call); requests are not identified. The weights are raw softmax probabilities over all 60
experts (not renormalised; Qwen1.5-MoE has norm_topk_prob=False) and are kept as they are.

How the calls are read (the 25-prompt GSM8K run; every layer file has the same structure):

1. Calls whose rows are all identical are vLLM's dummy runs (memory profiling, 8,192 rows;
   sampler warm-up, 256 rows): dropped.
2. The largest remaining call is the batched prefill (1,406 rows); calls after it are decode
   steps (up to 25 rows, one per running request; the batch shrinks as requests finish).
3. A call before the prefill (65 rows) is NOT a warm-up: its rows are all distinct (real
   tokens), and it is the prefill of request 0 (prompt 1 of the prompt file), which vLLM's
   scheduler started alone; row 0 of the 1,406-row call is then request 0's first decode
   token (running requests are scheduled before waiting ones), and rows 1..1405 are the
   prompts of requests 1..24 in prompt-file order. Evidence: rows 1, 562, 864 and 1327 of that
   call have bit-identical routing at all five logged layers, which only happens for the
   first token of prompts that start with the same token; exactly four prompts start with
   "A" (prompts 2, 11, 16, 24), at estimated offsets 1, 560, 872 and 1332.
   Supported structures: zero or one such early call.

Sequences are the requests (ids in prompt-file order). Prefill: request 0 gets the early call
exactly; the concatenated prompts of the others are split into contiguous chunks sized in
proportion to each prompt's character count (the prompt file, ``*.txt`` with prompts separated
by ``---`` lines, found beside or above the logs). These chunk boundaries are estimates: the six
boundaries that the data pin down (first tokens shared by two or more prompts) are within 8
tokens of the estimate. Without a matching prompt file the split is even.
Decode: per-request identity across decode steps is not recorded (and vLLM compacts its batch
when a request finishes), so row i of every decode step is assigned to sequence i: that is a
batch position, not a request identity. Replay at batch 25 to reproduce the batch-level
demand. Only the logged layers (0, 8, 12, 18, 23 of 24) have rows; the trace's ModelSpec is
the full 24-layer Qwen1.5-MoE-A2.7B preset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from moebits.traces.format import Phase, Trace, TraceError
from moebits.traces.importers._common import RowCollector, first_json_object, json_lines, read_text
from moebits.traces.importers._common import field as get

NAME = "vllm-logger"
MODEL = "Qwen1.5-MoE-A2.7B"
SUFFIXES = (".jsonl",)
_PROMPT_SEP = re.compile(r"\n\s*---\s*\n")


def sniff(path: Path, head: str) -> bool:
    """A .jsonl whose first object is the logger's meta or route record."""
    obj = first_json_object(head)
    if obj is None:
        return False
    return (obj.get("type") == "meta" and "layers_logged" in obj) or (
        obj.get("type") == "route" and "topk_ids" in obj and "token_idx" in obj
    )


@dataclass
class _Call:
    """One forward call of one layer: [n, k] expert ids and weights."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def is_dummy(self) -> bool:
        """All rows identical: a vLLM dummy run on placeholder tokens."""
        return self.rows > 1 and bool(
            (self.ids == self.ids[0]).all() and (self.weights == self.weights[0]).all()
        )


@dataclass
class _LayerLog:
    path: Path
    layer: int
    meta: dict[str, object]
    calls: list[_Call] = field(default_factory=list)
    dummy_rows: list[int] = field(default_factory=list)


def _read_log(path: Path) -> _LayerLog:
    meta: dict[str, object] = {}
    layers: set[int] = set()
    ids: list[list[int]] = []
    weights: list[list[float]] = []
    token_idx: list[int] = []
    for lineno, obj in json_lines(path):
        where = f"{path}:{lineno}"
        if obj.get("type") == "meta":
            meta = obj
            continue
        token_idx.append(int(get(obj, "token_idx", where)))
        layers.add(int(get(obj, "layer", where)))
        ids.append(get(obj, "topk_ids", where))
        weights.append(get(obj, "topk_weights", where))
    if len(layers) != 1:
        raise TraceError(f"{path}: expected the rows of one layer, found layers {sorted(layers) or 'none'}")
    log = _LayerLog(path=path, layer=layers.pop(), meta=meta)
    _split_calls(log, np.asarray(token_idx), ids, weights)
    return log


def _split_calls(log: _LayerLog, token_idx: np.ndarray, ids: list, weights: list) -> None:
    try:
        id_arr = np.asarray(ids, dtype=np.int64)
        w_arr = np.asarray(weights, dtype=np.float32)
    except (ValueError, TypeError):
        raise TraceError(f"{log.path}: 'topk_ids'/'topk_weights' are not equal-length number lists") from None
    if id_arr.ndim != 2 or w_arr.shape != id_arr.shape:
        raise TraceError(
            f"{log.path}: 'topk_ids' {id_arr.shape} and 'topk_weights' {w_arr.shape} do not match"
        )
    starts = np.flatnonzero(token_idx == 0)
    if starts.size == 0 or starts[0] != 0:
        raise TraceError(f"{log.path}: the first route row must have token_idx 0")
    bounds = np.append(starts, token_idx.shape[0])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if not np.array_equal(token_idx[a:b], np.arange(b - a)):
            raise TraceError(f"{log.path}: token_idx jumps inside the forward call starting at route row {a}")
        call = _Call(id_arr[a:b], w_arr[a:b])
        if call.is_dummy():
            log.dummy_rows.append(call.rows)
        else:
            log.calls.append(call)


@dataclass(frozen=True)
class _Structure:
    """Sizes of the real calls: early prefills, the batched prefill, the decode steps."""

    early: tuple[int, ...]
    prefill: int
    decode: tuple[int, ...]

    @property
    def requests(self) -> int:
        return self.decode[0]


def _structure(log: _LayerLog) -> _Structure:
    sizes = [c.rows for c in log.calls]
    if not sizes:
        raise TraceError(f"{log.path}: no forward calls left after dropping dummy runs")
    big = int(np.argmax(sizes))
    st = _Structure(early=tuple(sizes[:big]), prefill=sizes[big], decode=tuple(sizes[big + 1 :]))
    if len(st.early) > 1 or not st.decode or max(st.decode) > st.requests:
        raise TraceError(
            f"{log.path}: unsupported forward-call structure (sizes {sizes[:6]}...): expected at most one "
            "early prefill call, one batched prefill call, then decode steps no larger than the first"
        )
    if st.prefill - len(st.early) < st.requests - len(st.early):
        raise TraceError(f"{log.path}: the prefill call has fewer rows than requests")
    return st


def _find_prompts(root: Path, n: int) -> tuple[list[str] | None, str]:
    """Prompts (``---``-separated .txt) beside or above the logs, if a file has exactly ``n``."""
    base = root if root.is_dir() else root.parent
    for folder in (base, base.parent):
        for path in sorted(folder.glob("*.txt")):
            prompts = [p.strip() for p in _PROMPT_SEP.split(read_text(path)) if p.strip()]
            if len(prompts) == n:
                return prompts, str(path)
    return None, f"no .txt with {n} '---'-separated prompts beside or above {base}"


def _split(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers >= 1 summing to ``total``, proportional to ``weights`` (largest remainder)."""
    raw = weights / weights.sum() * total
    out = np.floor(raw).astype(np.int64)
    out[np.argsort(-(raw - out), kind="stable")[: total - int(out.sum())]] += 1
    if (out < 1).any():
        return _split(total, np.ones_like(weights))
    return out


def _prefill_lengths(st: _Structure, prompts: list[str] | None) -> np.ndarray:
    e, n = len(st.early), st.requests
    rest = np.asarray([len(p) for p in prompts[e:]], dtype=np.float64) if prompts else np.ones(n - e)
    return np.concatenate([np.asarray(st.early, dtype=np.int64), _split(st.prefill - e, rest)])


def _add_layer(rows: RowCollector, log: _LayerLog, st: _Structure, lengths: np.ndarray) -> None:
    """Rows of one layer file, by the structure described in the module docstring."""
    e = len(st.early)
    calls = log.calls
    for seq, call in enumerate(calls[:e]):  # early prefills, one request each
        rows.add(seq, np.arange(call.rows), Phase.PREFILL, log.layer, call.ids, call.weights)
    big = calls[e]
    for seq in range(e):  # their first decode token rides in the batched prefill call
        rows.add(seq, lengths[seq : seq + 1], Phase.DECODE, log.layer, big.ids[seq], big.weights[seq])
    starts = np.concatenate([[e], e + np.cumsum(lengths[e:])])
    for seq in range(e, st.requests):
        a, b = starts[seq - e], starts[seq - e + 1]
        rows.add(seq, np.arange(b - a), Phase.PREFILL, log.layer, big.ids[a:b], big.weights[a:b])
    for j, call in enumerate(calls[e + 1 :]):
        for i in range(call.rows):  # batch position i -> sequence i
            ordinal = j + (1 if i < e else 0)
            rows.add(i, lengths[i : i + 1] + ordinal, Phase.DECODE, log.layer, call.ids[i], call.weights[i])


def _check_same(logs: list[_LayerLog]) -> _Structure:
    st = _structure(logs[0])
    for log in logs[1:]:
        if _structure(log) != st:
            raise TraceError(
                f"{log.path}: forward-call structure differs from {logs[0].path}; separate runs disagree"
            )
    seen: dict[int, Path] = {}
    for log in logs:
        if log.layer in seen:
            raise TraceError(f"layer {log.layer} is logged by both {seen[log.layer]} and {log.path}")
        seen[log.layer] = log.path
    return st


def load(files: list[Path], root: Path) -> Trace:
    """Import one layer log or a folder of them (one file per logged layer)."""
    logs = sorted((_read_log(f) for f in files), key=lambda g: g.layer)
    st = _check_same(logs)
    prompts, prompt_src = _find_prompts(root, st.requests)
    lengths = _prefill_lengths(st, prompts)
    rows = RowCollector(k=4, has_gates=True)
    for log in logs:
        _add_layer(rows, log, st, lengths)
    return rows.to_trace(
        MODEL, _provenance(logs, st, lengths, prompt_src if prompts else None, root), str(root)
    )


def _provenance(
    logs: list[_LayerLog], st: _Structure, lengths: np.ndarray, prompt_file: str | None, root: Path
) -> dict[str, str]:
    e, n = len(st.early), st.requests
    meta = logs[0].meta
    split = (
        f"in proportion to prompt character counts from {prompt_file} (estimated boundaries, a few tokens "
        "off; on the 25-prompt GSM8K logs the 6 boundaries that shared first tokens pin down agree within 8)"
        if prompt_file
        else "evenly (no matching prompt file found)"
    )
    dropped = f"dropped {len(logs[0].dummy_rows)} dummy forward calls of identical rows per layer file " + (
        "(" + " + ".join(f"{r:,}" for r in logs[0].dummy_rows) + " rows)"
    )
    identity = (
        "decode row i of every forward step is assigned to sequence i: batch POSITION, not request identity "
        f"(not recorded; vLLM compacts its batch when a request finishes). Replay with batch={n} to reproduce "
        "the batch-level demand"
    )
    if e:
        dropped += f"; kept the {st.early[0]}-row call before the prefill: it is request 0's real prefill (rows all distinct)"
        identity += (
            "; sequence 0 got its first decode token in the batched prefill call, so it runs one decode step "
            "ahead of the others"
        )
    first = f"request 0's prompt ({st.early[0]} rows) came as its own call; then " if e else ""
    layers = ", ".join(str(g.layer) for g in logs)
    return {
        "model": f"{meta.get('model_id', 'Qwen/Qwen1.5-MoE-A2.7B-Chat')} (vLLM {meta.get('vllm_version', '?')}, eager, greedy)",
        "dataset": f"GSM8K test, {n} prompts submitted together, max_tokens 128",
        "capture_tool": "vLLM MoE routing logger (weiran0129/vLLM-MoE-Logger), one run per logged layer",
        "source": str(root),
        "format": NAME,
        "layers": f"only MoE layers {layers} of 24 have rows (a separate vLLM run each); the ModelSpec is the full {MODEL} preset",
        "sequences": f"{n} requests in prompt-file order; per layer {int(lengths.sum()):,} prefill and {e + sum(st.decode):,} decode rows",
        "decode_identity": identity,
        "prefill_split": f"{first}the {st.prefill - e:,} concatenated prompt rows of the batched prefill are split {split}",
        "gates": "raw softmax probabilities over 60 experts (not renormalised, sum ~0.2-0.36), as recorded",
        "repairs": dropped,
    }
