"""The replay view: a trace precomputed into layer steps, ready for an event loop.

A *layer step* is one MoE layer of one forward pass of one batch. Sequences are batched in
id order, ``batch`` at a time; the prefill tokens of a batch form one pass (pass 0) and decode
step d of every sequence in the batch forms pass d+1, so sequences decoded together share a
step and a layer needs the union of their experts. For each layer step the view holds (CSR):
the distinct experts needed, the tokens routed to each, and their summed gate weight.

Everything is computed with numpy before any event loop runs, and cached as ``.npy`` files
that load memory-mapped, under :func:`cache_root` ``/replay`` (``$MOEBITS_CACHE``, else
``~/.cache/moebits``), keyed by the trace file's path, size and mtime and the batch size
(about 11 MB per real trace and batch size). A changed trace gets a new entry; the old one
stays until ``moebits traces cache --prune`` (entries whose trace is gone or changed, or
unused for N days) or ``--clear`` removes it (:mod:`traces.cli_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from moebits.core.routing import LayerSteps
from moebits.traces.format import Phase, Trace, TraceMeta, read_trace

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


def _is_sorted(a: np.ndarray) -> bool:
    return bool((a[1:] >= a[:-1]).all())


def _run_starts(a: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values begins in ``a`` (sorted or grouped)."""
    if a.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], a[1:] != a[:-1]]))


def _seq_rank(seq: np.ndarray) -> np.ndarray:
    """Per row: rank of its sequence id among the distinct ids (0, 1, ...)."""
    if not _is_sorted(seq):  # traces are sorted by seq; stay correct for any array
        return np.unique(seq, return_inverse=True)[1].astype(np.int64)
    rank = np.zeros(seq.shape[0], dtype=np.int64)
    if seq.shape[0]:
        np.cumsum(seq[1:] != seq[:-1], out=rank[1:])
    return rank


def _pass_index(t: Trace) -> np.ndarray:
    """Per row: 0 for prefill rows, 1 + (step - first decode step of its sequence) for decode."""
    out = np.zeros(t.rows, dtype=np.int64)
    dec = np.flatnonzero(t.phase == Phase.DECODE)
    if not dec.size:
        return out
    dec_seq, dec_step = t.seq[dec], t.step[dec].astype(np.int64)
    if _is_sorted(dec_seq):
        starts = _run_starts(dec_seq)
        sizes = np.diff(np.append(starts, dec.size))
        out[dec] = 1 + dec_step - np.repeat(dec_step[starts], sizes)
    else:
        seqs, first = np.unique(dec_seq, return_index=True)
        which = np.searchsorted(seqs, dec_seq)
        out[dec] = 1 + dec_step - dec_step[first][which]
    return out


_GATE_BITS = 16  # a float16 gate rides in the low bits of the sort key


def _entries(t: Trace, row_key: np.ndarray, expert_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ``row_key << expert_bits | expert`` ascending, with token counts and gate sums.

    One in-place ``np.sort`` of packed int64 keys (the float16 gate bits below the key)
    replaces an indirect sort: same result, several times faster. Sums of float16 gates in
    float64 are exact (below 2**29), so the summation order does not change the result.
    """
    n, gate = t.rows * t.k, t.gate
    top = int(row_key.max(initial=0)) + 1
    pack_gates = gate is not None and top < 2 ** (62 - expert_bits - _GATE_BITS)
    low = _GATE_BITS if pack_gates else 0
    keys = t.expert.astype(np.int64)  # [N, k], becomes the packed keys in place
    keys <<= low
    if gate is not None and pack_gates:
        keys |= gate.view(np.uint16)
    keys |= (row_key << (expert_bits + low))[:, None]
    keys = keys.reshape(n)
    gates: np.ndarray | None = None
    if gate is not None and not pack_gates:  # keys too large to pack: an indirect sort
        order = np.argsort(keys, kind="stable")
        keys, gates = keys[order], gate.reshape(n)[order]
    else:
        keys.sort()
    if pack_gates:
        gates = keys.astype(np.uint16).view(np.float16)  # the low 16 bits
        keys >>= _GATE_BITS
    new_run = np.empty(n, dtype=bool)
    new_run[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    counts = np.diff(starts, append=n)
    gate_sum: np.ndarray
    if gates is None:
        gate_sum = counts * float(np.float32(1.0 / t.k))
    else:  # bincount adds in float64, in order; cheaper than reduceat over tiny runs
        gate_sum = np.bincount(np.cumsum(new_run) - 1, weights=gates, minlength=starts.size)
    return keys[starts], counts, gate_sum.astype(np.float32)


def build_view(t: Trace, batch: int = 1) -> ReplayView:
    """Precompute the layer steps of ``t`` at batch size ``batch``."""
    if batch < 1:
        raise ValueError(f'"batch" must be >= 1, got {batch}.')
    spec = t.spec
    L, E = spec.layers, spec.experts
    expert_bits = max(1, (E - 1).bit_length())
    batch_id = _seq_rank(t.seq) // batch
    pass_idx = _pass_index(t)
    passes = int(pass_idx.max()) + 1 if t.rows else 1
    row_key = (batch_id * passes + pass_idx) * L + t.layer.astype(np.int64)  # layer-step key
    uk, counts, gate_sum = _entries(t, row_key, expert_bits)
    ls_of_entry = uk >> expert_bits
    first_entry = _run_starts(ls_of_entry)
    ls_keys = ls_of_entry[first_entry]
    # every row adds k (row, slot) pairs to its layer step's entries
    pairs = np.concatenate([[0], np.cumsum(counts)])
    tokens = np.diff(pairs[np.append(first_entry, uk.shape[0])]) // t.k
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
        ex_expert=(uk & ((1 << expert_bits) - 1)).astype(np.int16),
        ex_tokens=counts.astype(np.int32),
        ex_gate=gate_sum,
    )


def cache_root() -> Path:
    """Where moebits caches derived data: ``$MOEBITS_CACHE``, else ``~/.cache/moebits``."""
    return Path(os.environ.get("MOEBITS_CACHE", Path.home() / ".cache" / "moebits")).expanduser()


def _source_ident(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_dir(path: Path, batch: int) -> Path:
    src = _source_ident(path)
    ident = f"{src['path']}|{src['size']}|{src['mtime_ns']}|B{batch}|v1"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return cache_root() / "replay" / f"{path.stem}-{digest}"


def _save(view: ReplayView, where: Path, source: dict[str, object] | None = None) -> None:
    if view.meta is None:
        raise ValueError("a replay view without trace metadata cannot be cached")
    tmp = where.with_name(where.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(view, name))
    head = {"batch": view.batch, "has_gates": view.has_gates, "source": source}
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
        os.utime(where / "view.json")  # last use, for `moebits traces cache --prune --unused-days N`
        return _load(where)
    view = build_view(read_trace(path), batch)
    if where is not None:
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            _save(view, where, _source_ident(path))
        except OSError:
            return view  # an unwritable cache only costs speed
    return view


PROFILE_KEY = "calibration_profile"  # provenance key: a profiling trace beside this one


def calibration_profile(view: ReplayView, trace_path: str | os.PathLike[str]) -> Path | None:
    """The CALIBRATION profile a trace names for offline policies (provenance
    ``calibration_profile``: a file in the trace's folder), or None where it names none or the
    file is missing. Engines take it as the default profile, so that a policy never learns from
    the replay it is graded on."""
    name = view.meta.provenance.get(PROFILE_KEY) if view.meta is not None else None
    if not name:
        return None
    path = Path(trace_path).parent / name
    return path if path.is_file() else None

