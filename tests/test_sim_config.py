"""Every option of every config group composes to its schema type (hydra ``compose``), and
the in-process checks that stop a bad run before it simulates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from moebits.core.config import GROUPS, one_line, unknown_preset
from moebits.core.hardware import HardwareProfile
from moebits.core.model_spec import MODEL_PRESETS
from moebits.policies.base import policy_configs
from moebits.sim.app import CONF_DIR, presets
from moebits.sim.config import (
    ModelConfig,
    RunConfig,
    WorkloadConfig,
    WorkloadKind,
    preset_stem,
    register_configs,
)
from moebits.sim.engine import InfeasibleError
from moebits.sim.runner import build_engine
from moebits.traces.format import write_trace
from omegaconf import OmegaConf
from sim_testkit import TINY, make_trace


@pytest.fixture(scope="module")
def hydra_ctx() -> Iterator[None]:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def run_config(*overrides: str) -> RunConfig:
    cfg = OmegaConf.to_object(compose("config", overrides=list(overrides)))
    assert isinstance(cfg, RunConfig)
    return cfg


def test_default_config(hydra_ctx: None) -> None:
    cfg = run_config()
    assert (cfg.budget_gb, cfg.seed, cfg.workload.kind, cfg.workload.batch) == (24.0, 0, WorkloadKind.DEFAULT, 1)
    assert cfg.model.to_spec() == MODEL_PRESETS["Qwen3-30B-A3B"]
    assert isinstance(cfg.hardware, HardwareProfile) and cfg.hardware.name == "h100_pcie5"
    assert type(cfg.policy) is policy_configs()["lru_offload"]


@pytest.mark.parametrize("name", presets("model"))
def test_model_presets(hydra_ctx: None, name: str) -> None:
    extra = [f"model.config={Path(__file__).parent / 'data' / 'hf_configs' / 'olmoe_1b_7b.json'}"] if name == "hf" else []
    model = run_config(f"model={name}", *extra).model
    assert isinstance(model, ModelConfig)
    if name == "hf":
        assert model.config and model.to_spec() is not None
    elif name == "trace":
        assert model.from_trace and model.to_spec() is None
    else:
        spec = model.to_spec()
        assert spec is not None and preset_stem(spec.name) == name and spec == MODEL_PRESETS[spec.name]


def test_every_model_preset_has_a_yaml() -> None:
    assert {preset_stem(n) for n in MODEL_PRESETS} <= set(presets("model"))


def test_the_trained_model_preset_is_the_spec_its_traces_record() -> None:
    from moebits.traces.format import read_trace

    trace = read_trace(Path(__file__).parents[1] / "train" / "data" / "traces" / "evaluation_code.parquet")
    assert trace.spec == MODEL_PRESETS["moebits-default"]


@pytest.mark.parametrize("name", presets("hardware"))
def test_hardware_presets(hydra_ctx: None, name: str) -> None:
    hw = run_config(f"hardware={name}").hardware
    assert isinstance(hw, HardwareProfile) and hw.name == name


@pytest.mark.parametrize("name", presets("policy"))
def test_policy_presets(hydra_ctx: None, name: str) -> None:
    policy = run_config(f"policy={name}").policy
    registry = policy_configs()
    assert type(policy) in registry.values()
    if name in registry:  # a preset named after a policy composes to that policy's config
        assert type(policy) is registry[name]


@pytest.mark.parametrize("name", presets("workload"))
def test_workload_presets(hydra_ctx: None, name: str) -> None:
    workload = run_config(f"workload={name}", "workload.path=x.parquet").workload
    assert isinstance(workload, WorkloadConfig) and workload.kind is WorkloadKind[name.upper()]


def test_top_level_overrides(hydra_ctx: None) -> None:
    cfg = run_config("budget_gb=3.5", "seed=7", "workload.batch=16", "hardware=a6000", "model=mixtral_8x7b",
                     "policy=static_uniform", "policy.precision=int2")
    assert (cfg.budget_gb, cfg.seed, cfg.workload.batch, cfg.hardware.name) == (3.5, 7, 16, "a6000")
    assert cfg.model.name == "Mixtral-8x7B" and cfg.policy.precision == "int2"


def test_bad_overrides_read_as_one_line(hydra_ctx: None) -> None:
    with pytest.raises(Exception) as info:
        run_config("workload.bacth=2")
    msg = one_line(info.value)
    assert "\n" not in msg and "bacth" in msg
    known = {g: presets(g) for g in GROUPS}
    assert unknown_preset(["hardware=h100_pcie5,nope"], known) == (
        "unknown hardware preset 'nope'; known: " + ", ".join(presets("hardware")))
    assert unknown_preset(["policy=lru_offload", "budget_gb=3"], known) is None


def _tiny_trace(tmp_path: Path) -> str:
    seqs = [[[[0], [1]], [[2], [3]]]]
    return str(write_trace(make_trace(TINY, seqs), tmp_path / "tiny.parquet"))


def test_trace_model_mismatch_stops_before_simulating(hydra_ctx: None, tmp_path: Path) -> None:
    cfg = run_config("workload=file", f"workload.path={_tiny_trace(tmp_path)}")
    with pytest.raises(ValueError, match=r"is a trace of tiny but model= is Qwen3-30B-A3B .*model=trace"):
        build_engine(cfg)


def test_model_trace_takes_the_trace_model_and_checks_the_budget(hydra_ctx: None, tmp_path: Path) -> None:
    path = _tiny_trace(tmp_path)
    engine, info = build_engine(run_config("model=trace", "workload=file", f"workload.path={path}",
                                           "policy=static_uniform", "budget_gb=0.001"))
    assert info["model"] == "tiny" and engine.run().layer_steps == 4
    with pytest.raises(ValueError, match=r"static.uniform at int4 needs"):
        build_engine(run_config("model=trace", "workload=file", f"workload.path={path}",
                                "policy=static_uniform", "budget_gb=0.00001"))
    with pytest.raises(InfeasibleError, match=r"exceeds h100_pcie5's 85 GB"):
        build_engine(run_config("model=trace", "workload=file", f"workload.path={path}", "budget_gb=90"))


def test_missing_default_or_file_workload_is_one_message(hydra_ctx: None, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        build_engine(run_config("model=trace", "workload=file", f"workload.path={tmp_path / 'nope.parquet'}"))


def test_synth_workload_and_max_seqs(hydra_ctx: None) -> None:
    cfg = run_config("model=olmoe_1b_7b", "workload=synth", "workload.seqs=3", "workload.max_seqs=2",
                     "workload.decode_tokens=2", "workload.prompt_tokens=2", "workload.batch=2",
                     "policy=static_uniform", "budget_gb=4")
    engine, info = build_engine(cfg)
    view = engine.view
    assert view.layer_steps == 16 * 3 and np.unique(view.ls_batch).tolist() == [0]
    assert info["workload"] == "synth(seed=0)"
