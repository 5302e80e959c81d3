"""Quantized expert weight formats: quantizers, packed layouts and reference dequantization.

Expert weights arrive as transformers 5.x stores them (``Qwen3MoeExperts``): ``gate_up_proj``
``[E, 2I, H]`` (gate rows first, then up rows) and ``down_proj`` ``[E, H, I]``; every matrix is
``[N, K]`` = ``[out, in]`` and ``F.linear`` computes ``x @ W.T``. Quantization groups run along
K, the input dimension, so a group is ``group_size`` consecutive weights of one row.

Formats (byte counts equal ``core.precision.Precision.matrix_bytes`` exactly):

* ``bf16``: :class:`DenseStack`, the weights as they are.
* ``fp8``: :class:`Fp8Stack`, ``torch.float8_e4m3fn`` codes and one fp32 scale per row
  (``w = code * scale``, scale = row amax / 448).
* ``int8/int4/int3/int2``: :class:`QuantizedStack`, group-wise asymmetric:
  ``w = (q - zero) * scale`` with unsigned codes ``q`` in ``[0, 2**bits - 1]`` and one fp16
  (or bf16) ``scale`` and ``zero`` per (row, group); the zero point is a float, not rounded.
  Packed layout, one uint8 tensor ``[E, N, K * bits / 8]``, little-endian within a byte:

  - int8: one code per byte.
  - int4: byte ``j`` holds code ``2j`` in bits 0-3 and code ``2j+1`` in bits 4-7.
  - int2: byte ``j`` holds codes ``4j..4j+3``, code ``4j+s`` in bits ``2s, 2s+1``.
  - int3: two bit planes side by side in each row: the first ``K/4`` bytes hold the low two
    bits of every code in the int2 layout, the last ``K/8`` bytes the third bit, code ``8j+s``
    in bit ``s`` of byte ``j``. 8 codes take 3 bytes and no code straddles a byte, so a
    kernel unpacks with shifts and masks only.

  ``K`` must be a multiple of the group size and the group size a multiple of 8.

Quantizers: ``RTN`` (min/max round-to-nearest) and ``HQQ``, a calibration-free half-quadratic
refinement after Badri & Shaji (2023): starting from RTN, a few iterations alternate (1) codes
by rounding, (2) a sparse error ``e`` by the lp-shrinkage operator (p < 1, so outliers are
absorbed in ``e`` rather than bending the fit), (3) the zero point in closed form
``zero = mean(q - (w/scale - e))`` and (4) the scale by least squares against ``w - e``. It works
in the code domain (errors in units of one quantization step), so ``beta`` does not depend on
the weights' magnitude, and keeps per group the iterate with the lowest squared error, so it is
never worse than its RTN start.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import torch
from moebits.core.precision import Precision, get_precision

INT_BITS = (8, 4, 3, 2)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class QuantMethod(enum.Enum):
    """How integer codes, scales and zeros are chosen."""

    RTN = "rtn"
    HQQ = "hqq"


@dataclass(frozen=True)
class HQQConfig:
    """HQQ iterations (defaults are HQQ's own: lp 0.7, beta 10 growing by 1.01 a step)."""

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    update_scale: bool = True


DEFAULT_HQQ = HQQConfig()

# ----------------------------------------------------------------------------- packing
def _pack_fields(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``width``-bit fields (8 // width per byte, lowest bits first) along the last dim."""
    per = 8 // width
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * width
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack_fields(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`_pack_fields`."""
    per = 8 // width
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * width
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes ``[..., K]`` (uint8) into ``[..., K * bits / 8]`` bytes."""
    k = codes.shape[-1]
    if bits not in INT_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {INT_BITS}")
    if k % 8:
        raise ValueError(f"the packed dimension must be a multiple of 8, got {k}")
    if bits == 3:
        return torch.cat([_pack_fields(codes & 3, 2), _pack_fields(codes >> 2, 1)], dim=-1)
    return _pack_fields(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., K * bits / 8]`` bytes to ``[..., K]`` codes."""
    if bits not in INT_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes; supported: {INT_BITS}")
    if bits != 3:
        return _unpack_fields(packed, bits)
    k = packed.shape[-1] * 8 // 3
    lo = _unpack_fields(packed[..., : k // 4], 2)
    hi = _unpack_fields(packed[..., k // 4 :], 1)
    return lo | (hi << 2)


# ----------------------------------------------------------------------------- stacks
@dataclass(frozen=True)
class DenseStack:
    """bf16 (or any float) weights ``[E, N, K]``."""

    weight: torch.Tensor

    @property
    def precision(self) -> str:
        return "bf16"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def dequantize(self, slots: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights ``[E', N, K]`` in ``dtype`` (all slots, or those in ``slots``)."""
        w = self.weight if slots is None else self.weight[slots]
        return w.to(dtype)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass(frozen=True)
class Fp8Stack:
    """fp8 e4m3 codes ``[E, N, K]`` with one fp32 scale per row ``[E, N]``."""

    weight: torch.Tensor
    scale: torch.Tensor

    @property
    def precision(self) -> str:
        return "fp8"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def dequantize(self, slots: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w, s = (self.weight, self.scale) if slots is None else (self.weight[slots], self.scale[slots])
        return (w.to(torch.float32) * s.unsqueeze(-1)).to(dtype)

    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4


@dataclass(frozen=True)
class QuantizedStack:
    """Group-wise asymmetric integer weights; see the module docstring for the layout.

    Attributes:
        bits: 8, 4, 3 or 2.
        group_size: weights per (scale, zero) along K.
        qweight: packed codes ``[E, N, K * bits / 8]`` uint8.
        scales, zeros: ``[E, N, K / group_size]`` fp16 or bf16.
    """

    bits: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    @property
    def shape(self) -> tuple[int, int, int]:
        e, n, groups = self.scales.shape
        return e, n, groups * self.group_size

    def codes(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Unpacked codes ``[E', N, K]`` uint8."""
        q = self.qweight if slots is None else self.qweight[slots]
        return unpack_codes(q, self.bits)

    def dequantize(self, slots: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference dequantization in plain torch: ``(q - zero) * scale``, ``[E', N, K]``."""
        s, z = (self.scales, self.zeros) if slots is None else (self.scales[slots], self.zeros[slots])
        q = self.codes(slots).to(torch.float32)
        e, n, k = q.shape
        qg = q.reshape(e, n, k // self.group_size, self.group_size)
        w = (qg - z.to(torch.float32).unsqueeze(-1)) * s.to(torch.float32).unsqueeze(-1)
        return w.reshape(e, n, k).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


WeightStack = DenseStack | Fp8Stack | QuantizedStack


def stack_to(stack: WeightStack, device: torch.device | str) -> WeightStack:
    """The same stack with every tensor moved to ``device``."""
    moved: dict[str, Any] = {
        f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
        for f in dataclasses.fields(stack)
        for v in [getattr(stack, f.name)]
    }
    return type(stack)(**moved)


# ----------------------------------------------------------------------------- quantizers
def _rtn_params(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and float zero per group; ``wg`` is ``[..., groups, G]``."""
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    span = hi - lo
    scale = torch.where(span > 0, span / qmax, torch.ones_like(span))
    return scale, -lo / scale


def _codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(wg / scale + zero), 0, qmax)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """HQQ's generalized soft-thresholding: the proximal operator of ``|x|^p / beta``."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * (x.abs() + 1e-8).pow(p - 1.0))


def _sq_error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    w_hat = (_codes(wg, scale, zero, qmax) - zero) * scale
    return (w_hat - wg).pow(2).sum(-1, keepdim=True)


def _hqq_params(
    wg: torch.Tensor, qmax: int, cfg: HQQConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ refinement of the RTN scale and zero; see the module docstring."""
    scale, zero = _rtn_params(wg, qmax)
    best_s, best_z, best_err = scale, zero, _sq_error(wg, scale, zero, qmax)
    beta = cfg.beta
    for _ in range(cfg.iters):
        u = wg / scale                                          # weights in steps
        q = _codes(wg, scale, zero, qmax)
        e = _shrink_lp(u - (q - zero), beta, cfg.lp_norm)       # sparse error, in steps
        zero = (q - (u - e)).mean(-1, keepdim=True)
        if cfg.update_scale:
            d, target = q - zero, (u - e) * scale
            num, den = (d * target).sum(-1, keepdim=True), (d * d).sum(-1, keepdim=True)
            scale = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-30), scale)
        beta *= cfg.kappa
        err = _sq_error(wg, scale, zero, qmax)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, scale, best_s), torch.where(better, zero, best_z)
    return best_s, best_z


def _check_int_shape(w: torch.Tensor, p: Precision, group_size: int) -> None:
    if w.dim() != 3:
        raise ValueError(f"expected an expert stack [E, N, K], got shape {tuple(w.shape)}")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"{p.name}: group size must be a positive multiple of 8, got {group_size}")
    if w.shape[-1] % group_size:
        raise ValueError(f"{p.name}: K={w.shape[-1]} is not a multiple of the group size {group_size}")


def _quantize_int_chunk(
    w: torch.Tensor, bits: int, group_size: int, method: QuantMethod, hqq: HQQConfig, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e, n, k = w.shape
    qmax = 2**bits - 1
    wg = w.to(torch.float32).reshape(e, n, k // group_size, group_size)
    if method is QuantMethod.HQQ:
        scale, zero = _hqq_params(wg, qmax, hqq)
    else:
        scale, zero = _rtn_params(wg, qmax)
    scale, zero = scale.to(scale_dtype), zero.to(scale_dtype)  # store first, then code with stored values
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise ValueError(f"int{bits}: scales/zeros overflow {scale_dtype}; use scale_dtype=torch.bfloat16")
    q = _codes(wg, scale.float(), zero.float(), qmax).to(torch.uint8).reshape(e, n, k)
    return pack_codes(q, bits), scale.squeeze(-1), zero.squeeze(-1)


def quantize_stack(
    w: torch.Tensor,
    precision: str | Precision,
    method: QuantMethod = QuantMethod.RTN,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float16,
    hqq: HQQConfig = DEFAULT_HQQ,
    experts_per_chunk: int = 8,
) -> WeightStack:
    """Quantize an expert stack ``[E, N, K]`` (K = input dim) into ``precision``.

    ``group_size`` defaults to the registry's; work runs ``experts_per_chunk`` experts at a time
    on ``w``'s device to bound temporary memory.
    """
    p = get_precision(precision) if isinstance(precision, str) else precision
    if p.name == "bf16":
        return DenseStack(w.to(torch.bfloat16).contiguous())
    if p.name == "fp8":
        return quantize_fp8(w)
    bits = int(p.name.removeprefix("int")) if p.name.startswith("int") else -1
    if bits not in INT_BITS:
        raise ValueError(f"no quantizer for precision {p.name!r}")
    gs = p.group_size if group_size is None else group_size
    _check_int_shape(w, p, gs)
    parts = [
        _quantize_int_chunk(w[i : i + experts_per_chunk], bits, gs, method, hqq, scale_dtype)
        for i in range(0, w.shape[0], experts_per_chunk)
    ]
    q, s, z = (torch.cat(t).contiguous() for t in zip(*parts, strict=True))
    return QuantizedStack(bits=bits, group_size=gs, qweight=q, scales=s, zeros=z)


def quantize_fp8(w: torch.Tensor) -> Fp8Stack:
    """fp8 e4m3 with a per-row fp32 scale (row amax maps to 448)."""
    if w.dim() != 3:
        raise ValueError(f"expected an expert stack [E, N, K], got shape {tuple(w.shape)}")
    wf = w.to(torch.float32)
    amax = wf.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (wf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Stack(codes.contiguous(), scale.contiguous())


def registry_bytes(stack: WeightStack) -> int:
    """Bytes the Precision registry assigns this stack (per matrix, times E)."""
    e, n, k = stack.shape
    p = get_precision(stack.precision)
    if isinstance(stack, QuantizedStack):
        p = dataclasses.replace(p, group_size=stack.group_size)
    return e * p.matrix_bytes(n, k)
