"""The mixed-precision MoE layer against float64 references, transformers' own experts, and
bad input. CPU tests run everywhere; ``gpu`` tests need CUDA (and Triton for integer classes)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from moebits.runtime.grouped import triton_kernels  # noqa: E402
from moebits.runtime.moe_layer import (  # noqa: E402
    ExpertHandle,
    ExpertPool,
    MixedPrecisionMoE,
    build_mixed_experts,
    reference_moe,
)
from moebits.runtime.quant import QuantMethod, quantize_stack  # noqa: E402

E, H, I = 8, 256, 128
MIXED = ["bf16", "fp8", "int8", "int4", "int3", "int2", "int4", "bf16"]
# layer output vs the unquantized float64 layer, RTN; measured over 5 seeds on CPU:
# bf16 0.003, fp8 0.044-0.047, int8 0.010, int4 0.176-0.182, int3 0.38-0.41, int2 0.87-0.97
QUANT_BOUND = {"bf16": 0.006, "fp8": 0.06, "int8": 0.015, "int4": 0.22, "int3": 0.5, "int2": 1.1}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(seed: int, tokens: int, k: int = 3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    gu = 0.05 * torch.randn(E, 2 * I, H, generator=g)
    dn = 0.05 * torch.randn(E, H, I, generator=g)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.rand(tokens, E, generator=g).topk(k, dim=1).indices
    w = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    return (t.to(device) for t in (gu, dn, x, ids, w))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _served_reference(layer: MixedPrecisionMoE, x, ids, w) -> torch.Tensor:
    gq, dq = layer.dequantized_experts(torch.float64)
    return reference_moe(x.double(), ids, w.double(), gq, dq)


@pytest.mark.parametrize("tokens", [1, 6, 33])
def test_mixed_layer_matches_served_reference(tokens: int) -> None:
    gu, dn, x, ids, w = _problem(tokens, tokens)
    layer = MixedPrecisionMoE(*build_mixed_experts(gu, dn, MIXED))
    assert _rel(layer(x, ids, w), _served_reference(layer, x, ids, w)) < 1e-5


@pytest.mark.parametrize("precision", list(QUANT_BOUND))
def test_single_precision_layer_error_bound(precision: str) -> None:
    gu, dn, x, ids, w = _problem(7, 12)
    layer = MixedPrecisionMoE(*build_mixed_experts(gu, dn, [precision] * E))
    out = layer(x, ids, w)
    assert _rel(out, _served_reference(layer, x, ids, w)) < 1e-5
    exact = reference_moe(x.double(), ids, w.double(), gu.double(), dn.double())
    assert _rel(out, exact) < QUANT_BOUND[precision]


def test_hqq_layer_is_closer_than_rtn() -> None:
    gu, dn, x, ids, w = _problem(8, 16)
    exact = reference_moe(x.double(), ids, w.double(), gu.double(), dn.double())
    errs = [_rel(MixedPrecisionMoE(*build_mixed_experts(gu, dn, ["int2"] * E, m))(x, ids, w), exact)
            for m in (QuantMethod.RTN, QuantMethod.HQQ)]
    assert errs[1] < errs[0]


def test_set_handles_reassigns_in_place() -> None:
    gu, dn, x, ids, w = _problem(9, 10)
    pools = {p: ExpertPool(quantize_stack(gu, p), quantize_stack(dn, p)) for p in ("bf16", "int2")}
    layer = MixedPrecisionMoE(pools, [ExpertHandle("bf16", e) for e in range(E)])
    table = layer.group_of_expert
    first = layer(x, ids, w)
    layer.set_handles([ExpertHandle("int2" if e % 2 else "bf16", e) for e in range(E)])
    assert layer.group_of_expert is table  # same storage: a captured graph sees the change
    second = layer(x, ids, w)
    assert _rel(second, _served_reference(layer, x, ids, w)) < 1e-5
    assert _rel(first, second.double()) > 1e-3


def test_matches_transformers_qwen3_moe_experts() -> None:
    cfg_mod = pytest.importorskip("transformers.models.qwen3_moe.configuration_qwen3_moe")
    mod = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    gu, dn, x, ids, w = _problem(10, 9)
    cfg = cfg_mod.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=3)
    experts = mod.Qwen3MoeExperts(cfg)
    experts.gate_up_proj.data.copy_(gu)  # the layout this runtime assumes: [E, 2I, H], gate rows first
    experts.down_proj.data.copy_(dn)
    with torch.no_grad():
        ref = experts(x, ids, w)
    layer = MixedPrecisionMoE({"bf16": ExpertPool(quantize_stack(gu.bfloat16().float(), "bf16"),
                                                  quantize_stack(dn, "bf16"))},
                              [ExpertHandle("bf16", e) for e in range(E)])
    ours = layer(x, ids, w)
    assert float((ours - ref).norm() / ref.norm()) < 1e-2  # bf16-stored weights vs fp32 ones


@pytest.mark.parametrize(
    ("handles", "message"),
    [
        ([ExpertHandle("int4", e) for e in range(E)], "no 'int4' pool"),
        ([ExpertHandle("bf16", e - 1) for e in range(E)], "slot -1 outside"),
        ([ExpertHandle("bf16", e + 1) for e in range(E)], "slot 8 outside"),
        ([ExpertHandle("bf16", 0)] * E, "share one slot"),
    ],
)
def test_bad_handles_are_one_clear_error(handles, message: str) -> None:
    gu, dn, *_ = _problem(11, 1)
    pools = {"bf16": ExpertPool(quantize_stack(gu, "bf16"), quantize_stack(dn, "bf16"))}
    with pytest.raises(ValueError, match=message):
        MixedPrecisionMoE(pools, handles)


def test_bad_pools_and_shapes() -> None:
    gu, dn, x, ids, w = _problem(12, 4)
    with pytest.raises(ValueError, match="do not match"):
        ExpertPool(quantize_stack(gu, "int4"), quantize_stack(dn[:, :128], "int4"))
    with pytest.raises(ValueError, match="holds int4"):
        MixedPrecisionMoE({"int8": ExpertPool(quantize_stack(gu, "int4"), quantize_stack(dn, "int4"))},
                          [ExpertHandle("int8", e) for e in range(E)])
    layer = MixedPrecisionMoE(*build_mixed_experts(gu, dn, ["bf16"] * E))
    with pytest.raises(ValueError, match="do not fit"):
        layer(x[:, :100], ids, w)
    with pytest.raises(ValueError, match="expected 8 handles"):
        layer.set_handles([ExpertHandle("bf16", e) for e in range(E - 1)])


# ----------------------------------------------------------------------------- GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 16, 128])
def test_gpu_mixed_layer_matches_reference(tokens: int) -> None:
    if triton_kernels() is None:
        pytest.skip("needs triton")
    gu, dn, x, ids, w = _problem(tokens, tokens, k=4, device="cuda")
    layer = MixedPrecisionMoE(*build_mixed_experts(gu, dn, MIXED))
    assert layer.use_triton
    out = layer(x.bfloat16(), ids, w)
    assert out.dtype == torch.bfloat16
    assert _rel(out, _served_reference(layer, x.bfloat16(), ids, w)) < 0.05  # fp8 activations in one class


@gpu
@needs_cuda
def test_gpu_cuda_graph_replay_matches_eager() -> None:
    if triton_kernels() is None:
        pytest.skip("needs triton")
    gu, dn, x, ids, w = _problem(13, 2, k=4, device="cuda")
    layer = MixedPrecisionMoE(*build_mixed_experts(gu, dn, MIXED))
    xs = x.bfloat16()
    eager = layer(xs, ids, w)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(xs, ids, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(xs, ids, w)
    new_ids = torch.roll(ids, 1, dims=1)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(out, _served_reference(layer, xs, ids, w)) < 0.05
    assert not torch.equal(out, eager)
