"""Table-driven grouped MoE kernels for many tokens (prefill chunks, large batches); imports triton.

Dimension legend: T tokens, k per token, S = T*k pairs, E experts, H hidden, I expert
intermediate, BM pair rows per block, BN output rows per program, R padded plan rows.

The decode kernels (:mod:`runtime.fused_moe`) run one GEMV per (token, expert) pair, which
re-reads an expert's weights for every token that picks it. Here the pairs are first sorted by
expert and padded to blocks of BM rows of one expert (:func:`runtime.grouped.build_plan` with
one group per expert, one launch), and each program multiplies a dequantized weight tile by a
BM-row activation tile on the tensor cores (``tl.dot``), so each weight tile is read once per
block. As in the decode kernels, each block reads its expert's residency code from the table
and branches on the class: every precision of the layer is served by the same two launches.

Integer codes meet activations one bit plane at a time (field ``s`` of byte ``j`` is code
``PER*j + s``): ``codes_s [BN, KB] @ a[k0 + PER*j + s] [KB, BM]``; codes are exact in bf16, and
each group adds ``scale * (codes . a - zero * sum(a))`` in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moebits.runtime.fused_moe import MoeKernelConfig, kept_of, launch_consts, slab_address, slab_field
from moebits.runtime.grouped import ClassLayout, build_plan, plan_rows
from moebits.runtime.residency import PoolDescriptor

BLOCK_M = 16


@triton.jit
def _op(v, F32DOT: tl.constexpr):
    """A dot operand: bf16 (tensor cores), or float32 where Triton's interpreter needs it (its bf16 dot is wrong)."""
    if F32DOT:
        out = v.to(tl.float32)
    else:
        out = v.to(tl.bfloat16)
    return out


@triton.jit
def _plane_mm(wrow, nmask, a_rows, amask, byte0, k0, PER: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
              BN: tl.constexpr, BM: tl.constexpr, F32DOT: tl.constexpr):
    """(sum_s codes_s @ a_s ``[BN, BM]``, sum of the group's activations ``[BM]``) for one bit plane."""
    KB: tl.constexpr = G // PER
    j = tl.arange(0, KB)
    b = tl.load(wrow + byte0 + j[None, :], mask=nmask[:, None], other=0).to(tl.int32)     # [BN, KB]
    d = tl.zeros([BN, BM], dtype=tl.float32)
    xs = tl.zeros([BM], dtype=tl.float32)
    for s in tl.static_range(PER):
        f = ((b >> (s * W)) & ((1 << W) - 1)).to(tl.float32)
        a = tl.load(a_rows[None, :] + (k0 + j * PER + s)[:, None], mask=amask[None, :], other=0.0)  # [KB, BM]
        d += tl.dot(_op(f, F32DOT), _op(a, F32DOT))
        xs += tl.sum(a.to(tl.float32), axis=0)
    return d, xs


@triton.jit
def _mm_int(w, s, z, rows, nmask, a_rows, amask, K: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
            BN: tl.constexpr, BM: tl.constexpr, F32DOT: tl.constexpr):
    RB: tl.constexpr = K * BITS // 8
    NG: tl.constexpr = K // G
    wrow = w + rows.to(tl.int64)[:, None] * RB
    srow = s.to(tl.pointer_type(tl.float16)) + rows.to(tl.int64) * NG
    zrow = z.to(tl.pointer_type(tl.float16)) + rows.to(tl.int64) * NG
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for g in tl.range(0, NG):
        k0 = g * G
        if BITS == 3:
            d, xs = _plane_mm(wrow, nmask, a_rows, amask, k0 // 4, k0, 4, 2, G, BN, BM, F32DOT)
            d2, _ = _plane_mm(wrow, nmask, a_rows, amask, K // 4 + k0 // 8, k0, 8, 1, G, BN, BM, F32DOT)
            d += 4.0 * d2
        else:
            d, xs = _plane_mm(wrow, nmask, a_rows, amask, k0 * BITS // 8, k0, 8 // BITS, BITS, G, BN, BM, F32DOT)
        sc = tl.load(srow + g, mask=nmask, other=0.0).to(tl.float32)
        ze = tl.load(zrow + g, mask=nmask, other=0.0).to(tl.float32)
        acc += sc[:, None] * (d - ze[:, None] * xs[None, :])
    return acc


@triton.jit
def _mm_float(w, rows, nmask, a_rows, amask, K: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
              F32DOT: tl.constexpr):
    BK: tl.constexpr = 64
    wrow = w + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in tl.range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        wt = tl.load(wrow + kk[None, :], mask=nmask[:, None], other=0.0)                      # [BN, BK]
        a = tl.load(a_rows[None, :] + kk[:, None], mask=amask[None, :], other=0.0)            # [BK, BM]
        acc += tl.dot(_op(wt, F32DOT), _op(a, F32DOT))
    return acc


@triton.jit
def _mm_cls(C: tl.constexpr, wp, sp, zp, rows, nmask, a_rows, amask, K: tl.constexpr, BN: tl.constexpr,
            BM: tl.constexpr, G8: tl.constexpr, G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr,
            F32DOT: tl.constexpr):
    """Rows ``rows`` of plain kernel class ``C`` times the ``BM`` activation rows: ``[BN, BM]`` float32."""
    if C == 0:
        acc = _mm_float(wp.to(tl.pointer_type(tl.bfloat16)), rows, nmask, a_rows, amask, K, BN, BM, F32DOT)
    elif C == 1:
        acc = _mm_float(wp.to(tl.pointer_type(tl.float8e4nv)), rows, nmask, a_rows, amask, K, BN, BM, F32DOT)
        acc *= tl.load(sp.to(tl.pointer_type(tl.float32)) + rows, mask=nmask, other=0.0)[:, None]
    elif C == 2:
        acc = _mm_int(wp, sp, zp, rows, nmask, a_rows, amask, K, 8, G8, BN, BM, F32DOT)
    elif C == 3:
        acc = _mm_int(wp, sp, zp, rows, nmask, a_rows, amask, K, 4, G4, BN, BM, F32DOT)
    elif C == 4:
        acc = _mm_int(wp, sp, zp, rows, nmask, a_rows, amask, K, 3, G3, BN, BM, F32DOT)
    else:
        acc = _mm_int(wp, sp, zp, rows, nmask, a_rows, amask, K, 2, G2, BN, BM, F32DOT)
    return acc


@triton.jit
def _mm_mix(buf, d, base, proj: tl.constexpr, rows, nmask, a_rows, amask, K: tl.constexpr, BN: tl.constexpr,
            BM: tl.constexpr, G8: tl.constexpr, G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr,
            F32DOT: tl.constexpr, MIX: tl.constexpr):
    """A channel mix (as :func:`runtime.fused_moe._gemv_mix`): low copy everywhere, kept rows from the high rows."""
    LO: tl.constexpr = MIX & 7
    HI: tl.constexpr = (MIX >> 3) & 7
    NK: tl.constexpr = (MIX >> (6 + 20 * proj)) & 0xFFFFF
    STEPS: tl.constexpr = (MIX >> (46 + 5 * proj)) & 31
    acc = _mm_cls(LO, slab_field(buf, d, base, 2 + 3 * proj), slab_field(buf, d, base, 3 + 3 * proj),
                  slab_field(buf, d, base, 4 + 3 * proj), rows, nmask, a_rows, amask, K, BN, BM, G8, G4, G3, G2, F32DOT)
    if NK > 0:
        rp = slab_field(buf, d, base, 11 + 4 * proj).to(tl.pointer_type(tl.int32))
        pos, kept = kept_of(rp, rows, nmask, NK, STEPS, BN)
        if tl.max(kept.to(tl.int32), 0) > 0:
            hi = _mm_cls(HI, slab_field(buf, d, base, 8 + 4 * proj), slab_field(buf, d, base, 9 + 4 * proj),
                         slab_field(buf, d, base, 10 + 4 * proj), pos, kept, a_rows, amask, K, BN, BM, G8, G4, G3, G2,
                         F32DOT)
            acc = tl.where(kept[:, None], hi, acc)
    return acc


@triton.jit
def _mm_any(buf, d, base, proj: tl.constexpr, cls, rows, nmask, a_rows, amask, K: tl.constexpr,
            BN: tl.constexpr, BM: tl.constexpr, HAS: tl.constexpr, G8: tl.constexpr, G4: tl.constexpr,
            G3: tl.constexpr, G2: tl.constexpr, F32DOT: tl.constexpr, MIX: tl.constexpr):
    wp = slab_field(buf, d, base, 2 + 3 * proj)
    sp = slab_field(buf, d, base, 3 + 3 * proj)
    zp = slab_field(buf, d, base, 4 + 3 * proj)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    if HAS & 8:
        if cls == 3:
            acc = _mm_cls(3, wp, sp, zp, rows, nmask, a_rows, amask, K, BN, BM, G8, G4, G3, G2, F32DOT)
    if HAS & 1:
        if cls == 0:
            acc = _mm_cls(0, wp, sp, zp, rows, nmask, a_rows, amask, K, BN, BM, G8, G4, G3, G2, F32DOT)
    if HAS & 2:
        if cls == 1:
            acc = _mm_cls(1, wp, sp, zp, rows, nmask, a_rows, amask, K, BN, BM, G8, G4, G3, G2, F32DOT)
    if HAS & 4:
        if cls == 2:
            acc = _mm_cls(2, wp, sp, zp, rows, nmask, a_rows, amask, K, BN, BM, G8, G4, G3, G2, F32DOT)
    if HAS & 16:
        if cls == 4:
            acc = _mm_cls(4, wp, sp, zp, rows, nmask, a_rows, amask, K, BN, BM, G8, G4, G3, G2, F32DOT)
    if HAS & 32:
        if cls == 5:
            acc = _mm_cls(5, wp, sp, zp, rows, nmask, a_rows, amask, K, BN, BM, G8, G4, G3, G2, F32DOT)
    if HAS & 64:
        if cls == 6:
            acc = _mm_mix(buf, d, base, proj, rows, nmask, a_rows, amask, K, BN, BM, G8, G4, G3, G2, F32DOT, MIX)
    return acc


@triton.jit
def _block(pair_pad, block_group, class_block, S, BM: tl.constexpr):
    """(live, expert, padded rows, pair ids, valid) of this program's block."""
    blk = tl.program_id(0)
    live = blk < tl.load(class_block + 1)
    e = tl.load(block_group + blk, mask=live, other=0)
    rows = blk * BM + tl.arange(0, BM)
    pair = tl.load(pair_pad + rows, mask=live, other=S)
    return live, e, rows, pair, pair < S


@triton.jit
def _gup_kernel(x_ptr, pair_pad, block_group, class_block, table, desc, buf, h_ptr, S,
                H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                HAS: tl.constexpr, G8: tl.constexpr, G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr,
                F32DOT: tl.constexpr, MIX: tl.constexpr):
    live, e, rows, pair, valid = _block(pair_pad, block_group, class_block, S, BM)
    if live:
        d, base, cls = slab_address(table, desc, e)
        a_rows = x_ptr + tl.where(valid, pair // TOPK, 0).to(tl.int64) * H                   # [BM]
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = n < I
        g = _mm_any(buf, d, base, 0, cls, n, nmask, a_rows, valid, H, BN, BM, HAS, G8, G4, G3, G2, F32DOT, MIX)
        u = _mm_any(buf, d, base, 0, cls, n + I, nmask, a_rows, valid, H, BN, BM, HAS, G8, G4, G3, G2, F32DOT, MIX)
        h = g * tl.sigmoid(g) * u                                                            # [BN, BM]
        tl.store(h_ptr + rows.to(tl.int64)[None, :] * I + n[:, None], h.to(tl.bfloat16), mask=nmask[:, None])


@triton.jit
def _gdown_kernel(h_ptr, pair_pad, block_group, class_block, w_ptr, table, desc, buf, out_ptr, S,
                  H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  HAS: tl.constexpr, G8: tl.constexpr, G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr,
                  F32DOT: tl.constexpr, MIX: tl.constexpr):
    live, e, rows, pair, valid = _block(pair_pad, block_group, class_block, S, BM)
    if live:
        d, base, cls = slab_address(table, desc, e)
        a_rows = h_ptr + rows.to(tl.int64) * I
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = n < H
        y = _mm_any(buf, d, base, 1, cls, n, nmask, a_rows, valid, I, BN, BM, HAS, G8, G4, G3, G2, F32DOT, MIX)
        rw = tl.load(w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        dst = out_ptr + tl.where(valid, pair // TOPK, 0).to(tl.int64)[None, :] * H + n[:, None]
        tl.atomic_add(dst, y * rw[None, :], mask=nmask[:, None] & valid[None, :], sem="relaxed")


def experts_grouped(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor,
                    pd: PoolDescriptor, out: torch.Tensor, zero_out: bool, bn: int = 64, warps: int = 4) -> None:
    """As :func:`runtime.fused_moe.experts` (``out [T, H]`` float32 (+)=), tiled over sorted pairs."""
    t, k = ids.shape
    s, hid, inter, e = t * k, pd.hidden, pd.intermediate, codes.numel()
    dev = x.device
    layout = ClassLayout(("expert",), (e,))
    plan = build_plan(ids, torch.arange(e, dtype=torch.int32, device=dev),
                      torch.tensor([0, e], dtype=torch.int32, device=dev), layout, BLOCK_M,
                      use_triton=dev.type == "cuda")  # the plan kernel does not run in Triton's interpreter
    rows = plan_rows(s, e, BLOCK_M)
    h = torch.empty(rows, inter, dtype=torch.bfloat16, device=dev)                         # [R, I]
    if zero_out:
        out.zero_()
    consts = dict(launch_consts(pd), F32DOT=dev.type != "cuda")
    nb = rows // BLOCK_M
    _gup_kernel[(nb, triton.cdiv(inter, bn))](
        x, plan.pair_pad, plan.block_group, plan.class_block, codes, pd.desc, pd.buffer, h, s,
        H=hid, I=inter, TOPK=k, BM=BLOCK_M, BN=bn, num_warps=warps, **consts)
    _gdown_kernel[(nb, triton.cdiv(hid, bn))](
        h, plan.pair_pad, plan.block_group, plan.class_block, weights, codes, pd.desc, pd.buffer, out, s,
        H=hid, I=inter, TOPK=k, BM=BLOCK_M, BN=bn, num_warps=warps, **consts)


def use_grouped(pairs: int, cfg: MoeKernelConfig) -> bool:
    """Whether a call with ``pairs`` (token, expert) pairs takes the grouped kernels."""
    return cfg.grouped_from_pairs > 0 and pairs >= cfg.grouped_from_pairs
