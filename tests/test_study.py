"""The seed-policy study's plumbing: budgets resolved per model, one synthetic sensitivity
table shared by policy and quality proxy, policy counters in the summary, the experiment
configs (every policy, budget, GPU and trace; joblib), and the trace cache they read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from moebits.analysis.prepare import DEFAULT_SRC, ENV_VAR, MAVERICK_SMALL, prepare_traces
from moebits.analysis.tracestats import study_traces
from moebits.core.model_spec import MODEL_PRESETS
from moebits.policies._tables import synthetic_table
from moebits.policies.base import policy_configs
from moebits.sim.app import CONF_DIR, presets
from moebits.sim.config import RunConfig, register_configs
from moebits.sim.runner import build_engine, simulate
from moebits.traces.format import read_trace, write_trace
from moebits.traces.workload import load_workload
from omegaconf import OmegaConf
from sim_testkit import TINY, make_trace

STUDY_BUDGETS = ["all_int2", "all_int3", "bf16_25pct", "all_int4", "bf16_50pct"]


@pytest.fixture(scope="module")
def hydra_ctx() -> Iterator[None]:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def run_config(*overrides: str) -> RunConfig:
    cfg = OmegaConf.to_object(compose("config", overrides=list(overrides)))
    assert isinstance(cfg, RunConfig)
    return cfg


def _tiny(tmp_path: Path) -> list[str]:
    seqs = [[[[0], [1]], [[2], [3]], [[0], [2]]]]
    path = write_trace(make_trace(TINY, seqs), tmp_path / "tiny.parquet")
    return ["model=trace", "workload=file", f"workload.path={path}", "progress=false"]


@pytest.mark.parametrize("name", presets("budget"))
def test_budget_presets_resolve_per_model(hydra_ctx: None, tmp_path: Path, name: str) -> None:
    cfg = run_config(*_tiny(tmp_path), f"budget={name}", "budget_gb=0.5", "policy=lru_offload",
                     "policy.staging_experts=0",
                     *(["budget.experts=3"] if name == "per_layer" else ["policy.scope=GLOBAL"]))
    _, info = build_engine(cfg)
    b = cfg.budget
    want = int(0.5e9) if b.all_at is None else int(b.fraction * TINY.all_experts_bytes(b.all_at))
    if b.experts:  # 3 slots per layer at the policy's bf16, no staging
        want = TINY.layers * 3 * TINY.expert_bytes("bf16")
    assert info["budget_bytes"] == want and info["budget_kind"] == (name if not b.experts else "per_layer_3")


def test_budget_error_names_the_budget(hydra_ctx: None) -> None:
    cfg = run_config("model=mixtral_8x7b", "hardware=rtx5090", "budget=bf16_50pct", "workload=synth")
    with pytest.raises(ValueError, match=r"budget=bf16_50pct \(45.10 GB for Mixtral-8x7B\) plus .* exceeds rtx5090"):
        build_engine(cfg)
    with pytest.raises(ValueError, match="budget.all_at"):
        build_engine(run_config("budget.all_at=int5"))


def test_one_synthetic_table_feeds_policy_and_quality_proxy(hydra_ctx: None, tmp_path: Path) -> None:
    cfg = run_config(*_tiny(tmp_path), "policy=static_uniform", "budget_gb=1", "seed=5")
    engine, info = build_engine(cfg)
    assert info["quality_table"] == "synthetic(seed=5)"
    table = engine.policy.ctx.sensitivity
    want = synthetic_table(TINY.layers, TINY.experts, ["int4"], np.random.default_rng(5), row_len=TINY.hidden)
    assert table is not None
    np.testing.assert_allclose(table.error_array(TINY.layers, TINY.experts, ["int4"], TINY.hidden),
                               want.error_array(TINY.layers, TINY.experts, ["int4"], TINY.hidden))
    k = engine.pool.precisions.index("int4")
    proxy = np.array(engine.err_of)[:, :, k]
    np.testing.assert_allclose(proxy, table.error_array(TINY.layers, TINY.experts, ["int4"], TINY.hidden)[:, :, 0])
    assert proxy.std() > 0  # per-expert errors, not the one analytic number
    _, analytic = build_engine(run_config(*_tiny(tmp_path), "policy=static_uniform", "budget_gb=1",
                                          "quality_table=analytic"))
    assert analytic["quality_table"] == "analytic"


def test_policy_metrics_reach_the_summary(hydra_ctx: None) -> None:
    cfg = run_config("model=olmoe_1b_7b", "workload=synth", "workload.seqs=1", "workload.prompt_tokens=2",
                     "workload.decode_tokens=3", "policy=dymoe", "budget=all_int2", "progress=false")
    _, summary = simulate(cfg)
    metrics = summary["policy_metrics"]
    assert set(metrics) == {"prefetch_issued", "prefetch_hits", "prefetch_hit_rate"}
    assert 0.0 <= metrics["prefetch_hit_rate"] <= 1.0 and metrics["prefetch_issued"] > 0
    _, plain = simulate(run_config(*["model=olmoe_1b_7b", "workload=synth", "workload.seqs=1",
                                     "workload.prompt_tokens=2", "workload.decode_tokens=3", "policy=static_uniform",
                                     "budget=all_int4", "progress=false"]))
    assert plain["policy_metrics"] == {}


def test_seed_policies_sweeps_everything_on_joblib(hydra_ctx: None) -> None:
    cfg = compose("config", overrides=["+experiment=seed_policies"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert cfg.hydra.mode.name == "MULTIRUN" and "joblib" in cfg.hydra.launcher._target_.lower()
    assert sorted(params.policy.split(",")) == sorted(policy_configs())
    assert params.budget.split(",") == STUDY_BUDGETS
    assert params.hardware.split(",") == ["h100_pcie5", "rtx5090", "a6000"]
    assert sorted(params["+experiment/trace"].split(",")) == study_traces()
    assert cfg.progress is False and cfg.figure is False


def test_launcher_presets_extend_the_plugins() -> None:
    for name, base in (("moebits_slurm", "submitit_slurm"), ("moebits_ray", "ray")):
        data = yaml.safe_load((CONF_DIR / "hydra" / "launcher" / f"{name}.yaml").read_text())
        assert data["defaults"] == [base]


@pytest.mark.parametrize("name", study_traces())
def test_study_trace_configs(hydra_ctx: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    wl = run_config(f"+experiment/trace={name}").workload
    assert wl.max_seqs > 0 or name == "qwen15"
    assert wl.batch == (25 if name == "qwen15" else 1)
    for path in (wl.path, wl.profile_path):
        assert path is None or path.startswith(str(tmp_path))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not DEFAULT_SRC.is_dir():
        pytest.skip(f"real traces absent ({DEFAULT_SRC})")
    out = tmp_path_factory.mktemp("traces")
    prepare_traces(DEFAULT_SRC, out, progress=False)
    return out


def test_prepare_traces_writes_the_study_files_once(cache: Path) -> None:
    names = sorted(p.name for p in cache.glob("*.parquet"))
    assert "qwen15moe_vllm-logger.parquet" in names and "qwen15moe_vllm-logger.profile.parquet" not in names
    assert {"mixtral8x7b_speculative-moe.profile.parquet", "default.profile.parquet",
            "llama4maverick_mmlu_small.parquet"} <= set(names)
    small = read_trace(cache / "llama4maverick_mmlu_small.parquet")
    real = read_trace(cache / "llama4maverick_mmlu.parquet")
    assert small.spec == MAVERICK_SMALL and real.spec == MODEL_PRESETS["Llama-4-Maverick"]
    assert np.array_equal(small.expert, real.expert)
    mix, prof = read_trace(cache / "mixtral8x7b_speculative-moe.parquet"), \
        read_trace(cache / "mixtral8x7b_speculative-moe.profile.parquet")
    assert np.unique(prof.seq).tolist() == [2, 3] and np.unique(mix.seq).tolist() == [0, 1, 2, 3]
    before = {p: p.stat().st_mtime_ns for p in cache.glob("*.parquet")}
    done = prepare_traces(DEFAULT_SRC, cache, progress=False)
    assert not any(d.written for d in done)
    assert before == {p: p.stat().st_mtime_ns for p in cache.glob("*.parquet")}


@pytest.mark.parametrize("name", study_traces())
def test_study_workloads_load_from_the_cache(hydra_ctx: None, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                             name: str) -> None:
    monkeypatch.setenv(ENV_VAR, str(cache))
    cfg = run_config(f"+experiment/trace={name}")
    work = load_workload(cfg.workload, None, cfg.seed)
    assert work.view.layer_steps > 0
    if cfg.workload.profile_path:
        assert Path(cfg.workload.profile_path).exists()
        replayed = set(np.unique(np.asarray(work.view.ls_batch)).tolist())
        assert replayed  # the replay cap keeps it within the first half: the profile is held out
        assert cfg.workload.max_seqs <= read_trace(cfg.workload.profile_path).num_seqs
