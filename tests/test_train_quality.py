"""Measured quality on the trained model: measurement forwards, sensitivity tables, workloads,
and the hooks that make policies read measured data (mxmoe's kernel cost, routernorm's
router-norm change, the proxy's table label)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from moebits.core.hardware import HardwareProfile, KernelTable, LinkCurve, expert_time_s
from moebits.core.model_spec import ModelSpec
from moebits.core.quality import SensitivityTable, table_kind
from moebits.policies.base import PolicyContext
from moebits.policies.mxmoe import MxMoE, MxMoEConfig
from moebits.policies.routernorm import RouterNorm, RouterNormConfig

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moebits.train import corpus, sensitivity, serve  # noqa: E402
from moebits.train import quality as tq  # noqa: E402
from moebits.train.model import SMOKE, build, moe_config  # noqa: E402
from moebits.train.workloads import WorkloadRequest, capture  # noqa: E402


@pytest.fixture(scope="module")
def model() -> object:
    m = build(moe_config(SMOKE, 0.01), seed=1).eval()
    with torch.no_grad():  # a wider weight scale so that quantization visibly moves the logits
        for mod in serve.experts_modules(m):
            mod.gate_up_proj.mul_(20.0)
            mod.down_proj.mul_(20.0)
    return m


def _text(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = [b"def ", b"return ", b"self", b"(x)", b":\n    ", b"import os\n", b"the ", b"value "]
    return np.frombuffer(b"".join(words[i] for i in rng.integers(0, len(words), n)), dtype=np.uint8)


def test_serving_bf16_reproduces_the_models_own_experts(model: object) -> None:
    x = torch.randint(0, 256, (2, 24))
    for mod in serve.experts_modules(model):
        mod.gate_up_proj.data = mod.gate_up_proj.data.to(torch.bfloat16).float()  # bf16-exact weights
        mod.down_proj.data = mod.down_proj.data.to(torch.bfloat16).float()
    serve.set_experts_implementation(model, "eager")
    with torch.no_grad():
        want = model(input_ids=x, use_cache=False).logits
    served = serve.Served(serve.build_variants(model, ["bf16"]))
    serve.install(model, served)
    got = serve.logits(model, x, served)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_channel_mix_takes_the_most_significant_channels_from_the_high_copy() -> None:
    e, i, h = 2, 8, 4
    low = (torch.zeros(e, 2 * i, h), torch.zeros(e, h, i))
    high = (torch.ones(e, 2 * i, h), torch.ones(e, h, i))
    sig = torch.arange(e * i, dtype=torch.float32).reshape(e, i)
    gu, dn = serve.mix_weights(low, high, sig, fraction=0.25)               # top 2 of 8 channels
    assert gu[:, [6, 7, 14, 15]].eq(1).all() and gu.sum() == e * 4 * h
    assert dn[:, :, [6, 7]].eq(1).all() and dn.sum() == e * 2 * h


def _workload(model: object, tmp_path: Path) -> tuple[tq.Workload, Path, Path]:
    data = _text(3000, 0).tobytes()
    (tmp_path / "evaluation_code.bin").write_bytes(data)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"python": "x", "splits": {"evaluation_code": {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}}))
    req = WorkloadRequest("evaluation", "code", seqs=3, prompt_tokens=16, decode_tokens=8)
    serve.set_experts_implementation(model, "eager")
    trace = capture(model, corpus.load(tmp_path, "evaluation_code", manifest), req)
    return tq.workload(trace, tmp_path, manifest), tmp_path, manifest


def test_workload_trace_recovers_its_bytes_and_phases(model: object, tmp_path: Path) -> None:
    wl, data_dir, manifest = _workload(model, tmp_path)
    assert wl.tokens.shape == (3, 24) and wl.prompt_tokens == 16
    assert wl.pass_of().tolist() == [0] * 16 + list(range(1, 9))
    data = corpus.load(data_dir, "evaluation_code", manifest)
    starts = [bytes(data).find(bytes(row.tolist())) for row in wl.tokens.to(torch.uint8)]
    assert all(s >= 0 for s in starts) and starts == sorted(starts)


def test_measured_kl_is_zero_at_bf16_and_grows_as_bits_shrink(model: object, tmp_path: Path) -> None:
    wl, _, _ = _workload(model, tmp_path)
    variants = serve.build_variants(model, ["int8", "int4", "int2"])
    ctx, ref = tq.reference(model, wl, variants)
    passes = wl.length - wl.prompt_tokens + 1
    kl = {}
    for p in ("bf16", "int8", "int4", "int2"):
        served = {(s, q, la): {e: p for e in range(SMOKE.experts)}
                  for s in range(wl.seqs) for q in range(passes) for la in range(SMOKE.layers)}
        kl[p] = tq.measure(model, wl, ctx, ref, tq.assignment(wl, served, variants, SMOKE.experts))
    assert kl["bf16"]["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < kl["int8"]["kl_mean"] < kl["int4"]["kl_mean"] < kl["int2"]["kl_mean"]
    assert kl["int2"]["bpb"] != kl["bf16"]["bpb"]
    served.pop((0, 3, 1))
    with pytest.raises(ValueError, match="no served precision for layer 1, sequence 0, pass 3"):
        tq.assignment(wl, served, variants, SMOKE.experts)


def test_sensitivity_table_is_measured_and_validated(model: object) -> None:
    splits = {"code": _text(4000, 1), "prose": _text(4000, 2)}
    training = {"records": {"moe": {"router_norms": [np.ones((SMOKE.layers, SMOKE.experts)).tolist(),
                                                     np.full((SMOKE.layers, SMOKE.experts), 3.0).tolist()]}}}
    req = sensitivity.TableRequest("calibration", windows=2, seq_len=64, kl_samples=12)
    table, report = sensitivity.measure(model, splits, req, training, progress=False)
    assert len(table.precision) == SMOKE.layers * SMOKE.experts * 6 * 2
    err = table.error_array(SMOKE.layers, SMOKE.experts, ["bf16", "int8", "int4", "int2"])
    assert (err[:, :, 0] == 0).all() and (np.median(err[:, :, 3]) > np.median(err[:, :, 2]) > np.median(err[:, :, 1]))
    assert all(v == 2.0 for v in table.extra["router_norm_change"])
    measured = sum(v is not None for v in table.extra["kl_measured"])   # sampled rows x 2 datasets (mix rows: none)
    assert 0 < measured <= 12 * 2 and measured % 2 == 0
    assert set(report["validation"]) == {"rows", "spearman", "median_abs_log_ratio"}
    assert 0.0 < report["dynamo_mix"]["significance_share_median"] <= 1.0


def test_curvature_fit_recovers_a_known_scale() -> None:
    energy = np.array([1.0, 2.0, 3.0, 4.0, 1.0, 2.0])
    layers = np.array([0, 0, 0, 1, 1, 1])
    kl = energy * np.where(layers == 0, 0.5, 2.0)
    assert sensitivity.fit_curvature(energy, kl, layers, 3).tolist() == pytest.approx([0.5, 2.0, 49 / 35])  # layer 2: the pooled fit


# ---------------------------------------------------------------- policies read measured data
SPEC = ModelSpec(name="t", layers=2, experts=4, top_k=2, hidden=128, expert_intermediate=128, vocab_size=256)


def _hw(tables: list[KernelTable] | None = None) -> HardwareProfile:
    link = LinkCurve(latency_s=1e-6, sizes_bytes=[1e6], gbps=[50.0])
    return HardwareProfile(name="t", hbm_capacity_gb=80, hbm_gbps=3000, h2d=link, d2h=link,
                           peak_tflops={"bf16": 1000.0}, launch_s=1e-6, kernel_tables=tables or [])


def _mxmoe_speed(hw: HardwareProfile | None) -> dict[str, float]:
    pol = MxMoE(MxMoEConfig(precisions=["bf16", "int4", "int2"]))
    pol.ctx = PolicyContext(spec=SPEC, budget_bytes=10**9, rng=np.random.default_rng(0),
                            precision_bytes={}, hardware=hw)
    pol.precisions = ["bf16", "int4", "int2"]
    return dict(zip(pol.precisions, pol.speed().tolist(), strict=True))


def test_mxmoe_cost_comes_from_the_hardware_kernel_model() -> None:
    roof = _mxmoe_speed(_hw())
    assert roof["bf16"] == 1.0 and roof["int2"] < roof["int4"] < 1.0       # memory-bound decode: fewer bytes, faster
    want = float(expert_time_s(_hw(), SPEC, "int4", 1.0) / expert_time_s(_hw(), SPEC, "bf16", 1.0))
    assert roof["int4"] == pytest.approx(want)
    slow = KernelTable("int2", 128, 128, tokens=[1.0, 8.0], seconds=[1.0, 2.0])  # a measured slow int2 kernel
    assert _mxmoe_speed(_hw([slow]))["int2"] > 1.0
    assert _mxmoe_speed(None)["int2"] == pytest.approx(SPEC.expert_bytes("int2") / SPEC.expert_bytes("bf16"))


def _routernorm_levels(change: list[float]) -> list[str]:
    n = SPEC.layers * SPEC.experts
    rows = [(la, e) for la in range(SPEC.layers) for e in range(SPEC.experts)]
    table = SensitivityTable(layer=np.array([r[0] for r in rows]), expert=np.array([r[1] for r in rows]),
                             precision=["int4"] * n, error=np.full(n, 0.1),
                             extra={"router_norm": [1.0] * n, "router_norm_change": change * SPEC.layers,
                                    "max_intra_neuron_variance": [1.0] * n})
    pol = RouterNorm(RouterNormConfig(levels=["int4", "int2"], top_share=0.25))
    budget = SPEC.layers * (3 * SPEC.expert_bytes("int2") + SPEC.expert_bytes("int4"))
    pol.prepare(PolicyContext(spec=SPEC, budget_bytes=budget, rng=np.random.default_rng(0),
                              precision_bytes={p: SPEC.expert_bytes(p) for p in ("int4", "int2")}, sensitivity=table))
    return [a.precision for a in pol.initial_loads() if a.key.layer == 0]


def test_routernorm_reads_the_recorded_router_norm_change() -> None:
    assert _routernorm_levels([0.1, 0.9, 0.5, 0.7]) == ["int4", "int2", "int2", "int2"]
    assert _routernorm_levels([0.9, 0.5, 0.7, 0.1]) == ["int2", "int2", "int2", "int4"]


def test_table_kind_says_where_the_table_came_from() -> None:
    assert table_kind("synthetic(seed=3)") == "synthetic" and table_kind(None) == "synthetic"
    assert table_kind("analytic") == "analytic" and table_kind("train/data/sensitivity/calibration.parquet") == "measured"


@pytest.mark.parametrize("precision", ["int4", "int2"])
def test_measurement_path_matches_the_runtimes_experts_on_the_embedded_model(precision: str) -> None:
    """The runtime's HF integration (host store, quantizers, CPU expert kernels) and the
    measurement forwards (dequantized variants) serve the trained model alike."""
    from moebits.policies.base import build_policy
    from moebits.policies.static_uniform import StaticUniformConfig
    from moebits.runtime import hf
    from moebits.runtime.engine import RuntimeEngine
    from moebits.traces.capture import load_model_dir, model_spec
    from moebits.train.model import DEFAULT_DIR

    ids = torch.from_numpy(_text(400, 5)[:96].astype(np.int64)).reshape(2, 48)
    ours_model, _ = load_model_dir(DEFAULT_DIR, torch.float32, "cpu")
    served = serve.Served(serve.build_variants(ours_model, [precision]))
    serve.install(ours_model, served)
    ref = serve.logits(ours_model, ids, served)
    served.assign = [torch.ones((ids.numel(), 4), dtype=torch.long)] * 8
    ours = serve.logits(ours_model, ids, served)

    model, _ = load_model_dir(DEFAULT_DIR, torch.float32, "cpu")
    spec = model_spec(model)
    store = hf.store_from_model(model, spec, pin=False)
    engine = RuntimeEngine(spec, build_policy(StaticUniformConfig(precision=precision)),
                           spec.all_experts_bytes(precision), store)
    hf.install(model, hf.HFRuntime(spec, store, engine, "cpu"))
    engine.begin_pass(0, 0)
    theirs, _ = hf.forward_logits(model, ids, False, keep=ids.shape[1])
    engine.end_pass()
    kl_ours = float(hf.kl_divergence(ref, ours).mean())
    assert kl_ours > 1e-4                                           # quantization visibly moves the model
    assert float(hf.kl_divergence(ours, theirs.float()).mean()) < 0.05 * kl_ours
