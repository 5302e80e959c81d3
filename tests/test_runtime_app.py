"""``moebits runtime`` end to end on CPU with tiny settings, its config, and its result files'
agreement with the simulator's (the same summary keys and steps.parquet columns)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hydra import compose, initialize_config_dir  # noqa: E402
from moebits.core.config import BudgetConfig, ModelConfig, WorkloadConfig, WorkloadKind, unknown_preset  # noqa: E402
from moebits.drive.records import pass_table  # noqa: E402
from moebits.policies.static_uniform import StaticUniformConfig  # noqa: E402
from moebits.runtime.app import CONF_DIR, check_compose, main, presets, register_configs  # noqa: E402
from moebits.runtime.runner import Mode, RuntimeRunConfig, execute  # noqa: E402
from moebits.sim import runner as sim_runner  # noqa: E402
from moebits.sim.config import RunConfig  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["runtime.layers=1", "runtime.scale=0.0625", "runtime.vocab=256", "workload.seqs=2", "workload.batch=2",
             "workload.prompt_tokens=4", "workload.decode_tokens=3", "budget=bf16_50pct", "progress=false"]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _compose(*overrides: str) -> RuntimeRunConfig:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("runtime", overrides=list(overrides)))
    assert isinstance(cfg, RuntimeRunConfig)
    return cfg


def _sim_keys(tmp_path: Path) -> tuple[set[str], set[str]]:
    """The simulator's summary keys and steps.parquet columns, from a tiny run of its own."""
    cfg = RunConfig(model=ModelConfig(from_trace=True), hardware=_compose().hardware, policy=StaticUniformConfig(),
                    workload=WorkloadConfig(kind=WorkloadKind.DEFAULT, max_seqs=1), budget=BudgetConfig("int4"),
                    progress=False, figure=False, quality_table="analytic")
    result, summary = sim_runner.simulate(cfg)
    return set(summary), set(pass_table(result).columns)


def test_config_composes_and_bad_input_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _compose("policy=lru_offload", "runtime.mode=REPLAY", "runtime.layers=3")
    assert cfg.runtime.mode is Mode.REPLAY and cfg.runtime.layers == 3 and cfg.policy.name == "lru_offload"
    assert _compose().policy.name == "dynaexq"
    assert unknown_preset(["policy=nope"], {"policy": presets("policy")}).startswith("unknown policy preset 'nope'")
    msg = check_compose("runtime", ["runtime.layrs=2"])
    assert msg is not None and "layrs" in msg and "\n" not in msg
    monkeypatch.setattr(sys, "argv", ["runtime", "policy=nope"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown policy preset 'nope'")


def test_cli_generates_on_cpu_and_writes_the_simulators_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "moebits.runtime", *TINY_ARGS, f"hydra.run.dir={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TPOT p50" in proc.stdout and "KL vs bf16" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    steps = pd.read_parquet(out / "steps.parquet")
    sim_summary, sim_columns = _sim_keys(tmp_path)
    assert sim_summary - {"kernel_source"} <= set(summary)
    assert sim_columns - {"act_int4"} <= set(steps.columns) and "kl" in steps.columns
    assert summary["device"] == "cpu" and summary["mode"] == "GENERATE" and summary["layer_steps"] == 4
    assert summary["tpot_ms_p50"] > 0 and summary["kl_mean"] is not None and summary["kl_mean"] >= 0
    assert summary["hbm_peak_bytes"] <= summary["budget_bytes"]
    assert list(steps["phase"]) == ["prefill", "decode", "decode", "decode"]


def test_replay_mode_runs_the_embedded_trace() -> None:
    cfg = _compose("runtime.mode=REPLAY", "runtime.layers=2", "runtime.scale=0.0625", "workload=default",
                   "workload.max_seqs=1", "policy=lru_offload", "budget=bf16_50pct", "progress=false")
    rec, summary = execute(cfg)
    assert summary["mode"] == "REPLAY" and summary["layer_steps"] == rec.layer_steps > 0
    assert summary["promotions"] > 0 and summary["h2d_weight_bytes"] == summary["promotions"] * (
        summary["runtime_model"]["hidden"] * summary["runtime_model"]["expert_intermediate"] * 3 * 2)
    _, synth = execute(_compose("runtime.mode=REPLAY", "runtime.scale=0.0625", "workload=synth", "workload.seqs=1",
                                "workload.prompt_tokens=2", "workload.decode_tokens=2", "policy=lru_offload",
                                "budget=bf16_50pct", "progress=false"))
    assert synth["workload"] == "synth(seed=0)" and synth["layer_steps"] == 3 * 2  # 3 passes x 2 layers
