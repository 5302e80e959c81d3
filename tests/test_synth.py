"""Synthetic traces: the generator's knobs, determinism, the command line, fitting to the real
traces (acceptance: top-10% share, reuse and 90%-mass coverage within 10%), and the shipped
default trace."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
from moebits.core.model_spec import ModelSpec, get_model_spec
from moebits.traces.__main__ import main
from moebits.traces.fit import (
    digamma,
    dirichlet_entropy,
    fit_knobs,
    gate_alpha_for_entropy,
    shape_like,
    targets_from_trace,
)
from moebits.traces.format import Phase, read_trace
from moebits.traces.stats import compute_stats, dominant_phase
from moebits.traces.synth import (
    DEFAULT_TRACE,
    AliasTable,
    Shape,
    SynthKnobs,
    generate,
    popularity,
    skew_for_top_share,
)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "traces" / "real"
QWEN3 = get_model_spec("Qwen3-30B-A3B")


def _gen(knobs: SynthKnobs, shape: Shape, spec: ModelSpec = QWEN3, seed: int = 0):
    return generate(spec, knobs, shape, np.random.default_rng(seed))


def _knobs(spec: ModelSpec = QWEN3, layers: list[int] | None = None, **kw) -> SynthKnobs:
    return SynthKnobs.for_spec(spec, layers=layers if layers is not None else list(range(8)), **kw)


def test_alias_table_draws_the_distribution() -> None:
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    got = np.bincount(AliasTable.build(p).draw((400_000,), rng), minlength=p.size) / 400_000
    assert np.abs(got - p).max() < 0.004 and got[-1] == 0


def test_popularity_and_skew_inversion() -> None:
    pop = popularity(np.array([0.0, 0.3, 1.5]), 128)
    assert np.allclose(pop.sum(axis=1), 1) and np.allclose(pop[0], 1 / 128)
    assert (np.diff(pop[1:], axis=1) <= 0).all()  # rank 0 is the hottest
    skew = skew_for_top_share(np.array([0.17, 0.57]), 128)
    assert popularity(skew, 128)[:, :13].sum(axis=1) == pytest.approx([0.17, 0.57], abs=1e-6)


def test_shape_phases_and_gates() -> None:
    spec = get_model_spec("Mixtral-8x7B")
    t = _gen(_knobs(spec, layers=list(range(32)), gate_sum=0.5), Shape(3, 5, 7), spec)
    t.validate()
    assert t.rows == 3 * 12 * 32 and t.num_seqs == 3
    assert t.tokens(Phase.PREFILL) == 15 and t.tokens(Phase.DECODE) == 21
    assert (t.phase[t.step < 5] == Phase.PREFILL).all() and (t.phase[t.step >= 5] == Phase.DECODE).all()
    g = t.gate.astype(np.float64)
    assert (np.diff(g, axis=1) <= 0).all()
    assert np.allclose(g.sum(axis=1), 0.5, atol=2e-3)
    assert _gen(_knobs(spec, gates=False), Shape(1, 0, 3), spec).gate is None


def test_knobs_move_their_statistics() -> None:
    shape = Shape(8, 0, 150)

    def overall(**kw):
        return compute_stats(_gen(_knobs(**kw), shape)).overall

    lo, hi = overall(reuse_prob=0.0), overall(reuse_prob=0.6)
    assert lo.reuse < 0.12 < 0.6 < hi.reuse
    lo, hi = overall(cross_layer=0.0), overall(cross_layer=0.7)
    assert lo.next_layer_predictability + 0.3 < hi.next_layer_predictability
    flat, skewed = overall(skew=0.0), overall(skew=1.0)
    assert flat.top10_share < 0.15 < 0.3 < skewed.top10_share
    assert skewed.experts_for_90pct_mass < flat.experts_for_90pct_mass


def test_workload_switch_moves_the_hot_experts() -> None:
    def hot_sets(switch: int) -> list[set[int]]:
        t = _gen(_knobs(skew=2.0, reuse_prob=0.0, cross_layer=0.0, switch_every_seqs=switch), Shape(4, 0, 200))
        sets = []
        for group in ((0, 1), (2, 3)):
            rows = np.isin(t.seq, group) & (t.layer == 0)
            counts = np.bincount(t.expert[rows].ravel(), minlength=128)
            sets.append(set(np.argsort(-counts)[:8].tolist()))
        return sets

    same = hot_sets(0)
    assert len(same[0] & same[1]) >= 6
    moved = hot_sets(2)
    assert len(moved[0] & moved[1]) <= 2


@pytest.mark.parametrize("spec", [QWEN3, ModelSpec("full", layers=2, experts=4, top_k=4, hidden=8, expert_intermediate=8)])
def test_rows_never_repeat_an_expert_even_at_extreme_skew(spec: ModelSpec) -> None:
    knobs = SynthKnobs.for_spec(spec, skew=16.0, layers=[0, 1], reuse_prob=0.5, cross_layer=0.5)
    t = _gen(knobs, Shape(4, 2, 30), spec)
    t.validate()  # raises on a duplicate expert in a row


def test_knob_parsing_and_validation() -> None:
    spec = get_model_spec("Mixtral-8x7B")
    knobs = SynthKnobs.from_dict({"skew": 0.4, "reuse_prob": 0.1}, spec)
    assert knobs.skew == [0.4] * 32
    assert SynthKnobs.from_dict(json.loads(knobs.to_json()), spec) == knobs
    with pytest.raises(ValueError, match="unknown knob"):
        SynthKnobs.from_dict({"skew": 0.4, "reuse": 0.1}, spec)
    with pytest.raises(ValueError, match="reuse_prob"):
        SynthKnobs.for_spec(spec, reuse_prob=1.0)
    with pytest.raises(ValueError, match="skew"):
        SynthKnobs(skew=[0.3, 0.3], layers=[0, 1, 2]).validate(spec)
    with pytest.raises(ValueError, match="layers"):
        SynthKnobs(skew=[0.3], layers=[32]).validate(spec)
    with pytest.raises(ValueError, match="seqs"):
        Shape(0, 1, 1)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    knobs = _knobs()
    a, b, c = (_gen(knobs, Shape(3, 4, 20), seed=s) for s in (5, 5, 6))
    assert np.array_equal(a.expert, b.expert) and np.array_equal(a.gate, b.gate)
    assert not np.array_equal(a.expert, c.expert)


def test_gate_entropy_inversion() -> None:
    assert digamma(1.0) == pytest.approx(-0.5772156649, abs=1e-9)
    assert digamma(0.5) == pytest.approx(-1.9635100260, abs=1e-9)
    assert dirichlet_entropy(1.0, 2) == pytest.approx(0.5)  # uniform on [0, 1]: E[H] = 1/2
    alpha = gate_alpha_for_entropy(1.0, 4)
    assert dirichlet_entropy(alpha, 4) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------- command line


def test_cli_is_deterministic(tmp_path, capsys) -> None:
    args = ["synth", "--model", "OLMoE-1B-7B", "--seqs", "3", "--prompt-len", "4", "--steps", "10"]
    paths = [tmp_path / f"{i}.parquet" for i in range(3)]
    for path, seed in zip(paths, ("7", "7", "8"), strict=True):
        assert main([*args, "--seed", seed, "-o", str(path)]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    t = read_trace(paths[0])
    knobs = json.loads(t.meta.provenance["knobs"])
    assert t.meta.provenance["seed"] == "7" and len(knobs["skew"]) == 16


def test_cli_knobs_file_and_overrides(tmp_path, capsys) -> None:
    knobs_in = tmp_path / "k.json"
    knobs_in.write_text(json.dumps({"skew": 0.5, "reuse_prob": 0.2}))
    out, knobs_out = tmp_path / "t.parquet", tmp_path / "used.json"
    args = ["synth", "--model", "Mixtral-8x7B", "--seqs", "2", "--steps", "5", "--knobs", str(knobs_in)]
    assert main([*args, "--switch-every", "1", "--knobs-out", str(knobs_out), "-o", str(out)]) == 0
    used = json.loads(knobs_out.read_text())
    assert used["skew"] == [0.5] * 32 and used["reuse_prob"] == 0.2 and used["switch_every_seqs"] == 1


def test_cli_bad_input(tmp_path, capsys) -> None:
    base = ["synth", "--seqs", "2", "--steps", "3", "-o", str(tmp_path / "x.parquet")]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases = [
        ["--model", "GPT-5-MoE"],
        ["--model", "Mixtral-8x7B", "--seqs", "0"],
        ["--model", "Mixtral-8x7B", "--knobs", str(bad_json)],
        ["--model", "Mixtral-8x7B", "--knobs", str(tmp_path / "missing.json")],
        ["--model", "Mixtral-8x7B", "--like", str(tmp_path / "missing.parquet")],
        ["--model", "Mixtral-8x7B", "--reuse", "1.5"],
        ["--model", "Mixtral-8x7B", "--target-reuse", "0.3"],
    ]
    for extra in cases:
        assert main([*base, *extra]) == 2, extra
    err = capsys.readouterr().err
    assert err.count("error:") == len(cases) and "Traceback" not in err


# ---------------------------------------------------------------- fitting to the real traces

FIT_CASES = {
    # folder: the phase the trace mostly has (decode, except the prefill-only DeepSeek trace)
    "mixtral8x7b_speculative-moe": Phase.DECODE,
    "llama4maverick_mmlu": Phase.DECODE,
    "deepseekv2lite_moe-beyond": Phase.PREFILL,
    "qwen15moe_vllm-logger": Phase.DECODE,
}


@pytest.mark.parametrize("folder", list(FIT_CASES))
def test_fitted_synthetic_reproduces_real_statistics(folder: str) -> None:
    if not (REAL / folder).is_dir():
        pytest.skip(f"real trace {folder} not present under {REAL}")
    importers = pytest.importorskip("moebits.traces.importers")
    real = importers.import_source(REAL / folder)
    assert dominant_phase(real) == FIT_CASES[folder]
    want = compute_stats(real, FIT_CASES[folder]).overall
    shape = shape_like(real, max_rows=120_000)  # fewer sequences than DeepSeek and Llama-4 have
    result = fit_knobs(targets_from_trace(real, real.spec), real.spec, shape, np.random.default_rng(0), iterations=5)
    got = compute_stats(generate(real.spec, result.knobs, shape, np.random.default_rng(1))).overall
    for key in ("top10_share", "reuse", "experts_for_90pct_mass"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=0.10), key


def test_fit_to_another_model_interpolates_by_depth() -> None:
    src = _gen(_knobs(get_model_spec("Mixtral-8x7B"), layers=None, skew=0.3, reuse_prob=0.2), Shape(4, 0, 60),
               get_model_spec("Mixtral-8x7B"))
    targets = targets_from_trace(src, QWEN3)
    assert targets.layers == list(range(48)) and len(targets.top10) == 48
    assert min(targets.top10) >= 0.1 and targets.reuse == compute_stats(src).overall.reuse


# ---------------------------------------------------------------- the shipped default trace

DEFAULT_TOP10 = (0.15, 0.19)  # traces/data/README.md
DEFAULT_REUSE = (0.28, 0.39)


def test_default_trace_is_valid_small_and_in_range() -> None:
    assert DEFAULT_TRACE.stat().st_size < 3 * 2**20
    t = read_trace(DEFAULT_TRACE)
    assert t.spec == QWEN3 and t.num_seqs == 16
    assert set(np.unique(t.layer).tolist()) == set(range(48))
    assert t.tokens(Phase.PREFILL) == 16 * 32 and t.tokens(Phase.DECODE) == 16 * 128
    assert t.meta.provenance["source"] == "synthetic"
    for phase in (None, Phase.DECODE):
        st = compute_stats(t, phase).overall
        assert DEFAULT_TOP10[0] <= st.top10_share <= DEFAULT_TOP10[1]
        assert DEFAULT_REUSE[0] <= st.reuse <= DEFAULT_REUSE[1]
        assert st.gate_entropy is not None and math.isfinite(st.gate_entropy)


def test_default_trace_regenerates_exactly(tmp_path, capsys) -> None:
    script = (DEFAULT_TRACE.parent / "regenerate.sh").read_text().replace("\\\n", " ")
    line = next(x for x in script.splitlines() if x.strip().startswith("moebits traces synth"))
    args = shlex.split(line)[3:]
    out = args.index("-o")
    args[out + 1] = str(tmp_path / "regen.parquet")
    knobs_at = args.index("--knobs")
    args[knobs_at + 1] = str(ROOT / args[knobs_at + 1])
    assert main(["synth", *args]) == 0
    a, b = read_trace(DEFAULT_TRACE), read_trace(tmp_path / "regen.parquet")
    assert a.meta == b.meta
    for name in (f.name for f in dataclasses.fields(a) if f.name != "meta"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
