"""Triton kernels for the mixed-precision MoE layer (imports triton: load it lazily, CUDA only).

Dimension legend: as in runtime/grouped.py (T tokens, k per token, S = T*k pairs, H hidden,
I expert intermediate, P slots in a pool, R padded plan rows, bm = BM rows per block).

* ``_plan_kernel``: one program builds the whole RoutePlan: a histogram of pairs per group,
  per-group padding to BM rows, a cumulative sum, and an atomic cursor per group that scatters
  each pair to its padded row (order inside a group is free, so atomics need no sort).
* ``_gate_up_kernel``: for a block of BM rows of one expert and BN intermediate columns, the
  gate and up projections from packed integer weights, then SwiGLU, into ``h [R, I]``.
* ``_down_kernel``: ``h`` times the packed down projection, scaled by the routing weight, into
  the pair's row of ``y_pair [S + 1, H]``.
* For few pairs per class (decode of a class holding part of the experts) both kernels split
  K over SPLIT_K programs that add partial sums with atomics (gate/up into a zeroed fp32
  ``[R, 2I]`` buffer, SwiGLU after): otherwise too few programs are live to keep HBM busy.

Integer weights are never dequantized in memory: per K-block (one quantization group) the
kernel takes the dot of the raw codes with the activations, one ``tl.dot`` per bit field of a
byte (field ``s`` of byte ``j`` is code ``PER*j + s``, so it meets activations ``PER*j + s``),
and applies the group's scale and zero afterwards:
``sum_k (q_k - z) s x_k = s * (sum_k q_k x_k - z * sum_k x_k)``. Codes up to 8 bits are exact
in bf16, so the dot itself adds no weight rounding.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from moebits.runtime.quant import QuantizedStack
from moebits.runtime.routeplan import ClassLayout, RoutePlan, class_block_bound, plan_rows


# ----------------------------------------------------------------------------- plan
@triton.jit
def _plan_kernel(
    ids_ptr, group_of_expert_ptr, class_base_ptr, cursor_ptr,
    pair_pad_ptr, block_group_ptr, group_pad_end_ptr, class_block_ptr,
    S, G, R, NB,
    BM: tl.constexpr, BLOCK_S: tl.constexpr, GB: tl.constexpr, FILL: tl.constexpr, NCLS: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_S)
    smask = offs < S
    e = tl.load(ids_ptr + offs, mask=smask, other=0)
    g = tl.load(group_of_expert_ptr + e, mask=smask, other=0)
    g = tl.where(smask, g, GB - 1)                         # padding lanes land in a spare bin
    gr = tl.arange(0, GB)
    counts = tl.where(gr < G, tl.histogram(g, GB), 0)      # [GB] pairs per group
    padded = (counts + BM - 1) // BM * BM
    pad_end = tl.cumsum(padded, 0)
    pad_start = pad_end - padded
    tl.store(group_pad_end_ptr + gr, pad_end, mask=gr < G)
    tl.store(cursor_ptr + gr, pad_start)
    for off in range(0, R, FILL):
        f = off + tl.arange(0, FILL)
        tl.store(pair_pad_ptr + f, tl.zeros([FILL], tl.int32) + S, mask=f < R)
    for off in range(0, NB, FILL):
        f = off + tl.arange(0, FILL)
        tl.store(block_group_ptr + f, tl.full([FILL], -1, tl.int32), mask=f < NB)
    for c in tl.static_range(NCLS + 1):
        base = tl.load(class_base_ptr + c)
        tl.store(class_block_ptr + c, tl.sum(tl.where(gr < base, padded, 0)) // BM)
    tl.debug_barrier()
    pos = tl.atomic_add(cursor_ptr + g, tl.full([BLOCK_S], 1, tl.int32), mask=smask)
    tl.store(pair_pad_ptr + pos, offs, mask=smask)
    nblk = padded // BM
    first = pad_start // BM
    for j in range(0, tl.max(nblk, 0)):
        tl.store(block_group_ptr + first + j, gr, mask=j < nblk)


def build_plan(
    topk_ids: torch.Tensor, group_of_expert: torch.Tensor, class_base: torch.Tensor, layout: ClassLayout,
    block_m: int,
) -> RoutePlan:
    """RoutePlan in one launch; same tensors as grouped.build_plan_torch up to order in a group."""
    t, k = topk_ids.shape
    s, dev, g_tot = t * k, topk_ids.device, layout.groups
    rows = plan_rows(s, g_tot, block_m)
    nb = rows // block_m
    gb = triton.next_power_of_2(g_tot + 1)
    def i32(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int32, device=dev)

    pair_pad, block_group = i32(rows), i32(nb)
    group_pad_end, class_block = i32(g_tot), i32(len(layout.slots) + 1)
    cursor = i32(gb)
    _plan_kernel[(1,)](
        topk_ids.reshape(-1), group_of_expert, class_base, cursor,
        pair_pad, block_group, group_pad_end, class_block,
        s, g_tot, rows, nb,
        BM=block_m, BLOCK_S=triton.next_power_of_2(max(s, 16)), GB=gb, FILL=1024,
        NCLS=len(layout.slots), num_warps=4,
    )
    return RoutePlan(block_m, t, k, pair_pad, block_group, group_pad_end, class_block)


# ----------------------------------------------------------------------------- GEMM pieces
@triton.jit
def _plane_dot(
    w_rows, nmask, a_rows, a_mask, k0,
    PER: tl.constexpr, WIDTH: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    WITH_SUM: tl.constexpr,
):
    """One bit plane of one K-block: ``sum_k code[n, k] * a[m, k]`` -> [BN, BM], and sum_k a[m, k]."""
    KB: tl.constexpr = BK // PER
    jj = tl.arange(0, KB)
    b = tl.load(w_rows[:, None] + jj[None, :], mask=nmask[:, None], other=0)      # [BN, KB] uint8
    d = tl.zeros([BN, BM], dtype=tl.float32)
    xs = tl.zeros([BM], dtype=tl.float32)
    for s in tl.static_range(PER):
        a = tl.load(a_rows[None, :] + (k0 + jj * PER + s)[:, None], mask=a_mask[None, :], other=0.0)
        c = ((b >> (s * WIDTH)) & ((1 << WIDTH) - 1)).to(tl.float32).to(a.dtype)                  # [BN, KB]
        d += tl.dot(c, a)                                                          # [BN, BM]
        if WITH_SUM:
            xs += tl.sum(a.to(tl.float32), axis=0)
    return d, xs


@triton.jit
def _unpack(b, PER: tl.constexpr, WIDTH: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr):
    """Bytes ``[BN, KB]`` -> codes ``[BN, KB * PER]`` in memory order (field s of byte j is code PER*j+s).

    ``tl.join`` stacks fields in a new last dim; nesting the joins as below makes the row-major
    reshape put field ``s`` of byte ``j`` at position ``PER*j + s``.
    """
    M: tl.constexpr = (1 << WIDTH) - 1
    if PER == 1:
        out = b
    elif PER == 2:
        out = tl.reshape(tl.join(b & M, b >> WIDTH), [BN, KB * 2])
    elif PER == 4:
        f0, f1, f2, f3 = b & M, (b >> WIDTH) & M, (b >> 2 * WIDTH) & M, (b >> 3 * WIDTH) & M
        out = tl.reshape(tl.join(tl.join(f0, f2), tl.join(f1, f3)), [BN, KB * 4])
    else:
        f0, f1, f2, f3 = b & M, (b >> WIDTH) & M, (b >> 2 * WIDTH) & M, (b >> 3 * WIDTH) & M
        f4, f5, f6, f7 = (b >> 4 * WIDTH) & M, (b >> 5 * WIDTH) & M, (b >> 6 * WIDTH) & M, (b >> 7 * WIDTH) & M
        lo = tl.join(tl.join(f0, f4), tl.join(f2, f6))
        hi = tl.join(tl.join(f1, f5), tl.join(f3, f7))
        out = tl.reshape(tl.join(lo, hi), [BN, KB * 8])
    return out


@triton.jit
def _load_plane(w_rows, nmask, byte0, PER: tl.constexpr, WIDTH: tl.constexpr, BK: tl.constexpr,
                BN: tl.constexpr):
    KB: tl.constexpr = BK // PER
    b = tl.load(w_rows[:, None] + byte0 + tl.arange(0, KB)[None, :], mask=nmask[:, None], other=0)
    return _unpack(b, PER, WIDTH, BN, KB)                                          # [BN, BK]


@triton.jit
def _codes_tile(w_rows, nmask, k0, K, BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Codes ``[BN, BK]`` (uint8) of K-block ``k0`` for rows ``w_rows``."""
    if BITS == 8:
        codes = _load_plane(w_rows, nmask, k0, 1, 8, BK, BN)
    elif BITS == 4:
        codes = _load_plane(w_rows, nmask, k0 // 2, 2, 4, BK, BN)
    elif BITS == 2:
        codes = _load_plane(w_rows, nmask, k0 // 4, 4, 2, BK, BN)
    else:  # 3 bits: the int2 plane of low bits, then the bit plane of third bits after K/4 bytes
        lo = _load_plane(w_rows, nmask, k0 // 4, 4, 2, BK, BN)
        hi = _load_plane(w_rows, nmask, K // 4 + k0 // 8, 8, 1, BK, BN)
        codes = lo | (hi << 2)
    return codes


@triton.jit
def _kblock(
    w_rows, nmask, a_rows, a_mask, k0, K,
    BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, JOIN: tl.constexpr,
):
    """Integer-code dot of one K-block for rows ``w_rows`` (byte pointers to row starts).

    JOIN: unpack to a ``[BN, BK]`` tile and take one dot with contiguous activations; else one
    dot per bit field against strided activations (no join/reshape; the fallback).
    """
    if JOIN:
        a = tl.load(a_rows[None, :] + (k0 + tl.arange(0, BK))[:, None], mask=a_mask[None, :], other=0.0)
        codes = _codes_tile(w_rows, nmask, k0, K, BITS, BK, BN)
        d = tl.dot(codes.to(tl.float32).to(a.dtype), a)                            # [BN, BM]
        xs = tl.sum(a.to(tl.float32), axis=0)                                      # [BM]
    elif BITS == 8:
        d, xs = _plane_dot(w_rows + k0, nmask, a_rows, a_mask, k0, 1, 8, BK, BN, BM, True)
    elif BITS == 4:
        d, xs = _plane_dot(w_rows + k0 // 2, nmask, a_rows, a_mask, k0, 2, 4, BK, BN, BM, True)
    elif BITS == 2:
        d, xs = _plane_dot(w_rows + k0 // 4, nmask, a_rows, a_mask, k0, 4, 2, BK, BN, BM, True)
    else:
        d, xs = _plane_dot(w_rows + k0 // 4, nmask, a_rows, a_mask, k0, 4, 2, BK, BN, BM, True)
        d2, _ = _plane_dot(w_rows + K // 4 + k0 // 8, nmask, a_rows, a_mask, k0, 8, 1, BK, BN, BM, False)
        d += 4.0 * d2
    return d, xs


@triton.jit
def _scaled(acc, d, xs, s_rows, z_rows, nmask, gi):
    """acc += scale * (codes . a - zero * sum(a)) for group ``gi`` of each row."""
    sc = tl.load(s_rows + gi, mask=nmask, other=0.0).to(tl.float32)
    ze = tl.load(z_rows + gi, mask=nmask, other=0.0).to(tl.float32)
    return acc + sc[:, None] * (d - ze[:, None] * xs[None, :])


@triton.jit
def _block_rows(class_block_ptr, block_group_ptr, pair_pad_ptr, S, group_base, CLASS: tl.constexpr,
                BM: tl.constexpr):
    """This program's block: (in range?, slot in the class pool, padded rows, pair ids)."""
    blk = tl.load(class_block_ptr + CLASS) + tl.program_id(0)
    live = blk < tl.load(class_block_ptr + CLASS + 1)
    slot = tl.load(block_group_ptr + blk, mask=live, other=group_base) - group_base
    rows = blk * BM + tl.arange(0, BM)
    pair = tl.load(pair_pad_ptr + rows, mask=live, other=S)
    return live, slot.to(tl.int64), rows.to(tl.int64), pair


@triton.jit
def _gate_up_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, pair_pad_ptr, block_group_ptr, class_block_ptr, h_ptr, gu_ptr,
    S, TOPK, K, I, group_base,
    stride_qe, stride_qn, stride_se, stride_sn,
    CLASS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, JOIN: tl.constexpr, SPLIT_K: tl.constexpr,
):
    live, slot, rows, pair = _block_rows(class_block_ptr, block_group_ptr, pair_pad_ptr, S, group_base,
                                         CLASS, BM)
    if live:
        valid = pair < S
        a_rows = x_ptr + tl.where(valid, pair // TOPK, 0).to(tl.int64) * K     # [BM] row pointers
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)                      # gate rows; up = +I
        nmask = offs_n < I
        qg = q_ptr + slot * stride_qe + offs_n.to(tl.int64) * stride_qn
        qu = qg + I * stride_qn
        sg = s_ptr + slot * stride_se + offs_n.to(tl.int64) * stride_sn
        zg = z_ptr + slot * stride_se + offs_n.to(tl.int64) * stride_sn
        acc_g = tl.zeros([BN, BM], dtype=tl.float32)
        acc_u = tl.zeros([BN, BM], dtype=tl.float32)
        k_per = K // SPLIT_K                                                   # this program's K slice
        for k0 in range(tl.program_id(2) * k_per, (tl.program_id(2) + 1) * k_per, BK):
            gi = k0 // GROUP
            d, xs = _kblock(qg, nmask, a_rows, valid, k0, K, BITS, BK, BN, BM, JOIN)
            acc_g = _scaled(acc_g, d, xs, sg, zg, nmask, gi)
            d, xs = _kblock(qu, nmask, a_rows, valid, k0, K, BITS, BK, BN, BM, JOIN)
            acc_u = _scaled(acc_u, d, xs, sg + I * stride_sn, zg + I * stride_sn, nmask, gi)
        if SPLIT_K == 1:
            h = acc_g * tl.sigmoid(acc_g) * acc_u                               # [BN, BM] SwiGLU
            h_out = h_ptr + rows[None, :] * I + offs_n[:, None]
            tl.store(h_out, h.to(h_ptr.dtype.element_ty), mask=nmask[:, None])
        else:  # partial sums into the zeroed fp32 gate/up buffer [R, 2I]; SwiGLU runs after
            gu_out = gu_ptr + rows[None, :] * (2 * I) + offs_n[:, None]
            tl.atomic_add(gu_out, acc_g, mask=nmask[:, None], sem="relaxed")
            tl.atomic_add(gu_out + I, acc_u, mask=nmask[:, None], sem="relaxed")


@triton.jit
def _down_kernel(
    h_ptr, q_ptr, s_ptr, z_ptr, pair_pad_ptr, block_group_ptr, class_block_ptr, w_ptr, y_ptr,
    S, K, N, group_base,
    stride_qe, stride_qn, stride_se, stride_sn,
    CLASS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, JOIN: tl.constexpr, SPLIT_K: tl.constexpr,
):
    live, slot, rows, pair = _block_rows(class_block_ptr, block_group_ptr, pair_pad_ptr, S, group_base,
                                         CLASS, BM)
    if live:
        valid = pair < S
        a_rows = h_ptr + rows * K                                               # [BM] row pointers
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = offs_n < N
        qd = q_ptr + slot * stride_qe + offs_n.to(tl.int64) * stride_qn
        sd = s_ptr + slot * stride_se + offs_n.to(tl.int64) * stride_sn
        zd = z_ptr + slot * stride_se + offs_n.to(tl.int64) * stride_sn
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        k_per = K // SPLIT_K
        for k0 in range(tl.program_id(2) * k_per, (tl.program_id(2) + 1) * k_per, BK):
            d, xs = _kblock(qd, nmask, a_rows, valid, k0, K, BITS, BK, BN, BM, JOIN)
            acc = _scaled(acc, d, xs, sd, zd, nmask, k0 // GROUP)
        rw = tl.load(w_ptr + pair, mask=valid, other=0.0).to(tl.float32)       # [BM] routing weights
        y_out = y_ptr + pair[None, :].to(tl.int64) * N + offs_n[:, None]
        if SPLIT_K == 1:
            tl.store(y_out, acc * rw[None, :], mask=nmask[:, None] & valid[None, :])
        else:  # y_pair rows of this class start at zero
            tl.atomic_add(y_out, acc * rw[None, :], mask=nmask[:, None] & valid[None, :], sem="relaxed")


# ----------------------------------------------------------------------------- launcher
_CODES_PER_BYTE = {8: 1, 4: 2, 2: 4, 3: 8}  # the densest plane of each format
_SPLIT_MAX_PAIRS = 64          # never split K beyond this many pairs (prefill has parallelism enough)
_SPLIT_BELOW_CLASS_PAIRS = 8.0  # split when the class expects fewer pairs than this (see split_k)
_CONFIGS = [
    triton.Config({"BN": 32}, num_warps=4, num_stages=3),
    triton.Config({"BN": 64}, num_warps=4, num_stages=3),
    triton.Config({"BN": 128}, num_warps=4, num_stages=3),
    triton.Config({"BN": 64}, num_warps=8, num_stages=3),
]
_FIXED = dict(BN=32, num_warps=4, num_stages=3)  # interpreter (cannot time), or autotuning off
_TUNED = {  # restore_value: split-K accumulates, so every timed config must start from the same buffer
    "gate_up": triton.autotune(_CONFIGS, key=["S", "K", "I", "BITS", "JOIN", "SPLIT_K"],
                               restore_value=["gu_ptr"])(_gate_up_kernel),
    "down": triton.autotune(_CONFIGS, key=["S", "K", "N", "BITS", "JOIN", "SPLIT_K"],
                            restore_value=["y_ptr"])(_down_kernel),
}


def split_k(pairs: int, class_pairs: float, k: int, bk: int) -> int:
    """K slices per program: the most of 8/4/2 leaving >= 2 K-blocks a slice, or 1 (no split).

    Split only when the class expects few pairs (``class_pairs`` = pairs x its share of the
    slots), i.e. when its live programs are too few to keep HBM busy. Measured on an H100 at
    1 token, CUDA graphs: one int4 class holding all 128 experts ran 51.7 us unsplit vs 59.9
    split (the zeroing, atomics and separate SwiGLU cost more than they gain); four integer
    classes (32/64/16/16 experts) ran 124.8 us split vs 180.2 unsplit.
    ``MOEBITS_TRITON_SPLITK=0`` never splits, ``=force`` splits whenever pairs allow.
    """
    mode = os.environ.get("MOEBITS_TRITON_SPLITK", "auto")
    if mode == "0" or pairs > _SPLIT_MAX_PAIRS:
        return 1
    if mode != "force" and class_pairs >= _SPLIT_BELOW_CLASS_PAIRS:
        return 1
    return next((s for s in (8, 4, 2) if k % (s * bk) == 0 and k // (s * bk) >= 2), 1)


def tuned_configs() -> dict[str, dict]:
    """The configs the autotuner chose so far, per kernel and key (for benchmark reports)."""
    return {name: {str(k): str(v) for k, v in fn.cache.items()} for name, fn in _TUNED.items()}


def supports(stack: QuantizedStack) -> bool:
    """Whether the kernels take this stack: BK divides the group and every plane's dot has K >= 16."""
    bk = min(stack.group_size, 128)
    return stack.group_size % bk == 0 and bk // _CODES_PER_BYTE[stack.bits] >= 16


def _launch(name: str, raw, device: torch.device, grid: tuple[int, int, int], *args, **kwargs) -> None:
    """Autotuned launch on CUDA (the first call per key times the configs); fixed elsewhere.

    ``grid`` is (blocks, columns to cover, K slices). Environment knobs, read at call time:
    ``MOEBITS_TRITON_AUTOTUNE=0`` uses the fixed config on CUDA too (fewer compiles in tests);
    ``MOEBITS_TRITON_UNPACK=slices`` takes one dot per bit field instead of join/reshape
    unpacking; ``MOEBITS_TRITON_SPLITK`` (``0``/``force``) overrides :func:`split_k`.
    """
    blocks, n, splits = grid
    kwargs["JOIN"] = os.environ.get("MOEBITS_TRITON_UNPACK", "join") != "slices"
    if device.type == "cuda" and os.environ.get("MOEBITS_TRITON_AUTOTUNE", "1") != "0":
        _TUNED[name][lambda meta: (blocks, triton.cdiv(n, meta["BN"]), splits)](*args, **kwargs)
    else:
        raw[(blocks, triton.cdiv(n, _FIXED["BN"]), splits)](*args, **kwargs, **_FIXED)


def int_class(
    x: torch.Tensor, plan: RoutePlan, layout: ClassLayout, c: int, gate_up: QuantizedStack,
    down: QuantizedStack, w_ext: torch.Tensor, y_pair: torch.Tensor, h_buf: torch.Tensor,
) -> None:
    """One integer class: gate/up + SwiGLU into ``h_buf``, then down added into ``y_pair``.

    ``y_pair`` rows of this class's pairs must be zero on entry (split-K adds into them).
    """
    _, n_gu, hidden = gate_up.shape
    inter = n_gu // 2
    for st in (gate_up, down):
        if not supports(st):
            raise ValueError(f"int{st.bits} group size {st.group_size} is not supported by the Triton kernels")
    nb = class_block_bound(plan.pairs, layout.slots[c], plan.block_m)
    bk_gu, bk_dn = min(gate_up.group_size, 128), min(down.group_size, 128)
    class_pairs = plan.pairs * layout.slots[c] / layout.groups                   # expected, uniform routing
    split_gu = split_k(plan.pairs, class_pairs, hidden, bk_gu)
    split_dn = split_k(plan.pairs, class_pairs, inter, bk_dn)
    gu_buf = (torch.zeros(plan.rows, n_gu, dtype=torch.float32, device=x.device) if split_gu > 1
              else y_pair.new_zeros(1))                                          # [R, 2I] partial sums
    _launch(
        "gate_up", _gate_up_kernel, x.device, (nb, inter, split_gu),
        x, gate_up.qweight, gate_up.scales, gate_up.zeros,
        plan.pair_pad, plan.block_group, plan.class_block, h_buf, gu_buf,
        plan.pairs, plan.top_k, hidden, inter, layout.bases[c],
        gate_up.qweight.stride(0), gate_up.qweight.stride(1), gate_up.scales.stride(0), gate_up.scales.stride(1),
        CLASS=c, BITS=gate_up.bits, GROUP=gate_up.group_size, BM=plan.block_m, BK=bk_gu, SPLIT_K=split_gu,
    )
    if split_gu > 1:  # SwiGLU over the summed slices, [R, 2I] -> [R, I]
        h_buf.copy_(F.silu(gu_buf[:, :inter]) * gu_buf[:, inter:])
    _launch(
        "down", _down_kernel, x.device, (nb, hidden, split_dn),
        h_buf, down.qweight, down.scales, down.zeros,
        plan.pair_pad, plan.block_group, plan.class_block, w_ext, y_pair,
        plan.pairs, inter, hidden, layout.bases[c],
        down.qweight.stride(0), down.qweight.stride(1), down.scales.stride(0), down.scales.stride(1),
        CLASS=c, BITS=down.bits, GROUP=down.group_size, BM=plan.block_m, BK=bk_dn, SPLIT_K=split_dn,
    )
