"""Fidelity on the CPU: calibrate (both runtime paths, tiny sizes), then one trace through the
runtime and the simulator; the comparison's bookkeeping is exact, decisions match, and the
outputs (fidelity.json, plot, table) are written. Timing bounds only on a GPU (``gpu``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from moebits.analysis.fidelity import (  # noqa: E402
    compare,
    first_divergence,
    moe_only,
    resimulate,
    summary_md,
    validate,
)
from moebits.core.hardware import HardwareProfile, HostCosts  # noqa: E402
from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.drive.records import COUNTERS, RunResult, load_run, pass_table  # noqa: E402
from moebits.runtime.calibrate import (  # noqa: E402
    SMALL_DESIGNS,
    CalibrateOptions,
    calibrate,
    read_profile,
    write_profile,
)

SPEC = ModelSpec("cal", layers=1, experts=16, top_k=4, hidden=128, expert_intermediate=128, attention_params=65536,
                 vocab_size=64)
ROOT = Path(__file__).resolve().parents[1]
CASE = ["workload.max_seqs=1", "progress=false", "runtime.layers=1"]


@pytest.fixture(scope="module")
def graph_profile(tmp_path_factory: pytest.TempPathFactory) -> HardwareProfile:
    torch.set_num_threads(1)
    opt = CalibrateOptions(runtime="graph", small=True, precisions=("bf16", "int4"), tokens=(1, 2), rows=(1, 4),
                           context=8, reps=2, designs=SMALL_DESIGNS)
    hw = calibrate(SPEC, torch.device("cpu"), opt, log=lambda s: None)
    path = write_profile(hw, tmp_path_factory.mktemp("hw") / "cal_graph.yaml")
    return read_profile(path)


def test_graph_calibration_writes_the_graph_fields(graph_profile: HardwareProfile) -> None:
    hw = graph_profile
    assert hw.fused_moe and hw.expert_launch_ops == 2 and hw.step_overhead_s > 0
    assert hw.non_moe_table is not None and hw.non_moe_table.tokens == [1.0, 4.0] and hw.non_moe_table.context == 8
    assert {t.precision for t in hw.kernel_tables} == {"bf16", "int4"}
    decode = hw.graph_table(SPEC, prefill=False)
    assert decode is not None and decode.rows == [1.0, 2.0] and set(decode.token_s) == {"bf16", "int4"}
    assert hw.graph_table(SPEC, prefill=True) is not None
    assert hw.calibration["runtime"] == "graph" and hw.calibration["gpu"] == "cpu" and "torch" in hw.calibration
    assert {"embed_head_s", "routing_readback_s", "table_upload_s"} <= set(hw.calibration)


def _result(ends: list[float], act: list[list[int]], promotions: list[int]) -> RunResult:
    """One batch of len(ends) one-layer passes (pass 0 the prefill) of one token each."""
    n = len(ends)
    snaps = np.zeros((n, len(COUNTERS)), np.int64)
    snaps[:, COUNTERS.index("promotions")] = promotions
    zeros = np.zeros(n)
    return RunResult(precisions=["bf16"], ls_batch=np.zeros(n, np.int32), ls_pass=np.arange(n),
                     ls_tokens=np.ones(n, np.int32), end_s=np.asarray(ends), stall_s=zeros, host_wait_s=zeros,
                     err=zeros, act=np.asarray(act), snaps=snaps, hits=np.zeros(n, np.int64),
                     requests=np.ones(n, np.int64))


def test_compare_is_exact_on_a_hand_built_pair() -> None:
    meas = _result([1.0, 2.0, 4.0], [[1, 0], [1, 0], [1, 0]], [0, 1, 1])   # passes: 1 (prefill), 1, 2 s
    sim = _result([1.1, 2.0, 4.2], [[1, 0], [1, 0], [1, 0]], [0, 1, 1])    # passes: 1.1, 0.9, 2.2 s
    c = compare(meas, sim, {"case": "x"})
    assert c.passes["rel_err"].round(6).tolist() == [0.1, -0.1, 0.1]
    assert c.row["tpot_ms_measured"] == pytest.approx(1500) and c.row["tpot_ms_simulated"] == pytest.approx(1550)
    assert c.row["tpot_err"] == pytest.approx(50 / 1500) and c.row["ttft_err"] == pytest.approx(0.1)
    assert c.row["decisions_match"] and c.row["step_err_max"] == pytest.approx(0.1)
    other = _result([1.1, 2.0, 4.2], [[1, 0], [0, 1], [1, 0]], [0, 1, 1])
    assert "layer step 1" in str(first_divergence(meas, other))
    late = _result([1.1, 2.0, 4.2], [[1, 0], [1, 0], [1, 0]], [0, 0, 1])
    assert "pass 1" in str(first_divergence(meas, late))
    assert "DIFFER" not in summary_md([c.row]) and "target" in summary_md([c.row])


def test_moe_only_zeroes_the_non_moe_part(graph_profile: HardwareProfile) -> None:
    from moebits.sim.kernels import KernelModel

    km = KernelModel(moe_only(graph_profile), SPEC, ["int4"])
    assert km.non_moe_s(np.array([1, 4]), np.array([True, False])).tolist() == [km.launch_group_s] * 2


@pytest.mark.parametrize("policy", [["policy=static_uniform", "budget=all_int4"], ["policy=dynaexq"]])
def test_validate_end_to_end_on_cpu(tmp_path: Path, graph_profile: HardwareProfile, policy: list[str]) -> None:
    torch.set_num_threads(1)
    c = validate([*policy, *CASE], graph_profile, tmp_path, label=policy[0])
    assert c.row["decisions_match"], c.row["first_divergence"]
    assert c.row["trace"].endswith("default.parquet") and c.row["layers"] == 1
    assert c.row["tpot_ms_measured"] > 0 and c.row["tpot_ms_simulated"] > 0
    assert c.row["promotions_measured"] == c.row["promotions_simulated"]
    rows = json.loads((tmp_path / "fidelity.json").read_text())
    assert [r["case"] for r in rows] == [policy[0]]
    assert (tmp_path / f"{policy[0].replace('=', '_')}.png").stat().st_size > 0
    assert len(c.passes) == c.row["passes"] == 129  # one sequence: prefill + 128 decode passes


def test_graph_path_validates_and_resimulates_on_cpu(tmp_path: Path, graph_profile: HardwareProfile,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.engine=GRAPH on the per-pass seam (route_lag 2): decisions match the simulator's
    sim.passes; the measured run is kept and graded again offline (--resim) with the same rows."""
    torch.set_num_threads(1)
    case = ["policy=dynaexq", "route_lag=2", "runtime.engine=GRAPH", "runtime.vocab=64", *CASE]
    c = validate(case, graph_profile, tmp_path / "m", label="dyn")
    assert c.row["decisions_match"], c.row["first_divergence"]
    assert c.row["runtime_path"] == "graph_eager" and c.row["route_lag"] == 2 and c.row["promotions_measured"] > 0
    again = resimulate(tmp_path / "m", graph_profile, tmp_path / "r")
    assert len(again) == 1 and again[0].row["decisions_match"]
    for key in ("tpot_ms_measured", "tpot_ms_simulated", "promotions_simulated", "passes", "host_probe_us",
                "busy_ms_measured", "busy_ms_simulated"):
        assert again[0].row[key] == c.row[key], key
    # each pass's own device time (its graph, no host gap) is measured, kept, and inside the pass's latency
    meas = pass_table(load_run(tmp_path / "m" / "dyn.measured.npz"))
    assert (meas["busy_s"] > 0).all() and (meas["busy_s"][1:] <= meas["latency_s"][1:]).all()
    assert c.row["busy_err"] is not None and "measured_busy_s" in c.passes
    assert c.row["host_probe_us"] > 0 and c.row["host_speed"] is None   # the profile's host costs: no probe
    assert c.row["trace"] == "traces/data/default.parquet"                 # named relative to the repository
    from moebits.analysis.__main__ import main as analysis_main  # several measured folders, one table
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(graph_profile.to_dict()))
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "dyn2.measured.npz").write_bytes((tmp_path / "m" / "dyn.measured.npz").read_bytes())
    case = json.loads((tmp_path / "m" / "dyn.case.json").read_text()) | {"case": "dyn2"}
    (tmp_path / "m2" / "dyn2.case.json").write_text(json.dumps(case))
    assert analysis_main(["validate", "--resim", str(tmp_path / "m"), str(tmp_path / "m2"), "--hardware", str(prof),
                          "--out", str(tmp_path / "two")]) == 0
    assert [r["case"] for r in json.loads((tmp_path / "two" / "fidelity.json").read_text())] == ["dyn", "dyn2"]
    # host costs fitted at half the run's probe: the run's host was 2x slower, and the simulator is handed
    # the profile priced so (host_speed=False: as fitted)
    import moebits.analysis.fidelity as fid

    hc = HostCosts(pass_s=2e-3, observe_s={"dynaexq": [1e-3, 0.0]}, probe_s=c.row["host_probe_us"] * 0.5e-6)
    seen: list[HardwareProfile] = []
    real = fid.simulate_like
    monkeypatch.setattr(fid, "simulate_like", lambda cfg, dev, hw, summary: (seen.append(hw), real(cfg, dev, hw, summary))[1])
    slow = resimulate(tmp_path / "m", dataclasses.replace(graph_profile, host_costs=hc), tmp_path / "s")[0].row
    ref = resimulate(tmp_path / "m", dataclasses.replace(graph_profile, host_costs=hc), tmp_path / "t",
                     host_speed=False)[0].row
    assert slow["host_speed"] == pytest.approx(0.5) and slow["host_speed_applied"] and not ref["host_speed_applied"]
    assert [h.host_costs.pass_s for h in seen if h.host_costs] == [pytest.approx(4e-3), 2e-3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fidelity_on_the_gpu_loose_bounds(tmp_path: Path) -> None:
    """Calibrate the graph path quickly (whole-pass designs, then the host side on two synthetic cases of
    benchmarks/graph_cases_calibration.txt) and validate static int4 and dynaexq on the embedded trace on
    whole-step graphs: decisions match, TPOT within 10%."""
    path = tmp_path / "cal.yaml"
    from moebits.analysis.__main__ import main as analysis_main
    from moebits.runtime.calibrate import main

    main(["--runtime", "graph", "--quick", "--precisions", "bf16,int4", "--out", str(path)])
    cal = [ln for ln in (ROOT / "benchmarks" / "graph_cases_calibration.txt").read_text().splitlines()
           if ln.split()[:1] in (["cal_whole_static"], ["cal_whole_dynaexq"])]
    (tmp_path / "cal.txt").write_text("\n".join(cal) + "\n")
    assert analysis_main(["calibrate-host", "--hardware", str(path), "--out", str(path), "--measured",
                          str(tmp_path / "host"), "--cases-file", str(tmp_path / "cal.txt")]) == 0
    assert read_profile(path).host_costs is not None and read_profile(path).host_costs.probe_s > 0
    for case in (["policy=static_uniform", "budget=all_int4"], ["policy=dynaexq", "budget=bf16_50pct"]):
        c = validate([*case, "runtime.engine=GRAPH", "route_lag=2", "runtime.layers=8", "workload.max_seqs=1",
                      "progress=false"], read_profile(path), tmp_path, label=case[0])
        assert c.row["decisions_match"], c.row["first_divergence"]
        assert abs(c.row["tpot_err"]) < 0.10, c.row


def test_attention_shape_follows_the_spec() -> None:
    from moebits.core.model_spec import get_model_spec
    from moebits.runtime.calibrate_graph import attn_shape

    s = attn_shape(get_model_spec("Qwen3-30B-A3B"))
    assert (s.heads, s.kv_heads, s.head_dim) == (32, 4, 128)   # the model's own config


def test_repeatability_pairs_a_case_with_its_second_measurement() -> None:
    from moebits.analysis.fidelity import repeatability

    rows = [{"case": "a", "tpot_ms_measured": 1.0, "tpot_p50_ms_measured": 0.9, "tpot_err": 0.1, "tpot_p50_err": 0.0},
            {"case": "a_r2", "tpot_ms_measured": 3.0, "tpot_p50_ms_measured": 0.9, "tpot_err": -0.5,
             "tpot_p50_err": 0.0},
            {"case": "b", "tpot_ms_measured": 2.0, "tpot_p50_ms_measured": 2.0, "tpot_err": 0.02, "tpot_p50_err": 0.01},
            {"case": "b_s2", "tpot_ms_measured": 2.2, "tpot_p50_ms_measured": 2.0, "tpot_err": -0.08,
             "tpot_p50_err": 0.01}]
    for r in rows:
        r |= {"step_err_p95": 0.01, "decisions_match": True}
    rep = repeatability(rows)
    assert [r["case"] for r in rep] == ["a"]
    assert rep[0]["tpot_spread"] == pytest.approx(1.0) and rep[0]["tpot_p50_spread"] == 0.0
    text = summary_md(rows)
    assert "minutes apart in one call (1 cases measured twice): mean TPOT differs by 100.00%" in text
    assert "a later device call (1 cases measured twice): mean TPOT differs by 9.52%" in text
    assert "mean |TPOT error| 6.67%" in text   # the repeat (a_r2) is not graded; the later call's b_s2 is


def test_a_calibration_profile_is_cut_to_the_replayed_layers(tmp_path: Path) -> None:
    """The trained model's trace replayed on 2 of its 8 layers (the CPU's default) with a policy that reads the
    trace's CALIBRATION profile: the profile is cut to the same 2 layers in the runtime and the simulator."""
    torch.set_num_threads(1)
    case = ["model=trace", "workload=file", "workload.path=train/data/traces/evaluation_code.parquet",
            "workload.max_seqs=1", "policy=static_frequency", "budget=bf16_50pct", "route_lag=2",
            "runtime.engine=GRAPH", "progress=false"]
    c = validate(case, read_profile(Path("conf/hardware/calibrated_h200.yaml")), tmp_path, label="sf")
    assert c.row["decisions_match"] and c.row["layers"] == 2


def test_error_vs_spread_grades_against_the_two_calls_mean(tmp_path: Path) -> None:
    """A case measured in two calls: its spread is |a - b| / mean, the error is the mean prediction against the
    mean measurement; calibration cases and unpaired cases are left out; the summary says how many are below."""
    from moebits.analysis.fidelity import error_vs_spread, spread_plot

    def row(case: str, meas: float, sim: float, path: str = "graph_whole") -> dict:
        return {"case": case, "runtime_path": path, "policy": "p", "tpot_ms_measured": meas, "tpot_ms_simulated": sim,
                "tpot_err": sim / meas - 1, "decisions_match": True}

    rows = [row("a", 1.0, 1.05), row("a_s2", 1.2, 1.15),          # spread 0.2/1.1, error |1.1/1.1 - 1| = 0
            row("b", 2.0, 2.4, "graph_layer"), row("b_s2", 2.0, 2.4, "graph_layer"),   # spread 0, error 20%
            row("c", 1.0, 1.0), row("cal_x", 1.0, 2.0), row("cal_x_s2", 1.0, 2.0)]
    pts = {q["case"]: q for q in error_vs_spread(rows)}
    assert sorted(pts) == ["a", "b"]
    assert pts["a"]["spread"] == pytest.approx(0.2 / 1.1) and pts["a"]["error"] == pytest.approx(0.0, abs=1e-12)
    assert pts["b"]["spread"] == 0.0 and pts["b"]["error"] == pytest.approx(0.2)
    text = summary_md(rows)
    assert "below the two calls' own spread in 1 of 1 cases" in text and "graph_layer: against the mean" in text
    spread_plot(list(pts.values()), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_by_policy_pools_each_policys_rows_and_spread(tmp_path: Path) -> None:
    from moebits.analysis.fidelity import by_policy, policy_plot

    def row(case: str, policy: str, meas: float, sim: float, path: str) -> dict:
        return {"case": case, "runtime_path": path, "policy": policy, "tpot_ms_measured": meas,
                "tpot_ms_simulated": sim, "tpot_err": sim / meas - 1, "decisions_match": True}

    rows = [row("s", "static", 1.0, 1.01, "graph_whole"), row("s_s2", "static", 1.02, 1.01, "graph_whole"),
            row("l", "lru", 2.0, 2.2, "graph_layer"), row("cal_l", "lru", 1.0, 9.0, "graph_layer"),
            row("l_r2", "lru", 1.0, 9.0, "graph_layer")]
    stats = {q["policy"]: q for q in by_policy(rows)}
    assert [q["policy"] for q in by_policy(rows)] == ["static", "lru"]          # whole-step first
    assert stats["static"]["runs"] == 2 and stats["static"]["spread"] == pytest.approx(0.02 / 1.01)
    assert stats["static"]["error"] == pytest.approx((0.01 + abs(1.01 / 1.02 - 1)) / 2)
    assert stats["lru"]["runs"] == 1 and stats["lru"]["error"] == pytest.approx(0.1) and stats["lru"]["spread"] is None
    policy_plot(list(stats.values()), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
