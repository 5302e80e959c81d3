"""Quantized expert formats: packing layouts, byte counts against the registry, error bounds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from moebits.core.precision import get_precision  # noqa: E402
from moebits.runtime.quant import (  # noqa: E402
    INT_BITS,
    HQQConfig,
    QuantizedStack,
    QuantMethod,
    pack_codes,
    quantize_fp8,
    quantize_stack,
    registry_bytes,
    unpack_codes,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread avoids OpenMP spin-waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# relative Frobenius error bounds of RTN on Gaussian weights (measured: 0.006, 0.10, 0.22, 0.45)
ERROR_BOUND = {"bf16": 0.005, "fp8": 0.04, "int8": 0.01, "int4": 0.12, "int3": 0.25, "int2": 0.5}


def _weights(seed: int, shape=(4, 64, 256), heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if heavy:  # Student-t(3)-like tails: Gaussian over sqrt(chi2/3)
        z = torch.randn(shape, generator=g)
        chi = torch.randn((*shape, 3), generator=g).pow(2).sum(-1) / 3
        return 0.02 * z / chi.sqrt()
    return 0.02 * torch.randn(shape, generator=g)


def _rel_err(stack, w: torch.Tensor) -> float:
    return float((stack.dequantize() - w).norm() / w.norm())


@pytest.mark.parametrize("bits", INT_BITS)
def test_pack_unpack_identity(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 128), generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 128 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(INT_BITS), rows=st.integers(1, 4), k8=st.integers(1, 6), data=st.data())
def test_pack_unpack_property(bits: int, rows: int, k8: int, data) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=rows * k8 * 8, max_size=rows * k8 * 8))
    codes = torch.tensor(values, dtype=torch.uint8).reshape(rows, k8 * 8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)


def test_documented_byte_layouts() -> None:
    c4 = torch.tensor([[1, 2, 15, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert pack_codes(c4, 4)[0, :2].tolist() == [0x21, 0x0F]
    c2 = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 3]], dtype=torch.uint8)
    assert pack_codes(c2, 2)[0].tolist() == [0b00_11_10_01, 0b11_00_00_00]
    c3 = torch.tensor([[7, 0, 0, 0, 4, 0, 0, 5]], dtype=torch.uint8)  # low 2 bits, then bit plane
    assert pack_codes(c3, 3)[0].tolist() == [0b11, 0b01_00_00_00, 0b1001_0001]


@pytest.mark.parametrize("precision", ["bf16", "fp8", "int8", "int4", "int3", "int2"])
def test_bytes_match_registry(precision: str) -> None:
    w = _weights(1, (3, 96, 256))
    stack = quantize_stack(w, precision)
    p = get_precision(precision)
    assert stack.nbytes() == registry_bytes(stack) == 3 * p.matrix_bytes(96, 256)


def test_group_size_override_keeps_bytes() -> None:
    stack = quantize_stack(_weights(2, (2, 32, 256)), "int4", group_size=32)
    assert isinstance(stack, QuantizedStack) and stack.scales.shape == (2, 32, 8)
    assert stack.nbytes() == registry_bytes(stack)


@pytest.mark.parametrize("precision", ["bf16", "fp8", "int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("method", list(QuantMethod))
def test_roundtrip_error_bound(precision: str, method: QuantMethod) -> None:
    w = _weights(3 + len(precision))
    assert _rel_err(quantize_stack(w, precision, method), w) < ERROR_BOUND[precision]


def test_error_tightens_with_bits() -> None:
    w = _weights(4)
    errs = [_rel_err(quantize_stack(w, f"int{b}"), w) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < errs[-2] / 8  # 4 more bits: ~16x smaller steps


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("heavy", [False, True])
def test_hqq_not_worse_than_rtn(bits: int, heavy: bool) -> None:
    w = _weights(10 + bits, (4, 32, 256), heavy=heavy)
    rtn = quantize_stack(w, f"int{bits}", QuantMethod.RTN)
    hqq = quantize_stack(w, f"int{bits}", QuantMethod.HQQ)
    e_rtn, e_hqq = _rel_err(rtn, w), _rel_err(hqq, w)
    assert e_hqq <= e_rtn * 1.001
    if bits <= 3:
        assert e_hqq < 0.95 * e_rtn  # the scale refit pays off most at low bits


def test_hqq_zero_only_still_helps() -> None:
    w = _weights(20, (2, 32, 256), heavy=True)
    rtn = _rel_err(quantize_stack(w, "int3"), w)
    hqq = _rel_err(quantize_stack(w, "int3", QuantMethod.HQQ, hqq=HQQConfig(update_scale=False)), w)
    assert hqq < rtn


def test_fp8_per_row_scale() -> None:
    w = _weights(5)
    stack = quantize_fp8(w)
    assert stack.weight.dtype == torch.float8_e4m3fn and stack.scale.shape == w.shape[:2]
    assert torch.allclose(stack.weight.float().abs().amax(-1), torch.full(w.shape[:2], 448.0))
    assert _rel_err(stack, w) < ERROR_BOUND["fp8"]


def test_dequantize_selected_slots() -> None:
    w = _weights(6)
    stack = quantize_stack(w, "int4")
    assert torch.equal(stack.dequantize(torch.tensor([2, 0])), stack.dequantize()[[2, 0]])


def test_constant_group_is_exact() -> None:
    w = torch.full((1, 8, 128), 0.25)
    assert _rel_err(quantize_stack(w, "int2"), w) < 1e-3


@pytest.mark.parametrize(
    ("shape", "precision", "message"),
    [
        ((2, 8, 100), "int4", "not a multiple of the group size"),
        ((8, 128), "int4", "expected an expert stack"),
        ((2, 8, 128), "int5", "unknown precision"),
    ],
)
def test_bad_input_is_one_clear_error(shape, precision: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_stack(torch.randn(shape), precision)


def test_bad_group_size() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_stack(torch.randn(2, 8, 128), "int4", group_size=12)
