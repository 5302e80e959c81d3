"""Calibration on CPU with tiny sizes: the profile it writes is a valid ``conf/hardware`` preset
that the simulator can load, and its link curve reproduces the measured copy times."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.runtime.calibrate import CalibrateOptions, calibrate, link_curve, read_profile, write_profile  # noqa: E402

SPEC = ModelSpec("cal", layers=1, experts=4, top_k=2, hidden=128, expert_intermediate=128, attention_params=65536,
                 vocab_size=64)


def test_link_curve_reproduces_its_points() -> None:
    sizes, secs = [1e3, 1e5, 1e7], [5e-6, 7e-6, 2.1e-4]
    curve = link_curve(sizes, secs)  # type: ignore[arg-type]
    assert curve.latency_s >= 0
    for s, t in zip(sizes, secs, strict=True):
        assert curve.time_s(s) == pytest.approx(t, rel=1e-6)


def test_calibrate_writes_a_loadable_profile(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    opt = CalibrateOptions(runtime="eager", small=True, precisions=("bf16", "int4"), tokens=(1, 4), reps=2)
    hw = calibrate(SPEC, torch.device("cpu"), opt, log=lambda s: None)
    assert hw.name == "calibrated_cpu" and hw.launch_s > 0 and hw.non_moe_launches >= 1
    assert hw.calibration["runtime"] == "eager" and not hw.fused_moe and hw.non_moe_table is None
    assert {(t.precision, t.hidden, t.intermediate) for t in hw.kernel_tables} == {("bf16", 128, 128), ("int4", 128, 128)}
    assert all(len(t.seconds) == 2 and min(t.seconds) >= 0 for t in hw.kernel_tables)
    path = write_profile(hw, tmp_path / "calibrated_cpu.yaml")
    assert path.read_text().splitlines()[1:4] == ["defaults:", "  - base_hardware", "  - _self_"]
    back = read_profile(path)
    assert back.name == hw.name and back.kernel_table("int4", 128, 128) is not None
    assert back.h2d.time_s(1 << 20) == pytest.approx(hw.h2d.time_s(1 << 20), rel=1e-4)
