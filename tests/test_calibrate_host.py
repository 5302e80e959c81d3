"""``moebits analysis calibrate-host`` on the CPU: measure tiny synthetic cases, fit, write a profile."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

from moebits.analysis.__main__ import main  # noqa: E402
from moebits.core.hardware import HardwareProfile  # noqa: E402

TINY = "workload=synth workload.seqs=1 workload.prompt_tokens=4 workload.decode_tokens=6 runtime.layers=2"


def _cases(tmp_path: Path, names: tuple[str, ...]) -> Path:
    lines = {
        "cal_whole_static": f"{TINY} policy=static_uniform budget=all_int4 route_lag=2",
        "cal_whole_dynaexq": f"{TINY} policy=dynaexq budget=bf16_50pct route_lag=2",
        "cal_layer_static": f"{TINY} policy=static_uniform budget=all_int4 route_lag=0",
        "val_static": f"{TINY} policy=static_uniform budget=all_int4 route_lag=2",
    }
    path = tmp_path / "cases.txt"
    path.write_text("# tiny calibration cases\n" + "".join(f"{n} {lines[n]}\n" for n in names))
    return path


def test_measures_fits_and_writes_a_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = _cases(tmp_path, ("cal_whole_static", "cal_whole_dynaexq", "cal_layer_static"))
    out = tmp_path / "prof.yaml"
    assert main(["calibrate-host", "--hardware", "calibrated_h200", "--out", str(out), "--measured",
                 str(tmp_path / "m"), "--cases-file", str(cases)]) == 0
    body = yaml.safe_load(out.read_text())
    assert body["defaults"]                                   # still a hydra preset
    body.pop("defaults")
    hw = HardwareProfile.from_dict(body)
    assert hw.host_costs is not None and hw.host_costs.pass_s > 0 and "dynaexq" in hw.host_costs.observe_s
    assert hw.layer_sync_s > 0 and "calibrate-host" in hw.source
    assert sorted(p.name for p in (tmp_path / "m").glob("*.measured.npz")) == [
        "cal_layer_static.measured.npz", "cal_whole_dynaexq.measured.npz", "cal_whole_static.measured.npz"]
    again = tmp_path / "again.yaml"   # --fit-only refits the kept runs: the same costs
    assert main(["calibrate-host", "--fit-only", "--hardware", "calibrated_h200", "--out", str(again),
                 "--measured", str(tmp_path / "m")]) == 0
    b2 = yaml.safe_load(again.read_text())
    assert b2["host_costs"] == yaml.safe_load(out.read_text())["host_costs"]
    assert "observe dynaexq" in capsys.readouterr().out


def test_a_case_not_named_cal_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = _cases(tmp_path, ("cal_whole_static", "val_static"))
    rc = main(["calibrate-host", "--hardware", "calibrated_h200", "--out", str(tmp_path / "p.yaml"), "--measured",
               str(tmp_path / "m"), "--cases-file", str(cases)])
    assert rc == 2 and "val_static" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "p.yaml").exists()


def test_fit_only_without_runs_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["calibrate-host", "--fit-only", "--hardware", "calibrated_h200", "--out", str(tmp_path / "p.yaml"),
               "--measured", str(tmp_path)])
    assert rc == 2 and "no measured run with a host log" in capsys.readouterr().err
