"""The moebits trace format: Parquet (zstd), one row per (sequence, step, layer).

Columns::

    seq    int32                      sequence id
    step   int32                      token position within the sequence (prefill tokens first)
    phase  uint8                      0 = prefill, 1 = decode (see :class:`Phase`)
    layer  uint16                     MoE-layer index, 0..spec.layers-1
    expert FixedSizeList<int16>[k]    routed expert ids, k = spec.top_k
    gate   FixedSizeList<float16>[k]  their gate weights; the whole column may be null

Rows are sorted by (seq, step, layer), each triple at most once. The Parquet schema metadata
key ``moebits`` holds JSON: ``{"format_version": 1, "model_spec": {...}, "provenance": {...}}``.
Readers validate everything and raise :class:`TraceError` with one message naming the file and
the problem; writers validate first and write atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from moebits.core.model_spec import ModelSpec

FORMAT_VERSION = 1
METADATA_KEY = b"moebits"
COLUMNS = ("seq", "step", "phase", "layer", "expert", "gate")


class TraceError(ValueError):
    """A trace file or trace data is malformed; the message says what and where."""


class Phase(IntEnum):
    """Which pass a routing record came from."""

    PREFILL = 0
    DECODE = 1


@dataclass(frozen=True)
class TraceMeta:
    """What a trace is of: the model's shape and where the routing came from.

    ``provenance`` is free-form strings: model, dataset, capture tool, source, and notes on
    anything the importer dropped or repaired.
    """

    spec: ModelSpec
    provenance: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {
            "format_version": FORMAT_VERSION,
            "model_spec": self.spec.to_dict(),
            "provenance": self.provenance,
        }
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> TraceMeta:
        try:
            body = json.loads(raw)
            version = body["format_version"]
            if version != FORMAT_VERSION:
                raise TraceError(f"{where}: trace format version {version}, expected {FORMAT_VERSION}")
            spec = ModelSpec.from_dict(body["model_spec"])
            provenance = {str(k): str(v) for k, v in body.get("provenance", {}).items()}
        except TraceError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise TraceError(f"{where}: bad moebits metadata ({exc})") from None
        return cls(spec=spec, provenance=provenance)


@dataclass
class Trace:
    """A routing trace in memory: parallel numpy arrays, N rows, k experts per row."""

    meta: TraceMeta
    seq: np.ndarray  # [N] int32
    step: np.ndarray  # [N] int32
    phase: np.ndarray  # [N] uint8
    layer: np.ndarray  # [N] uint16
    expert: np.ndarray  # [N, k] int16
    gate: np.ndarray | None  # [N, k] float16, or None where the source has no gates

    @property
    def spec(self) -> ModelSpec:
        return self.meta.spec

    @property
    def rows(self) -> int:
        return int(self.seq.shape[0])

    @property
    def k(self) -> int:
        return int(self.expert.shape[1])

    @property
    def num_seqs(self) -> int:
        return int(np.unique(self.seq).shape[0])

    def tokens(self, phase: Phase | None = None) -> int:
        """Number of (seq, step) tokens, optionally of one phase only."""
        first = np.ones(self.rows, dtype=bool)
        if self.rows:
            first[1:] = (self.seq[1:] != self.seq[:-1]) | (self.step[1:] != self.step[:-1])
        if phase is not None:
            first &= self.phase == phase
        return int(first.sum())

    def validate(self, where: str = "trace") -> None:
        """Raise :class:`TraceError` on the first problem found; see the module docstring."""
        validate_arrays(self, where)


def validate_arrays(t: Trace, where: str) -> None:
    """Check shapes, ranges, gates and ordering of a trace's arrays."""
    n, spec = t.rows, t.spec
    for name in ("step", "phase", "layer"):
        if getattr(t, name).shape != (n,):
            raise TraceError(f"{where}: column {name!r} has shape {getattr(t, name).shape}, expected ({n},)")
    if t.expert.ndim != 2 or t.expert.shape[0] != n:
        raise TraceError(f"{where}: column 'expert' has shape {t.expert.shape}, expected ({n}, k)")
    if t.k != spec.top_k:
        raise TraceError(f"{where}: rows carry k={t.k} experts but {spec.name} routes top-{spec.top_k}")
    _check_ranges(t, where)
    if t.gate is not None:
        _check_gates(t, where)
    _check_order(t, where)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0])


def _check_ranges(t: Trace, where: str) -> None:
    spec = t.spec
    bad = (t.expert < 0) | (t.expert >= spec.experts)
    if bad.any():
        i = _first_bad(bad)
        raise TraceError(
            f"{where}: row {i} has expert id(s) {t.expert[i].tolist()} outside 0..{spec.experts - 1} "
            f"({spec.name} has {spec.experts} experts per layer)"
        )
    bad = t.layer >= spec.layers
    if bad.any():
        i = _first_bad(bad)
        raise TraceError(f"{where}: row {i} has layer {t.layer[i]} but {spec.name} has {spec.layers} MoE layers")
    bad = t.phase > Phase.DECODE
    if bad.any():
        i = _first_bad(bad)
        raise TraceError(f"{where}: row {i} has phase {t.phase[i]}; phase must be 0 (prefill) or 1 (decode)")
    if (t.seq < 0).any() or (t.step < 0).any():
        raise TraceError(f"{where}: negative seq or step ids")
    if t.k > 1:
        s = np.sort(t.expert, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if dup.any():
            i = _first_bad(dup)
            raise TraceError(f"{where}: row {i} routes the same expert twice: {t.expert[i].tolist()}")


def _check_gates(t: Trace, where: str) -> None:
    if t.gate is None:
        return
    if t.gate.shape != t.expert.shape:
        raise TraceError(f"{where}: 'gate' has shape {t.gate.shape} but 'expert' has {t.expert.shape}")
    bad = ~np.isfinite(t.gate)
    if bad.any():
        raise TraceError(f"{where}: row {_first_bad(bad)} has a NaN or infinite gate weight")
    bad = t.gate < 0
    if bad.any():
        i = _first_bad(bad)
        raise TraceError(f"{where}: row {i} has a negative gate weight {t.gate[i].tolist()}")


def _check_order(t: Trace, where: str) -> None:
    if t.rows < 2:
        return
    seq, step, layer = (a.astype(np.int64) for a in (t.seq, t.step, t.layer))
    key = np.stack([seq, step, layer], axis=1)
    diff = key[1:] - key[:-1]
    # lexicographic (seq, step, layer) strictly increasing
    first_nonzero = np.argmax(diff != 0, axis=1)
    lead = diff[np.arange(diff.shape[0]), first_nonzero]
    bad = lead <= 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0]) + 1
        raise TraceError(
            f"{where}: rows out of order at row {i}: (seq, step, layer) = {tuple(key[i].tolist())} "
            f"after {tuple(key[i - 1].tolist())}; rows must be sorted by (seq, step, layer) without repeats"
        )
    same_seq = t.seq[1:] == t.seq[:-1]
    back = same_seq & (t.phase[1:] < t.phase[:-1])
    if back.any():
        i = int(np.flatnonzero(back)[0]) + 1
        raise TraceError(f"{where}: row {i} is prefill after decode in sequence {t.seq[i]}")


def to_table(t: Trace) -> pa.Table:
    """Arrow table of a trace, with its metadata in the schema."""
    k = t.k
    expert = pa.FixedSizeListArray.from_arrays(pa.array(t.expert.astype(np.int16).ravel()), k)
    if t.gate is None:
        gate = pa.nulls(t.rows, type=pa.list_(pa.float16(), k))
    else:
        gate = pa.FixedSizeListArray.from_arrays(pa.array(t.gate.astype(np.float16).ravel()), k)
    arrays = [
        pa.array(t.seq.astype(np.int32)),
        pa.array(t.step.astype(np.int32)),
        pa.array(t.phase.astype(np.uint8)),
        pa.array(t.layer.astype(np.uint16)),
        expert,
        gate,
    ]
    table = pa.Table.from_arrays(arrays, names=list(COLUMNS))
    return table.replace_schema_metadata({METADATA_KEY: t.meta.to_json()})


def write_trace(t: Trace, path: str | os.PathLike[str]) -> Path:
    """Validate and write a trace atomically: a crash never leaves a partial file at ``path``."""
    path = Path(path)
    if path.suffix != ".parquet":
        raise ValueError(f"{path}: a moebits trace is a Parquet file; name the output *.parquet "
                         f"(for a table of statistics use `moebits traces stats --json`)")
    t.validate(where=f"trace for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(to_table(t), tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_EXPECTED_TYPES = {
    "seq": pa.int32(),
    "step": pa.int32(),
    "phase": pa.uint8(),
    "layer": pa.uint16(),
}


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    if path.is_dir():
        raise TraceError(f"{path}: is a directory, expected a .parquet trace (import folders with `moebits traces import`)")
    try:
        pf = pq.ParquetFile(path)
        if not _gates_all_null(pf):
            return pf.read()
        # a trace without gates: its gate column is never decoded (some pyarrow builds fail on an all-null
        # fixed_size_list<float16> column); the nulls are rebuilt in memory
        field_ = pf.schema_arrow.field("gate")
        table = pf.read(columns=[n for n in pf.schema_arrow.names if n != "gate"])
        return table.append_column(field_, pa.nulls(table.num_rows, field_.type))
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path}: not a readable Parquet file ({exc}); truncated or not a trace?") from None


def _gates_all_null(pf: pq.ParquetFile) -> bool:
    """Whether the file's statistics say every row's ``gate`` is null (False when unknown)."""
    md = pf.metadata
    cols = [i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] == "gate"]
    if len(cols) != 1 or md.num_rows == 0:
        return False
    for rg in range(md.num_row_groups):
        col = md.row_group(rg).column(cols[0])
        stats = col.statistics
        if stats is None or not stats.has_null_count or stats.null_count != col.num_values:
            return False
    return True


def _column_types(table: pa.Table, where: str, k_hint: int) -> None:
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise TraceError(f"{where}: missing column(s) {missing}; a trace needs {list(COLUMNS)}")
    for name, typ in _EXPECTED_TYPES.items():
        got = table.schema.field(name).type
        if got != typ:
            raise TraceError(f"{where}: column {name!r} has type {got}, expected {typ}")
    for name, value_type in (("expert", pa.int16()), ("gate", pa.float16())):
        got = table.schema.field(name).type
        if not pa.types.is_fixed_size_list(got) or got.value_type != value_type:
            raise TraceError(f"{where}: column {name!r} has type {got}, expected fixed_size_list<{value_type}>[k]")
        if got.list_size != k_hint:
            raise TraceError(
                f"{where}: column {name!r} holds {got.list_size} experts per row but the model routes top-{k_hint}"
            )


def _fixed_list_to_numpy(col: pa.ChunkedArray, k: int, dtype: type) -> np.ndarray:
    arr = col.combine_chunks()
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.astype(dtype, copy=False).reshape(-1, k)


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace file; any problem raises :class:`TraceError`."""
    path = Path(path)
    table = _read_table(path)
    where = str(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TraceError(f"{where}: no moebits metadata; not a moebits trace (import it with `moebits traces import`)")
    meta = TraceMeta.from_json(raw, where)
    k = meta.spec.top_k
    _column_types(table, where, k)
    gate_col = table.column("gate")
    null_gates = gate_col.null_count
    if 0 < null_gates < table.num_rows:
        raise TraceError(f"{where}: 'gate' is null in {null_gates} of {table.num_rows} rows; it must be all or none")
    for name in ("seq", "step", "phase", "layer", "expert"):
        if table.column(name).null_count:
            raise TraceError(f"{where}: column {name!r} has null values")
    trace = Trace(
        meta=meta,
        seq=table.column("seq").to_numpy(),
        step=table.column("step").to_numpy(),
        phase=table.column("phase").to_numpy(),
        layer=table.column("layer").to_numpy(),
        expert=_fixed_list_to_numpy(table.column("expert"), k, np.int16),
        gate=None if null_gates else _fixed_list_to_numpy(gate_col, k, np.float16),
    )
    trace.validate(where)
    return trace
