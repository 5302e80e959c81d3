"""Grouped mixed-precision expert compute: the routing plan and one grouped launch per class.

Dimension legend (gpt-fast style):
    T tokens, k experts per token, S = T*k (token, expert) pairs, H hidden, I expert intermediate,
    C precision classes, P slots in one class's pool, G = sum of P over classes (groups),
    R padded rows of the plan, bm rows per M-block, NB = R / bm blocks.

A *group* is one slot of one class's pool (the weights of one expert in one precision). The plan
sorts the S pairs by group, class-major, and pads every group to a multiple of ``bm`` rows, so a
block of ``bm`` rows belongs to one group (vLLM's ``moe_align_block_size``). Everything is
computed on the device with static shapes and no host synchronisation, so a forward can be
captured in a CUDA graph: on CUDA by one Triton kernel, elsewhere by torch ops.

Each class then runs one grouped launch per projection:
    bf16        torch._grouped_mm (CUDA; CPU kernels exist too)
    fp8         torch._scaled_grouped_mm with row-wise activation scales (CUDA, sm_90)
    int8/4/3/2  fused dequantize-GEMM Triton kernels (CUDA), gate/up + SwiGLU in one kernel
and, where a fast path is missing (CPU), the active slots are dequantized and run through
torch._grouped_mm, or a per-expert loop for dtypes it lacks. Every path puts its pairs'
weighted outputs into one zero-initialized ``[S + 1, H]`` fp32 buffer (row S takes padding rows;
the Triton path may add split-K partial sums) that is summed over k.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from moebits.runtime.channelmix import AnyStack
from moebits.runtime.quant import DenseStack, Fp8Stack, QuantizedStack
from moebits.runtime.routeplan import ClassLayout, RoutePlan, class_block_bound, plan_rows

__all__ = ["ClassLayout", "RoutePlan", "build_plan", "class_block_bound", "plan_rows", "run_class", "triton_kernels"]

FP8_MAX = 448.0
GROUPED_MM_MAX_GROUPS = 1024  # torch._grouped_mm refuses more groups ("Can't process more than 1024 groups")


# ----------------------------------------------------------------------------- the plan
def build_plan_torch(
    topk_ids: torch.Tensor, group_of_expert: torch.Tensor, class_base: torch.Tensor, layout: ClassLayout,
    block_m: int,
) -> RoutePlan:
    """The plan with torch ops (any device, no host sync); the reference for the Triton one.

    ``group_of_expert [E]`` int32 maps experts to global groups; ``class_base [C + 1]`` int32 is
    ``layout.bases`` on the device (kept there so that a CUDA graph can capture the call).
    """
    t, k = topk_ids.shape
    s, dev = t * k, topk_ids.device
    g = group_of_expert[topk_ids.reshape(-1).long()].long()                   # [S]
    counts = torch.zeros(layout.groups, dtype=torch.long, device=dev).index_add_(0, g, torch.ones_like(g))
    padded = (counts + block_m - 1) // block_m * block_m                        # [G]
    pad_end = padded.cumsum(0)
    order = torch.argsort(g, stable=True)                                       # [S]
    g_sorted = g[order]
    rank = torch.arange(s, device=dev) - (counts.cumsum(0) - counts)[g_sorted]
    pos = (pad_end - padded)[g_sorted] + rank                                   # [S]
    rows = plan_rows(s, layout.groups, block_m)
    pair_pad = torch.full((rows,), s, dtype=torch.int32, device=dev)
    pair_pad[pos] = order.to(torch.int32)
    starts = torch.arange(rows // block_m, device=dev) * block_m
    block_group = torch.searchsorted(pad_end, starts, right=True)               # [NB]
    block_group = torch.where(block_group < layout.groups, block_group, -1)
    pad_end_ext = torch.cat([pad_end.new_zeros(1), pad_end])
    return RoutePlan(
        block_m, t, k, pair_pad, block_group.to(torch.int32), pad_end.to(torch.int32),
        (pad_end_ext[class_base.long()] // block_m).to(torch.int32),
    )


@functools.cache
def triton_kernels() -> ModuleType | None:
    """The Triton kernel module, imported on first use; None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module("moebits.runtime.triton_kernels")


def build_plan(
    topk_ids: torch.Tensor, group_of_expert: torch.Tensor, class_base: torch.Tensor, layout: ClassLayout,
    block_m: int, use_triton: bool,
) -> RoutePlan:
    """The plan: one Triton launch where ``use_triton``, torch ops otherwise."""
    tk = triton_kernels() if use_triton else None
    if tk is not None:
        return tk.build_plan(topk_ids, group_of_expert, class_base, layout, block_m)
    return build_plan_torch(topk_ids, group_of_expert, class_base, layout, block_m)


# ----------------------------------------------------------------------------- torch paths
@dataclass(frozen=True)
class ClassRows:
    """The rows one class computes, rotated so that the class's first padded row is row 0."""

    tok: torch.Tensor         # [R] token of each row (0 for padding)
    pair: torch.Tensor        # [R] pair id, S for padding
    dest: torch.Tensor        # [R] output row: the pair id, or S for rows the class must drop
    offs: torch.Tensor        # [P] int32 cumulative row ends of the class's groups


def class_rows(plan: RoutePlan, layout: ClassLayout, c: int) -> ClassRows:
    """Rotate the plan's rows for class ``c`` (device arithmetic only, no host sync)."""
    s, rows, dev = plan.pairs, plan.rows, plan.pair_pad.device
    ar = torch.arange(rows, device=dev)
    if c == 0:  # the first class always starts at row 0
        row_start: torch.Tensor | int = 0
        pair = plan.pair_pad.long()
    else:
        row_start = plan.class_block[c].long() * plan.block_m
        pair = plan.pair_pad[(ar + row_start) % rows].long()
    n_rows = (plan.class_block[c + 1] - plan.class_block[c]).long() * plan.block_m
    dest = torch.where((ar < n_rows) & (pair < s), pair, s)
    tok = torch.where(pair < s, pair // plan.top_k, 0)
    base, p = layout.bases[c], layout.slots[c]
    offs = (plan.group_pad_end[base : base + p] - row_start).to(torch.int32)
    return ClassRows(tok, pair, dest, offs)


def _grouped_linear(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a [R, K]`` by groups of rows times ``w [P, N, K]``.T -> ``[R, N]``; rows past offs[-1] undefined."""
    cuda_ok = a.is_cuda and a.dtype == torch.bfloat16
    cpu_ok = not a.is_cuda and a.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if (cuda_ok or cpu_ok) and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
    out = a.new_zeros(a.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ w[g].T
        start = end
    return out


def _swiglu(gu: torch.Tensor) -> torch.Tensor:
    """``[R, 2I]`` (gate, up) -> ``[R, I]``: silu(gate) * up, as Qwen3-MoE."""
    i = gu.shape[-1] // 2
    return F.silu(gu[:, :i]) * gu[:, i:]


def _rowwise_fp8(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise fp8 e4m3 activations ``[R, K]`` and their fp32 scales ``[R]``."""
    scale = a.abs().amax(-1).float().clamp_min(1e-12) / FP8_MAX
    return (a.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def fp8_grouped_supported(device: torch.device) -> bool:
    """torch._scaled_grouped_mm runs on CUDA sm_90+ only."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_grouped_mm")
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def _scatter_weighted(y: torch.Tensor, rows: ClassRows, w_ext: torch.Tensor, y_pair: torch.Tensor) -> None:
    """``y_pair[pair] = y * routing weight`` for the class's rows (dropped rows go to row S)."""
    y = y.float() * w_ext[rows.pair].unsqueeze(-1)
    y_pair.index_copy_(0, rows.dest, y)


def dense_class(x: torch.Tensor, rows: ClassRows, gate_up: DenseStack, down: DenseStack,
                w_ext: torch.Tensor, y_pair: torch.Tensor) -> None:
    """bf16 class: two torch._grouped_mm calls over the whole pool (empty groups cost nothing)."""
    a = x[rows.tok]                                                # [R, H]
    h = _swiglu(_grouped_linear(a, gate_up.weight, rows.offs))     # [R, I]
    _scatter_weighted(_grouped_linear(h, down.weight, rows.offs), rows, w_ext, y_pair)


def fp8_class(x: torch.Tensor, rows: ClassRows, gate_up: Fp8Stack, down: Fp8Stack,
              w_ext: torch.Tensor, y_pair: torch.Tensor) -> None:
    """fp8 class: torch._scaled_grouped_mm, activations quantized row-wise on the fly."""
    a8, sa = _rowwise_fp8(x[rows.tok])                             # [R, H], [R]
    gu = torch._scaled_grouped_mm(a8, gate_up.weight.transpose(-2, -1), sa, gate_up.scale,
                                  offs=rows.offs, out_dtype=torch.bfloat16)
    h8, sh = _rowwise_fp8(_swiglu(gu))                             # [R, I], [R]
    y = torch._scaled_grouped_mm(h8, down.weight.transpose(-2, -1), sh, down.scale,
                                 offs=rows.offs, out_dtype=torch.bfloat16)
    _scatter_weighted(y, rows, w_ext, y_pair)


def dequant_class(x: torch.Tensor, rows: ClassRows, gate_up: AnyStack, down: AnyStack,
                  w_ext: torch.Tensor, y_pair: torch.Tensor) -> None:
    """Any class (channel mixes included), any device: dequantize the active slots, then a
    grouped matmul (host sync)."""
    counts = torch.diff(rows.offs, prepend=rows.offs.new_zeros(1))
    active = torch.nonzero(counts > 0).flatten()
    if active.numel() == 0:
        return
    a = x[rows.tok]
    offs = rows.offs[active]
    h = _swiglu(_grouped_linear(a, gate_up.dequantize(active, a.dtype), offs))
    _scatter_weighted(_grouped_linear(h, down.dequantize(active, a.dtype), offs), rows, w_ext, y_pair)


def run_class(
    x: torch.Tensor, plan: RoutePlan, layout: ClassLayout, c: int, gate_up: AnyStack,
    down: AnyStack, w_ext: torch.Tensor, y_pair: torch.Tensor, h_buf: torch.Tensor | None,
    use_triton: bool,
) -> None:
    """One class's experts for its pairs, written into ``y_pair``; picks the fastest path."""
    fast = x.is_cuda and x.dtype == torch.bfloat16
    if isinstance(gate_up, QuantizedStack) and isinstance(down, QuantizedStack) and use_triton:
        tk = triton_kernels()
        if tk is not None and h_buf is not None and tk.supports(gate_up) and tk.supports(down):
            tk.int_class(x, plan, layout, c, gate_up, down, w_ext, y_pair, h_buf)
            return
    rows = class_rows(plan, layout, c)
    fast = fast and gate_up.shape[0] <= GROUPED_MM_MAX_GROUPS  # else: the active slots only (host sync)
    if fast and isinstance(gate_up, DenseStack) and isinstance(down, DenseStack):
        dense_class(x, rows, gate_up, down, w_ext, y_pair)
    elif fast and isinstance(gate_up, Fp8Stack) and isinstance(down, Fp8Stack) and fp8_grouped_supported(x.device):
        fp8_class(x, rows, gate_up, down, w_ext, y_pair)
    else:
        dequant_class(x, rows, gate_up, down, w_ext, y_pair)
