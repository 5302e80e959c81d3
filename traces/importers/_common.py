"""Helpers shared by the importers: reading source files with clear errors, and assembling
rows from many blocks into one sorted, validated :class:`~traces.format.Trace`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from moebits.core.model_spec import get_model_spec
from moebits.traces.format import Phase, Trace, TraceError, TraceMeta

HEAD_BYTES = 4096


def read_head(path: Path) -> str:
    """The first few KB of a file as text, for format sniffing; raises TraceError if unreadable."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(HEAD_BYTES)
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return raw.decode("utf-8", errors="replace")


def read_text(path: Path) -> str:
    """A whole file as UTF-8 text; raises TraceError naming the file on any problem."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise TraceError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})"
        ) from None


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{lineno}: invalid JSON ({exc.msg}); truncated file?") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def field(obj: dict[str, Any], name: str, where: str) -> Any:
    """``obj[name]`` or a TraceError naming the missing field."""
    try:
        return obj[name]
    except KeyError:
        raise TraceError(f"{where}: missing field {name!r} (has {sorted(obj)})") from None


def natural_key(path: Path) -> list[Any]:
    """Sort key that orders ``2.json`` before ``10.json``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def first_json_object(head: str) -> dict[str, Any] | None:
    """The first line of ``head`` parsed as a JSON object, or None."""
    line = head.split("\n", 1)[0]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


class RowCollector:
    """Accumulates blocks of routing rows, then sorts and validates them into a Trace."""

    def __init__(self, k: int, has_gates: bool) -> None:
        self.k = k
        self.has_gates = has_gates
        self._blocks: list[tuple[np.ndarray, ...]] = []

    def add(
        self,
        seq: int,
        step: np.ndarray,
        phase: Phase,
        layer: np.ndarray | int,
        expert: np.ndarray,
        gate: np.ndarray | None = None,
    ) -> None:
        """Add n rows of one sequence: step, layer [n] (or one layer for all); expert, gate [n, k]."""
        step = np.asarray(step, dtype=np.int64).ravel()
        n = step.shape[0]
        layer = np.broadcast_to(np.asarray(layer, dtype=np.int64), (n,))
        expert = np.asarray(expert, dtype=np.int64).reshape(n, -1)
        if self.has_gates:
            if gate is None:
                raise ValueError("this trace has gates: every block needs them")
            gate = np.asarray(gate, dtype=np.float32).reshape(n, -1)
        else:
            gate = np.zeros((n, 0), dtype=np.float32)
        seqs = np.full(n, seq, dtype=np.int64)
        phases = np.full(n, int(phase), dtype=np.int64)
        self._blocks.append((seqs, step, phases, layer, expert, gate))

    def to_trace(self, model: str, provenance: dict[str, str], where: str) -> Trace:
        """Concatenate, sort by (seq, step, layer) and validate against the preset ``model``."""
        spec = get_model_spec(model)
        if not self._blocks:
            raise TraceError(f"{where}: no routing rows found")
        seq, step, phase, layer, expert, gate = (np.concatenate(c) for c in zip(*self._blocks, strict=True))
        if expert.shape[1] != spec.top_k:
            raise TraceError(
                f"{where}: rows carry {expert.shape[1]} expert ids but {spec.name} routes top-{spec.top_k}"
            )
        _check_fits(expert, layer, spec.experts, spec.layers, where)
        order = np.lexsort((layer, step, seq))
        trace = Trace(
            meta=TraceMeta(spec=spec, provenance=provenance),
            seq=seq[order].astype(np.int32),
            step=step[order].astype(np.int32),
            phase=phase[order].astype(np.uint8),
            layer=layer[order].astype(np.uint16),
            expert=expert[order].astype(np.int16),
            gate=gate[order].astype(np.float16) if self.has_gates else None,
        )
        trace.validate(where)
        return trace


def _check_fits(expert: np.ndarray, layer: np.ndarray, experts: int, layers: int, where: str) -> None:
    """Range checks before the narrowing casts (an id of 70000 must not wrap silently)."""
    if expert.size and (expert.min() < 0 or expert.max() >= experts):
        raise TraceError(
            f"{where}: expert ids span {expert.min()}..{expert.max()}, model has {experts} experts"
        )
    if layer.size and (layer.min() < 0 or layer.max() >= layers):
        raise TraceError(f"{where}: MoE layers span {layer.min()}..{layer.max()}, model has {layers}")
