"""The replay view: a trace precomputed into layer steps, ready for an event loop.

A *layer step* is one MoE layer of one forward pass of one batch. Sequences are batched in
id order, ``batch`` at a time; the prefill tokens of a batch form one pass (pass 0) and decode
step d of every sequence in the batch forms pass d+1, so sequences decoded together share a
step and a layer needs the union of their experts. For each layer step the view holds (CSR):
the distinct experts needed, the tokens routed to each, and their summed gate weight.

Everything is computed with numpy before any event loop runs, and cached as ``.npy`` files
that load memory-mapped (``$MOEBITS_CACHE`` or ``~/.cache/moebits``), keyed by the trace
file's path, size and mtime and the batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.routing import LayerSteps
from traces.format import Phase, Trace, TraceMeta, read_trace

_ARRAYS = ("ls_layer", "ls_batch", "ls_pass", "ls_tokens", "offsets", "ex_expert", "ex_tokens", "ex_gate")


@dataclass
class ReplayView(LayerSteps):
    """Layer steps of a trace (see :class:`core.routing.LayerSteps` for the arrays), plus
    what they came from: the trace metadata, the batch size, and whether gates were recorded
    (where not, ``ex_gate`` is tokens / k)."""

    meta: TraceMeta | None = None
    batch: int = 1
    has_gates: bool = False

    def phase(self, i: int) -> Phase:
        return Phase.PREFILL if self.ls_pass[i] == 0 else Phase.DECODE


def _pass_index(t: Trace) -> np.ndarray:
    """Per row: 0 for prefill rows, 1 + (step - first decode step of its sequence) for decode."""
    out = np.zeros(t.rows, dtype=np.int64)
    dec = np.flatnonzero(t.phase == Phase.DECODE)
    if dec.size:
        seqs, first = np.unique(t.seq[dec], return_index=True)
        first_step = t.step[dec][first].astype(np.int64)
        which = np.searchsorted(seqs, t.seq[dec])
        out[dec] = 1 + t.step[dec].astype(np.int64) - first_step[which]
    return out


def build_view(t: Trace, batch: int = 1) -> ReplayView:
    """Precompute the layer steps of ``t`` at batch size ``batch``."""
    if batch < 1:
        raise ValueError(f'"batch" must be >= 1, got {batch}.')
    spec = t.spec
    L, E, k = spec.layers, spec.experts, t.k
    _, seq_rank = np.unique(t.seq, return_inverse=True)
    batch_id = seq_rank.astype(np.int64) // batch
    pass_idx = _pass_index(t)
    passes = int(pass_idx.max()) + 1 if t.rows else 1
    row_key = (batch_id * passes + pass_idx) * L + t.layer.astype(np.int64)  # layer-step key
    ek = (row_key[:, None] * E + t.expert.astype(np.int64)).ravel()
    uk, inverse, counts = np.unique(ek, return_inverse=True, return_counts=True)
    gates = (
        t.gate.astype(np.float32).ravel()
        if t.gate is not None
        else np.full(ek.shape[0], 1.0 / k, dtype=np.float32)
    )
    gate_sum = np.bincount(inverse.ravel(), weights=gates, minlength=uk.shape[0]).astype(np.float32)
    ls_of_entry = uk // E
    ls_keys, first_entry = np.unique(ls_of_entry, return_index=True)
    row_keys, row_counts = np.unique(row_key, return_counts=True)
    tokens = row_counts[np.searchsorted(row_keys, ls_keys)]
    bp, layer = np.divmod(ls_keys, L)
    b, p = np.divmod(bp, passes)
    return ReplayView(
        meta=t.meta,
        batch=batch,
        has_gates=t.gate is not None,
        ls_layer=layer.astype(np.uint16),
        ls_batch=b.astype(np.int32),
        ls_pass=p.astype(np.int32),
        ls_tokens=tokens.astype(np.int32),
        offsets=np.append(first_entry, uk.shape[0]).astype(np.int64),
        ex_expert=(uk % E).astype(np.int16),
        ex_tokens=counts.astype(np.int32),
        ex_gate=gate_sum,
    )


def _cache_dir(path: Path, batch: int) -> Path:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|B{batch}|v1"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    root = Path(os.environ.get("MOEBITS_CACHE", Path.home() / ".cache" / "moebits"))
    return root / "replay" / f"{path.stem}-{digest}"


def _save(view: ReplayView, where: Path) -> None:
    tmp = where.with_name(where.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(view, name))
    head = {"batch": view.batch, "has_gates": view.has_gates}
    (tmp / "meta.json").write_bytes(view.meta.to_json())
    (tmp / "view.json").write_text(json.dumps(head))
    os.replace(tmp, where)


def _load(where: Path) -> ReplayView:
    head = json.loads((where / "view.json").read_text())
    meta = TraceMeta.from_json((where / "meta.json").read_bytes(), str(where))
    arrays = {name: np.load(where / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    return ReplayView(meta=meta, batch=head["batch"], has_gates=head["has_gates"], **arrays)


def load_view(path: str | os.PathLike[str], batch: int = 1, cache: bool = True) -> ReplayView:
    """Replay view of a trace file, from the memory-mapped cache when it is fresh."""
    path = Path(path)
    if not cache:
        return build_view(read_trace(path), batch)
    where = _cache_dir(path, batch) if path.exists() else None
    if where is not None and (where / "view.json").exists():
        return _load(where)
    view = build_view(read_trace(path), batch)
    if where is not None:
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            _save(view, where)
        except OSError:
            return view  # an unwritable cache only costs speed
    return view
