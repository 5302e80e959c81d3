"""The Parquet trace format: round trip, one clear TraceError per kind of bad file, atomic
writes, and the CLI's one-line error for a bad trace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moebits.core.model_spec import get_model_spec
from moebits.traces.__main__ import main
from moebits.traces.format import Phase, Trace, TraceError, TraceMeta, read_trace, to_table, write_trace

ROOT = Path(__file__).resolve().parents[1]


def _trace(gates: bool = True, seqs: int = 3, steps: int = 4) -> Trace:
    """Mixtral-shaped (32 layers, 8 experts, top-2): ``seqs`` x ``steps`` tokens x 32 layers."""
    rng = np.random.default_rng(7)
    spec = get_model_spec("Mixtral-8x7B")
    seq, step, layer = (
        a.ravel() for a in np.meshgrid(np.arange(seqs), np.arange(steps), np.arange(32), indexing="ij")
    )
    n = seq.shape[0]
    first = rng.integers(0, 8, n)
    expert = np.stack([first, (first + rng.integers(1, 8, n)) % 8], axis=1)
    gate = rng.dirichlet([1.0, 1.0], n) if gates else None
    return Trace(
        meta=TraceMeta(spec=spec, provenance={"model": "test", "source": "tests/test_format.py"}),
        seq=seq.astype(np.int32),
        step=step.astype(np.int32),
        phase=(step >= 2).astype(np.uint8),
        layer=layer.astype(np.uint16),
        expert=expert.astype(np.int16),
        gate=None if gate is None else gate.astype(np.float16),
    )


def _write_raw(table: pa.Table, path: Path) -> Path:
    """Write without write_trace's validation, as a foreign or broken writer would."""
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("gates", [True, False])
def test_round_trip(tmp_path: Path, gates: bool) -> None:
    t = _trace(gates)
    back = read_trace(write_trace(t, tmp_path / "sub" / "t.parquet"))
    assert back.meta == t.meta
    for name in ("seq", "step", "phase", "layer", "expert"):
        got, want = getattr(back, name), getattr(t, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    if gates:
        assert back.gate is not None and np.array_equal(back.gate, t.gate)
    else:
        assert back.gate is None


def test_a_trace_without_gates_is_read_without_decoding_its_gate_column(tmp_path: Path, monkeypatch) -> None:
    """An all-null gate column is known from the file's statistics and never decoded (a pyarrow build on the
    GPU host failed to decode one)."""
    path = write_trace(_trace(False), tmp_path / "t.parquet")
    read = pq.ParquetFile.read

    def no_gate(self, columns=None, **kw):   # decoding the gate column is the failure being avoided
        if columns is None or "gate" in columns:
            raise pa.ArrowInvalid("cannot decode gate")
        return read(self, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", no_gate)
    back = read_trace(path)
    assert back.gate is None and back.rows == 384
    with_gates = write_trace(_trace(True), tmp_path / "g.parquet")   # a trace with gates still decodes them
    with pytest.raises(TraceError, match="cannot decode gate"):
        read_trace(with_gates)
    assert (back.rows, back.num_seqs, back.tokens(Phase.PREFILL), back.tokens(Phase.DECODE)) == (384, 3, 6, 6)


def _bad(t: Trace, **arrays: np.ndarray) -> pa.Table:
    for name, value in arrays.items():
        setattr(t, name, value)
    return to_table(t)


def _case_table(case: str) -> pa.Table:
    t = _trace()
    if case == "missing column":
        return to_table(t).drop_columns(["layer"])
    if case == "mistyped column":
        table = to_table(t)
        return table.set_column(1, "step", pa.array(t.step.astype(np.int64)))
    if case == "expert id >= experts":
        e = t.expert.copy()
        e[5] = [3, 8]
        return _bad(t, expert=e)
    if case == "k != top_k":
        rng = np.random.default_rng(0)
        three = np.stack([rng.permutation(8)[:3] for _ in range(t.rows)]).astype(np.int16)
        return _bad(t, expert=three, gate=np.full((t.rows, 3), 0.3, dtype=np.float16))
    if case == "NaN gate":
        g = t.gate.copy()
        g[7, 1] = np.nan
        return _bad(t, gate=g)
    if case == "negative gate":
        g = t.gate.copy()
        g[9, 0] = -0.25
        return _bad(t, gate=g)
    if case == "steps out of order":
        step = t.step.copy()
        step[32:64], step[64:96] = t.step[64:96], t.step[32:64]  # seq 0: step 2 before step 1
        return _bad(t, step=step)
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing column", r"missing column\(s\) \['layer'\]"),
        ("mistyped column", "column 'step' has type int64, expected int32"),
        ("expert id >= experts", r"row 5 has expert id\(s\) \[3, 8\] outside 0..7"),
        ("k != top_k", "holds 3 experts per row but the model routes top-2"),
        ("NaN gate", "row 7 has a NaN or infinite gate weight"),
        ("negative gate", "row 9 has a negative gate weight"),
        (
            "steps out of order",
            r"rows out of order at row 64: \(seq, step, layer\) = \(0, 1, 0\) after \(0, 2, 31\)",
        ),
    ],
)
def test_bad_trace_file(tmp_path: Path, case: str, match: str) -> None:
    path = _write_raw(_case_table(case), tmp_path / "bad.parquet")
    with pytest.raises(TraceError, match=match) as info:
        read_trace(path)
    assert str(path) in str(info.value)  # the message names the file


def test_truncated_file(tmp_path: Path) -> None:
    path = write_trace(_trace(), tmp_path / "t.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="not a readable Parquet file.*truncated or not a trace"):
        read_trace(path)


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_text("seq,step\n0,0\n")
    with pytest.raises(TraceError, match="not a readable Parquet file"):
        read_trace(path)


def test_no_moebits_metadata(tmp_path: Path) -> None:
    path = _write_raw(to_table(_trace()).replace_schema_metadata({}), tmp_path / "plain.parquet")
    with pytest.raises(TraceError, match="no moebits metadata; not a moebits trace"):
        read_trace(path)


def test_missing_path_and_folder(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "nope.parquet")
    with pytest.raises(TraceError, match="is a directory"):
        read_trace(tmp_path)


def test_write_refuses_invalid_trace(tmp_path: Path) -> None:
    t = _trace()
    t.gate[3, 0] = np.nan
    with pytest.raises(TraceError, match="NaN"):
        write_trace(t, tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash mid-write leaves the old file intact and no temp file behind."""
    target = write_trace(_trace(seqs=1), tmp_path / "t.parquet")
    before = target.read_bytes()
    written: list[str] = []

    def crash(table: pa.Table, where: str | os.PathLike[str], **kwargs: object) -> None:
        Path(where).write_bytes(b"PAR1 partial")
        written.append(str(where))
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="simulated"):
        write_trace(_trace(seqs=2), target)
    assert written and written[0] != str(target)  # it wrote elsewhere first
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
    monkeypatch.undo()
    assert read_trace(target).num_seqs == 1


def test_cli_info_bad_file_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    proc = subprocess.run(
        [sys.executable, "-m", "moebits.traces", "info", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("case", ["NaN gate", "missing column", "steps out of order"])
def test_cli_info_bad_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    path = _write_raw(_case_table(case), tmp_path / "bad.parquet")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_cli_info_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_trace(_trace(), tmp_path / "t.parquet")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "384 (seq, step, layer) records, 3 sequences" in out and "6 prefill, 6 decode" in out
