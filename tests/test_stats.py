"""Trace statistics: exact values on hand-built traces, a loop-based reference on random
traces, and the ``moebits traces stats`` command line."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from moebits.core.model_spec import ModelSpec
from moebits.traces.__main__ import main
from moebits.traces.format import Phase, Trace, TraceMeta, write_trace
from moebits.traces.stats import compute_stats

TINY = ModelSpec("tiny", layers=3, experts=4, top_k=2, hidden=8, expert_intermediate=8)


def make_trace(rows: list[tuple], spec: ModelSpec = TINY, gates: bool = True) -> Trace:
    """rows: (seq, step, phase, layer, experts[, gates]); sorted here by (seq, step, layer)."""
    rows = sorted(rows, key=lambda r: (r[0], r[1], r[3]))
    k = spec.top_k
    gate = np.array([r[5] if len(r) > 5 else [1.0 / k] * k for r in rows], dtype=np.float16)
    return Trace(
        meta=TraceMeta(spec=spec),
        seq=np.array([r[0] for r in rows], dtype=np.int32),
        step=np.array([r[1] for r in rows], dtype=np.int32),
        phase=np.array([r[2] for r in rows], dtype=np.uint8),
        layer=np.array([r[3] for r in rows], dtype=np.uint16),
        expert=np.array([r[4] for r in rows], dtype=np.int16).reshape(len(rows), k),
        gate=gate.reshape(len(rows), k) if gates else None,
    )


def one_layer_trace() -> Trace:
    # seq 0: [0,1] -> [1,2] shares 1 of 2; seq 1: [3,0] -> [0,2] shares 1 of 2.
    # Across the sequence boundary [1,2] -> [3,0] shares nothing (and must not count).
    return make_trace(
        [
            (0, 0, 0, 0, [0, 1], [0.5, 0.5]),
            (0, 1, 1, 0, [1, 2], [0.5, 0.5]),
            (1, 0, 0, 0, [3, 0], [1.0, 0.0]),
            (1, 1, 1, 0, [0, 2], [0.5, 0.5]),
        ]
    )


def test_one_layer_exact_values() -> None:
    st = compute_stats(one_layer_trace())
    (row,) = st.layers
    assert row.layer == 0
    assert row.activations == 8
    assert row.distinct_experts == 4
    assert row.top10_share == pytest.approx(3 / 8)  # expert 0 taken 3 times; ceil(0.4) = 1 expert
    assert row.experts_for_90pct_mass == 4  # counts 3,2,2,1: 7 < 0.9 * 8
    assert row.reuse == pytest.approx(0.5)
    assert row.next_layer_predictability is None
    assert row.gate_entropy == pytest.approx(3 * math.log(2) / 4, rel=1e-3)
    assert st.overall.reuse == pytest.approx(0.5)
    assert st.tokens == 4


def test_reuse_needs_consecutive_steps() -> None:
    # step 0 -> step 2 is not a consecutive pair: no reuse pairs at all
    t = make_trace([(0, 0, 1, 0, [0, 1]), (0, 2, 1, 0, [0, 1])])
    assert compute_stats(t).overall.reuse is None


def test_phase_filter() -> None:
    t = one_layer_trace()
    dec = compute_stats(t, Phase.DECODE)
    assert dec.overall.activations == 4 and dec.tokens == 2
    assert dec.overall.reuse is None  # the two decode tokens are in different sequences
    assert compute_stats(t, Phase.PREFILL).overall.top10_share == pytest.approx(2 / 4)


def test_next_layer_predictability_exact() -> None:
    # layer 1 experts are always (layer 0 experts + 1) mod 4: every successor is learned exactly
    f = [[0, 1], [2, 3], [1, 2], [3, 0]]
    rows = []
    for step, ex in enumerate(f):
        rows.append((0, step, 1, 0, ex))
        rows.append((0, step, 1, 1, [(e + 1) % 4 for e in ex]))
    st = compute_stats(make_trace(rows))
    assert st.layers[0].next_layer_predictability == pytest.approx(1.0)
    assert st.layers[1].next_layer_predictability is None
    # token 5 breaks the map: counts give succ = {0: 1, 1: 2, 2: 3, 3: 0 (3-way tie, lowest id)},
    # so tokens 0-4 stay fully predicted and token 5 ([2, 3] -> [3, 1]) gets {3, 0}: half
    rows += [(0, 4, 1, 0, [0, 1]), (0, 4, 1, 1, [1, 2]), (0, 5, 1, 0, [2, 3]), (0, 5, 1, 1, [3, 1])]
    st = compute_stats(make_trace(rows))
    assert st.layers[0].next_layer_predictability == pytest.approx(5.5 / 6)


def test_next_layer_uses_next_present_layer() -> None:
    rows = [(0, s, 1, layer, [s % 4, (s + 1) % 4]) for s in range(3) for layer in (0, 2)]
    st = compute_stats(make_trace(rows))
    assert [r.layer for r in st.layers] == [0, 2]
    # layer 2 repeats layer 0: succ(0)=0, succ(1)=1, succ(2)=2, succ(3)=2 (tie with 3, lowest id),
    # so [0,1] and [1,2] are fully predicted and [2,3] half
    assert st.layers[0].next_layer_predictability == pytest.approx(2.5 / 3)


def test_no_gates_gives_null_entropy() -> None:
    t = make_trace([(0, 0, 1, 0, [0, 1]), (0, 1, 1, 0, [0, 2])], gates=False)
    st = compute_stats(t)
    assert st.overall.gate_entropy is None and st.layers[0].gate_entropy is None


def test_empty_phase_is_an_error() -> None:
    t = make_trace([(0, 0, 0, 0, [0, 1])])
    with pytest.raises(ValueError, match="no decode rows"):
        compute_stats(t, Phase.DECODE)


# ---------------------------------------------------------------- reference on random traces


def random_trace(rng: np.random.Generator, spec: ModelSpec) -> Trace:
    """Random trace with gaps: missing steps, missing layers, several sequences."""
    rows = []
    for seq in range(4):
        steps = np.sort(rng.choice(40, size=30, replace=False))
        for step in steps:
            for layer in range(spec.layers):
                if rng.random() < 0.9:
                    hot = rng.random(spec.experts) ** 3
                    ex = rng.choice(spec.experts, size=spec.top_k, replace=False, p=hot / hot.sum())
                    gate = rng.dirichlet(np.ones(spec.top_k))
                    rows.append((seq, int(step), int(step >= 10), layer, ex.tolist(), gate.tolist()))
    return make_trace(rows, spec)


def reference_stats(t: Trace) -> dict[str, float]:
    """Loop-by-loop statement of the definitions in traces/stats.py."""
    k, e = t.k, t.spec.experts
    by_key = {(int(s), int(p), int(l)): set(x.tolist()) for s, p, l, x in zip(t.seq, t.step, t.layer, t.expert, strict=True)}
    layers = sorted(set(t.layer.tolist()))
    counts = Counter((int(l), int(x)) for l, row in zip(t.layer, t.expert, strict=True) for x in row)
    top, n90, acts = [], [], []
    for layer in layers:
        c = sorted((counts[(layer, x)] for x in range(e)), reverse=True)
        total = sum(c)
        top.append(sum(c[: math.ceil(0.1 * e)]) / total)
        cum, n = 0, 0
        while cum < 0.9 * total:
            cum += c[n]
            n += 1
        n90.append(n)
        acts.append(total)
    reuse = [len(cur & by_key[(s, p - 1, l)]) / k for (s, p, l), cur in by_key.items() if (s, p - 1, l) in by_key]
    nxt = dict(zip(layers[:-1], layers[1:], strict=True))
    pairs = []  # (token at layer l, its experts there, its experts at the next present layer)
    for (s, p, l), a_set in by_key.items():
        if l in nxt and (s, p, nxt[l]) in by_key:
            pairs.append(((s, p, l), a_set, by_key[(s, p, nxt[l])]))
    table: dict[tuple[int, int], Counter] = defaultdict(Counter)
    for key, a_set, b_set in pairs:
        for a in a_set:
            table[(key[2], a)].update(b_set)

    def succ(layer: int, a: int) -> int:
        row = table[(layer, a)]
        return max(range(e), key=lambda b: (row[b], -b))  # most frequent, lowest id on ties

    pred = [len(b & {succ(key[2], a) for a in a_set}) / k for key, a_set, b in pairs]
    return {
        "top10_share": float(np.average(top, weights=acts)),
        "experts_for_90pct_mass": float(np.average(n90, weights=acts)),
        "reuse": float(np.mean(reuse)),
        "next_layer_predictability": float(np.mean(pred)),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(seed: int) -> None:
    spec = ModelSpec("small", layers=3, experts=10, top_k=3, hidden=8, expert_intermediate=8)
    t = random_trace(np.random.default_rng(seed), spec)
    got, want = compute_stats(t).overall, reference_stats(t)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-9), key


# ---------------------------------------------------------------- command line


@pytest.fixture
def trace_file(tmp_path):
    return write_trace(one_layer_trace(), tmp_path / "tiny.parquet")


def test_cli_table(trace_file, capsys) -> None:
    assert main(["stats", str(trace_file)]) == 0
    out = capsys.readouterr().out
    assert "top10" in out and "reuse" in out
    assert out.strip().splitlines()[-1].split()[0] == "all"


def test_cli_json_keys(trace_file, capsys) -> None:
    assert main(["stats", str(trace_file), "--json", "--phase", "all"]) == 0
    body = json.loads(capsys.readouterr().out)
    keys = {
        "activations", "distinct_experts", "top10_share", "experts_for_90pct_mass",
        "reuse", "next_layer_predictability", "gate_entropy",
    }
    assert keys <= set(body["overall"])
    assert len(body["layers"]) == 1 and keys | {"layer"} <= set(body["layers"][0])
    assert body["overall"]["reuse"] == pytest.approx(0.5)
    assert body["overall"]["next_layer_predictability"] is None


def test_cli_plot(trace_file, tmp_path, capsys) -> None:
    png = tmp_path / "fig" / "stats.png"
    assert main(["stats", str(trace_file), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input(tmp_path, trace_file, capsys) -> None:
    assert main(["stats", str(tmp_path / "missing.parquet")]) == 2
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    assert main(["stats", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err
    assert main(["stats", str(trace_file), "--phase", "decode"]) == 0  # 2 decode tokens exist
    prefill_only = write_trace(make_trace([(0, 0, 0, 0, [0, 1])]), tmp_path / "p.parquet")
    assert main(["stats", str(prefill_only), "--phase", "decode"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["stats", str(trace_file), "--phase", "middle"])
    assert exc.value.code == 2
