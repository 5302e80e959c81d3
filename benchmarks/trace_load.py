"""Trace-load benchmark: how long a 10-million-row trace takes to write, read and turn into a
replay view.

Generates (numpy, seeded) a Qwen3-30B-A3B-shaped trace (48 MoE layers, 128 experts, top-8):
``--seqs`` sequences x ``--steps`` token steps (the first ``--prefill`` of them prefill) x 48
layers, default 1,303 x 160 x 48 = 10.0 M rows, with skewed per-layer expert popularity and
gate weights. Then times write_trace, read_trace, build_view at batch 1 and 16, and load_view
cold (read + build + save the cache) and warm (the memory-mapped cache). Prints a table.

    python benchmarks/trace_load.py            # full size, ~1 GB of RAM per million rows at peak
    python benchmarks/trace_load.py --seqs 50  # quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from moebits.core.model_spec import get_model_spec
from moebits.traces.format import Trace, TraceMeta, read_trace, write_trace
from moebits.traces.replay import build_view, load_view

T = TypeVar("T")


def _distinct_topk(rng: np.random.Generator, p: np.ndarray, n: int, k: int) -> np.ndarray:
    """[n, k] expert ids drawn with popularity ``p``, no id twice in a row (redraw clashes)."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]

    def draw(m: int) -> np.ndarray:
        return np.searchsorted(cdf, rng.random((m, k)), side="right").astype(np.int16)

    ids = draw(n)
    todo = np.arange(n)
    while todo.size:
        s = np.sort(ids[todo], axis=1)
        todo = todo[(s[:, 1:] == s[:, :-1]).any(axis=1)]
        ids[todo] = draw(todo.size)
    return ids


def make_trace(rng: np.random.Generator, seqs: int, steps: int, prefill: int) -> Trace:
    """A Qwen3-30B-A3B-shaped trace: seqs x steps x 48 layers, rows sorted (seq, step, layer)."""
    spec = get_model_spec("Qwen3-30B-A3B")
    L, E, k = spec.layers, spec.experts, spec.top_k
    n_tok = seqs * steps
    expert = np.empty((n_tok, L, k), dtype=np.int16)
    for layer in range(L):  # skewed popularity, different per layer
        p = rng.dirichlet(np.full(E, 0.6))
        expert[:, layer] = _distinct_topk(rng, p, n_tok, k)
    gate = rng.random((n_tok * L, k), dtype=np.float32) + 0.05
    gate /= gate.sum(axis=1, keepdims=True)
    step = np.tile(np.repeat(np.arange(steps, dtype=np.int32), L), seqs)
    meta = TraceMeta(
        spec=spec, provenance={"model": spec.name, "source": "benchmarks/trace_load.py (synthetic)"}
    )
    return Trace(
        meta=meta,
        seq=np.repeat(np.arange(seqs, dtype=np.int32), steps * L),
        step=step,
        phase=(step >= prefill).astype(np.uint8),
        layer=np.tile(np.arange(L, dtype=np.uint16), n_tok),
        expert=expert.reshape(-1, k),
        gate=gate.astype(np.float16),
    )


def _timed(fn: Callable[[], T]) -> tuple[T, tuple[float, float]]:
    """Result, (wall seconds, CPU seconds of this process: a fairer number on a busy host)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} CPUs, load average {load}, numpy {np.__version__}"


def run(
    seqs: int, steps: int, prefill: int, seed: int, workdir: Path
) -> list[tuple[str, tuple[float, float], str]]:
    """Run every stage once; rows of (stage, seconds, note)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, tuple[float, float], str]] = []
    gen, s = _timed(lambda: make_trace(rng, seqs, steps, prefill))
    rows.append(("generate (numpy)", s, f"{gen.rows:,} rows, {gen.num_seqs:,} seqs"))
    path = workdir / "bench.parquet"
    _, s = _timed(partial(write_trace, gen, path))
    rows.append(("write_trace (validate + zstd)", s, f"{path.stat().st_size / 2**20:,.0f} MiB"))
    del gen
    trace, s = _timed(lambda: read_trace(path))
    rows.append(("read_trace (read + validate)", s, ""))
    for batch in (1, 16):
        view, s = _timed(partial(build_view, trace, batch))
        rows.append(
            (
                f"build_view batch {batch}",
                s,
                f"{view.layer_steps:,} layer steps, {view.ex_expert.shape[0]:,} entries",
            )
        )
        del view
    del trace
    _, s = _timed(lambda: load_view(path, 16))
    rows.append(("load_view batch 16, cold (read+build+save)", s, ""))
    view, s = _timed(lambda: load_view(path, 16))
    _, s2 = _timed(lambda: int(view.ex_tokens.sum()))
    rows.append(("load_view batch 16, warm (mmap cache)", s, f"then one pass over ex_tokens {s2[0]:.2f} s"))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=1303, help="sequences (default 1303 -> 10.0 M rows)")
    ap.add_argument("--steps", type=int, default=160, help="token steps per sequence")
    ap.add_argument("--prefill", type=int, default=32, help="of which prefill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="moebits-bench-") as tmp:
        workdir = args.dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        old = os.environ.get("MOEBITS_CACHE")
        os.environ["MOEBITS_CACHE"] = str(workdir / "cache")
        try:
            rows = run(args.seqs, args.steps, args.prefill, args.seed, workdir)
        finally:
            if old is None:
                os.environ.pop("MOEBITS_CACHE", None)
            else:
                os.environ["MOEBITS_CACHE"] = old
    print(f"machine: {_machine()}")
    print(f"{'stage':<44} {'wall s':>7} {'cpu s':>7}  note")
    for stage, (wall, cpu), note in rows:
        print(f"{stage:<44} {wall:>7.2f} {cpu:>7.2f}  {note}")


if __name__ == "__main__":
    main()
