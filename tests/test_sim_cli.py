"""``moebits sim`` end to end: one-line errors for bad settings, result files, and a sweep
that resumes by skipping finished runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model=olmoe_1b_7b", "workload=synth", "workload.seqs=2", "workload.prompt_tokens=4",
         "workload.decode_tokens=6", "budget_gb=4", "progress=false"]


def sim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "moebits.sim", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_preset_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(sim("hardware=h200_magic", cwd=tmp_path), "unknown hardware preset 'h200_magic'", "rtx4090")


def test_impossible_budget_stops_before_simulating(tmp_path: Path) -> None:
    proc = sim(*SMALL, "budget_gb=0.01", "workload.batch=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(proc, "budget", "raise budget_gb")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_run_writes_results_and_a_sweep_resumes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *SMALL, "policy=lru_offload,static_uniform", f"hydra.sweep.dir={sweep}"]
    first = sim(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert len(runs) == 2
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        for key in ("ttft_ms", "tpot_ms_p50", "tpot_ms_p99", "tokens_per_s", "stall_s", "h2d_bytes",
                    "hbm_peak_bytes", "quality_proxy", "layer_steps", "wall_s", "layer_steps_per_s"):
            assert key in summary, key
        assert summary["layer_steps"] == 2 * 7 * 16  # 2 sequences x (prefill + 6 decode passes) x 16 layers
        steps = pd.read_parquet(run / "steps.parquet")
        assert len(steps) == 2 * 7 and (run / "figure.png").stat().st_size > 0 and (run / "figure.pdf").exists()
        assert (run / ".hydra" / "config.yaml").exists()
        assert "lru_offload" in (run / "app.log").read_text() or "static_uniform" in (run / "app.log").read_text()
    assert "2 runs: 2 ok, 0 infeasible, 0 failed (0 reused" in first.stderr
    again = sim(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 runs: 2 ok, 0 infeasible, 0 failed (2 reused" in again.stderr


def test_ignored_workload_settings_are_refused(tmp_path: Path) -> None:
    """Settings the chosen workload never reads would make the saved config lie."""
    assert_one_line_error(sim("workload.path=x.parquet", cwd=tmp_path), "workload.path=x.parquet has no effect",
                          "workload=file")
    assert_one_line_error(sim("workload.seqs=3", "workload.decode_tokens=5", cwd=tmp_path),
                          "workload.seqs=3, workload.decode_tokens=5 has no effect with workload=default", "workload=synth")


def test_model_name_spelling_is_accepted_with_a_hint(tmp_path: Path) -> None:
    proc = sim(*SMALL[1:], "model=OLMoE-1B-7B", "figure=false", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model=olmoe_1b_7b (was OLMoE-1B-7B)" in proc.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["model"] == "OLMoE-1B-7B"


def test_single_run_logs_to_app_log_and_names_its_files(tmp_path: Path) -> None:
    proc = sim(*SMALL, "figure=false", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "r" / "app.log").read_text()
    assert "TPOT p50" in log and "TPOT p50" in proc.stdout
    assert "app.log, outcome.json, steps.parquet, summary.json" in proc.stdout
    assert "synthetic(seed=0): a SYNTHETIC sensitivity table" in proc.stdout
