"""Hardware presets, the PCIe link, the kernel-time model and the quality proxy's tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from moebits.core.hardware import HardwareProfile, KernelTable, LinkCurve
from moebits.core.model_spec import get_model_spec
from moebits.core.quality import SensitivityTable, analytic_error, read_sensitivity, write_sensitivity
from moebits.sim.kernels import KernelModel
from moebits.sim.link import Link
from sim_testkit import round_hw

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"
QWEN = get_model_spec("Qwen3-30B-A3B")
MiB = 1 << 20


def preset(name: str) -> HardwareProfile:
    body = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    body.pop("defaults")
    return HardwareProfile.from_dict(body)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_presets_load_and_round_trip(name: str) -> None:
    hw = preset(name)
    assert hw.name == name
    assert HardwareProfile.from_dict(hw.to_dict()) == hw


def test_h100_link_matches_the_measured_pinned_copies() -> None:
    h2d = preset("h100_pcie5").h2d
    for nbytes, gbps in ((MiB, 36.0), (4 * MiB, 49.0), (16 * MiB, 53.5)):
        assert nbytes / h2d.time_s(nbytes) / 1e9 == pytest.approx(gbps, rel=0.01)
    assert h2d.time_s(1) == pytest.approx(4.5e-6, rel=1e-3)
    assert 1024 * MiB / h2d.time_s(1024 * MiB) / 1e9 == pytest.approx(55.0, rel=0.01)


@pytest.mark.parametrize("name", ["rtx4090", "a6000"])
def test_gen4_presets_copy_at_about_25_gbps(name: str) -> None:
    h2d = preset(name).h2d
    assert 64 * MiB / h2d.time_s(64 * MiB) / 1e9 == pytest.approx(25.0, rel=0.02)


def test_link_is_a_fifo() -> None:
    link = Link(LinkCurve(0.0, [1.0], [1.0]))  # 1 GB/s: 1e6 B take 1 ms
    assert link.submit(0.0, 10**6) == pytest.approx(1e-3)
    assert link.submit(0.5e-3, 10**6) == pytest.approx(2e-3)  # queued behind the first
    assert link.submit(5e-3, 10**6) == pytest.approx(6e-3)  # idle link starts at once
    assert (link.bytes_total, link.copies) == (3 * 10**6, 3)


def test_h100_grouped_expert_launches_match_design_measurements() -> None:
    km = KernelModel(preset("h100_pcie5"), QWEN, ["bf16", "fp8", "int8"])
    # 8 experts, each token routed to all 8: tokens per launch = 8 * tokens per expert
    for m, us in ((1, 106), (16, 301), (128, 479)):
        assert km.group_s(0, 8 * m, 8) == pytest.approx(us * 1e-6)
    for m, us in ((1, 130), (128, 302)):
        assert km.group_s(1, 8 * m, 8) == pytest.approx(us * 1e-6)
    assert (km.source(0), km.source(2)) == ("table", "roofline")


def test_roofline_is_memory_bound_for_few_tokens_and_compute_bound_for_many() -> None:
    hw = preset("h100_pcie5")
    km = KernelModel(hw, QWEN, ["int8"])
    mem = QWEN.expert_bytes("int8") / (hw.hbm_gbps * 1e9)
    assert km.per_expert_s(0, np.array([1.0]))[0] == pytest.approx(mem)
    many = 1e5
    assert km.per_expert_s(0, np.array([many]))[0] == pytest.approx(many * QWEN.expert_flops_per_token() / hw.peak_flops("int8"))


def test_kernel_table_interpolates_and_extends_the_last_slope() -> None:
    t = KernelTable("bf16", 1, 1, tokens=[1, 3], seconds=[1.0, 2.0])
    assert t.per_expert_s(np.array([1.0, 2.0, 3.0, 5.0])).tolist() == [1.0, 1.5, 2.0, 3.0]
    single = KernelTable("bf16", 1, 1, tokens=[2], seconds=[4.0])
    assert single.per_expert_s(np.array([1.0, 4.0])).tolist() == [4.0, 8.0]


def test_non_moe_time_scales_with_tokens_once_compute_bound() -> None:
    km = KernelModel(round_hw(peak_tflops={"bf16": 1e-6}), QWEN, ["bf16"])
    t = km.non_moe_s(np.array([1, 2]))
    assert t[1] - t[0] == pytest.approx(QWEN.non_expert_flops_per_token_per_layer / 1e6)  # 1e-6 TFLOP/s


@pytest.mark.parametrize("bad, match", [
    ({"bogus": 1}, "unknown hardware profile field"),
    ({"h2d": {"latency_s": 0, "sizes_bytes": [2, 1], "gbps": [1, 1]}}, "strictly ascending"),
    ({"peak_tflops": {"fp8": 1.0}}, '"bf16" entry'),
    ({"hbm_gbps": 0}, '"hbm_gbps" must be > 0'),
])
def test_bad_profiles_fail_with_one_clear_message(bad: dict, match: str) -> None:
    body = preset("rtx4090").to_dict()
    body.update(bad)
    with pytest.raises(ValueError, match=match):
        HardwareProfile.from_dict(body)


def test_analytic_errors_order_by_bits() -> None:
    errs = [analytic_error(p) for p in ("bf16", "int8", "fp8", "int4", "int3", "int2")]
    assert errs[0] == 0.0 and errs == sorted(errs)
    assert analytic_error("int4") == pytest.approx(0.0995, rel=0.01)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_sensitivity_table_round_trip_and_fallback(tmp_path: Path, suffix: str) -> None:
    table = SensitivityTable(layer=np.array([0, 1]), expert=np.array([2, 0]), precision=["int4", "int2"],
                             error=np.array([0.5, 0.25]), extra={"dataset": ["a", "b"]})
    back = read_sensitivity(write_sensitivity(table, tmp_path / f"s{suffix}"))
    assert back.precision == table.precision and np.array_equal(back.error, table.error)
    arr = back.error_array(2, 3, ["bf16", "int4"])
    assert arr[0, 2, 1] == 0.5 and arr[1, 0, 1] == pytest.approx(analytic_error("int4"))
    assert arr[:, :, 0].max() == 0.0


def test_sensitivity_table_problems_are_one_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,expert,error\n0,0,0.1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['precision'\]"):
        read_sensitivity(bad)
    with pytest.raises(ValueError, match="outside the model"):
        SensitivityTable(np.array([5]), np.array([0]), ["int4"], np.array([0.1])).error_array(2, 2, ["int4"])
