"""analysis.quality: sim decisions of the shipped workloads, graded with a table, measured on the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from moebits.analysis import quality as q
from moebits.analysis import quality_report as qr
from moebits.core.model_spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "train" / "data"
TRACE, PROFILE = DATA / "traces" / "evaluation_prose.parquet", DATA / "traces" / "calibration_prose.parquet"
CAL, EVAL = DATA / "sensitivity" / "calibration.parquet", DATA / "sensitivity" / "evaluation.parquet"


def _paths(data_dir: Path = ROOT / "data" / "corpus") -> q.StudyPaths:
    return q.StudyPaths(data_dir, DATA / "model", DATA / "traces", CAL, EVAL)


@pytest.mark.parametrize(("policy", "budget"), [("static_uniform", "all_int3"), ("dynaexq", "bf16_50pct")])
def test_graded_proxy_with_the_policys_table_reproduces_the_simulators(policy: str, budget: str) -> None:
    spec = q.trace_spec(TRACE)
    engine, info = q.decide(policy, budget, TRACE, PROFILE, _paths(), q.level_overrides(policy, budget, spec))
    served = info["served"]
    assert len(served) == engine.view.layer_steps
    assert q.graded_proxy(engine.view, served, q.read_table(CAL), spec) == pytest.approx(info["proxy_policy_table"])
    assert q.graded_proxy(engine.view, served, q.read_table(EVAL), spec) != pytest.approx(info["proxy_policy_table"])


def test_budget_fitted_precisions() -> None:
    spec = ModelSpec(name="t", layers=8, experts=32, top_k=4, hidden=128, expert_intermediate=128)
    assert [q.uniform_precision(b, spec) for b in q.BUDGETS] == ["int2", "int3", "int4", "int3", "int4"]
    assert q.level_overrides("static_uniform", "bf16_25pct", spec) == ["policy.precision=int3"]
    assert q.level_overrides("dynaexq", "all_int3", spec) == ["policy.low_precision=int2"]
    assert q.level_overrides("dynaexq", "bf16_50pct", spec) == []      # int4 fits with room to spare
    assert q.level_overrides("mxmoe", "all_int2", spec) == []


def test_gap_recovered_and_spearman() -> None:
    rows = [q.RunRow("static_uniform", "b", "w", proxy=0.4, kl_mean=0.2),
            q.RunRow("static_frequency", "b", "w", proxy=0.2, kl_mean=0.1),
            q.RunRow("dynaexq", "b", "w", proxy=0.1, kl_mean=0.05),
            q.RunRow("hobbit", "b", "w", status="infeasible: x")]
    df = qr.frame(rows)
    gaps = qr.gap_rows(df)
    assert gaps.policy.tolist() == ["dynaexq"]
    g = gaps.iloc[0]
    assert (g.measured_vs_static_uniform, g.predicted_vs_static_uniform) == pytest.approx((0.75, 0.75))
    assert g.measured_vs_static_frequency == pytest.approx(0.5)
    assert qr.spearman_of(df) == (pytest.approx(1.0), 3)


@pytest.mark.slow
def test_one_measured_run_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moebits.train import corpus

    try:
        corpus.build(tmp_path / "corpus")
    except corpus.CorpusError as exc:
        pytest.skip(f"the corpus needs the manifest's Python: {exc}")
    rows, facts = q.run_study(_paths(tmp_path / "corpus"), ["static_uniform", "lru_offload"], ["all_int4"],
                              ["evaluation_prose"], progress=False)
    su, lru = rows
    assert su.status == lru.status == "ok"
    assert su.kl_mean > 0 and su.proxy > 0 and lru.kl_mean == pytest.approx(0.0, abs=1e-9)
    assert 0.5 < su.proxy * 8 / su.kl_mean < 2.0        # the measured table's unit: proxy x layers ~ KL
    assert facts["bf16_bpb"]["evaluation_prose"] < su.bpb


def test_offline_policies_default_to_the_traces_calibration_profile() -> None:
    from moebits.sim.runner import build_engine

    cfg = q.compose_run("static_frequency", "bf16_50pct", TRACE, None, CAL, [])
    _, info = build_engine(cfg)
    assert info["profile"].startswith(str(PROFILE)) and "CALIBRATION" in info["profile"]
    cfg = q.compose_run("static_frequency", "bf16_50pct", PROFILE, None, CAL, [])  # names no profile itself
    assert build_engine(cfg)[1]["profile"].startswith("in-sample")


def test_profiles_come_from_calibration_of_the_same_or_the_other_kind() -> None:
    d = Path("t")
    assert q.profile_for("evaluation_code", d) == d / "calibration_code.parquet"
    assert q.profile_for("evaluation_code", d, "other") == d / "calibration_prose.parquet"
    with pytest.raises(ValueError, match="same' or 'other"):
        q.profile_for("evaluation_code", d, "mixed")
