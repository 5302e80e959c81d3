"""Triton kernels of the MoE layer for every precision at once (imports triton: load lazily).

Dimension legend: T tokens, k experts per token, S = T*k (token, expert) pairs, E experts,
H hidden, I expert intermediate, BN output rows per program, G quantization group.

Three launches serve a layer, whatever mix of precisions its experts are in:

* ``_route_kernel`` (grid ``[T]``): softmax over the router logits, top-k by repeated argmax,
  renormalization (Qwen3-MoE's ``norm_topk_prob``) -> ids ``[T, k]``, weights ``[T, k]``.
* ``_up_kernel`` (grid ``[S, I / BN]``): for its pair, reads the expert's residency code
  ``(class, slot)`` from the table, branches on the class and computes BN rows of the gate and
  up projections from that class's slab (dequantizing on the fly), then SwiGLU -> ``h [S, I]``
  float32. It optionally zeroes the output ``[T, H]`` that ``_down_kernel`` accumulates into.
* ``_down_kernel`` (grid ``[S, H / BN]``): BN rows of the down projection of ``h``, times the
  pair's routing weight, atomically added into ``out [T, H]`` float32 (the combine over k; in
  the decode step ``out`` is the residual stream itself).

A pool's channel mix (:mod:`runtime.channelmix`, class ``MIX_CLASS``) computes every row from its
low copy and, in a tile holding kept rows, those rows again from the high rows (:func:`kept_of`
finds them), which replace them: its cost is the low GEMV plus, per tile with a kept row, a short
search and the high GEMV of the kept rows.

Decode is a GEMV per pair: no sort, no padding, one program per (pair, row block); programs
of one expert share its weights through L2 when several tokens pick it. Slab addresses come
from the pool descriptor (``runtime.residency.PoolDescriptor``): base + slot * stride + field
offset, in bytes, then cast to the field's type. Integer codes are read a bit plane at a
time (the packed layout of ``runtime.quant``): field ``s`` of byte ``j`` is code ``PER*j + s``
and meets activations ``x[k0 + PER*j + s]``, so no unpacking shuffle is needed; each group
of G codes adds ``scale * (codes . x - zero * sum(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from moebits.core.precision import get_channel_mix
from moebits.runtime.residency import KERNEL_CLASS, PoolDescriptor, group_sizes, kernel_class


@dataclass(frozen=True)
class MoeKernelConfig:
    """Launch shape: rows per program of the up and down kernels, warps per program, integer GEMV variant."""

    bn_up: int = 8      # H200, int4, 1 token: 27.8 us at 8 rows vs 33.8 us at 16 (docs/BENCHMARKS.md)
    bn_down: int = 32
    warps: int = 4
    flat: bool = True   # integer classes: dequantize in the tile, one reduction (else one per group)
    grouped_from_pairs: int = 0  # >0: calls with at least this many pairs take runtime.fused_moe_grouped


DEFAULT_CONFIG = MoeKernelConfig()


# ----------------------------------------------------------------------------- routing
@triton.jit
def _route_kernel(logits_ptr, ids_ptr, w_ptr, E: tl.constexpr, EP: tl.constexpr, TOPK: tl.constexpr,
                  NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, EP)                                            # EP: E rounded up to a power of 2
    lg = tl.load(logits_ptr + t * E + o, mask=o < E, other=-float("inf")).to(tl.float32)
    p = tl.exp(lg - tl.max(lg, 0))
    p = p / tl.sum(p, 0)
    kk = tl.arange(0, TOPK)
    wv = tl.zeros([TOPK], dtype=tl.float32)
    iv = tl.zeros([TOPK], dtype=tl.int32)
    for j in tl.static_range(TOPK):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, o, E), 0)                  # lowest index among ties
        wv = tl.where(kk == j, best, wv)
        iv = tl.where(kk == j, idx, iv)
        p = tl.where(o == idx, -1.0, p)
    if NORM:
        wv = wv / tl.sum(wv, 0)
    tl.store(ids_ptr + t * TOPK + kk, iv)
    tl.store(w_ptr + t * TOPK + kk, wv)


# ----------------------------------------------------------------------------- GEMV pieces
@triton.jit
def _plane(wrow, nmask, x, byte0, k0, PER: tl.constexpr, W: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    """sum_j sum_s field_s(byte j) * x[k0 + PER*j + s] for each row: ``[BN]``."""
    KB: tl.constexpr = G // PER
    j = tl.arange(0, KB)
    b = tl.load(wrow + byte0 + j[None, :], mask=nmask[:, None], other=0).to(tl.int32)     # [BN, KB]
    acc = tl.zeros([BN, KB], dtype=tl.float32)
    for s in tl.static_range(PER):
        f = ((b >> (s * W)) & ((1 << W) - 1)).to(tl.float32)
        xv = tl.load(x + k0 + j * PER + s).to(tl.float32)                                  # [KB]
        acc += f * xv[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_int(w, s, z, rows, nmask, x, K: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    """Rows ``rows`` of a packed integer matrix ``[N, K]`` times ``x [K]`` -> ``[BN]`` float32."""
    RB: tl.constexpr = K * BITS // 8
    NG: tl.constexpr = K // G
    wrow = w + rows.to(tl.int64)[:, None] * RB                                             # [BN, 1]
    srow = s + rows.to(tl.int64) * NG
    zrow = z + rows.to(tl.int64) * NG
    acc = tl.zeros([BN], dtype=tl.float32)
    for g in tl.range(0, NG, loop_unroll_factor=2):  # unrolled fully, int3/int2 code took minutes to compile
        k0 = g * G
        if BITS == 3:  # low two bits (int2 plane, K/4 bytes), then the third bit (K/8 bytes)
            d = _plane(wrow, nmask, x, k0 // 4, k0, 4, 2, G, BN)
            d += 4.0 * _plane(wrow, nmask, x, K // 4 + k0 // 8, k0, 8, 1, G, BN)
        else:
            d = _plane(wrow, nmask, x, k0 * BITS // 8, k0, 8 // BITS, BITS, G, BN)
        xs = tl.sum(tl.load(x + k0 + tl.arange(0, G)).to(tl.float32), 0)
        sc = tl.load(srow + g, mask=nmask, other=0.0).to(tl.float32)
        ze = tl.load(zrow + g, mask=nmask, other=0.0).to(tl.float32)
        acc += sc * (d - ze * xs)
    return acc


@triton.jit
def _plane_acc(acc, wrow, nmask, x, byte0, k0, sc, ze, PER: tl.constexpr, W: tl.constexpr, G: tl.constexpr):
    """``acc [BN, G/PER] += sc * (field - ze) * x`` over one bit plane of one group (no reduction)."""
    KB: tl.constexpr = G // PER
    j = tl.arange(0, KB)
    b = tl.load(wrow + byte0 + j[None, :], mask=nmask[:, None], other=0).to(tl.int32)     # [BN, KB]
    for s in tl.static_range(PER):
        f = ((b >> (s * W)) & ((1 << W) - 1)).to(tl.float32)
        xv = tl.load(x + k0 + j * PER + s).to(tl.float32)                                  # [KB]
        acc += (f - ze[:, None]) * (sc[:, None] * xv[None, :])
    return acc


@triton.jit
def _gemv_int_flat(w, s, z, rows, nmask, x, K: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                   BN: tl.constexpr):
    """As :func:`_gemv_int`, dequantizing in the tile and reducing once at the end (no per-group sums)."""
    RB: tl.constexpr = K * BITS // 8
    NG: tl.constexpr = K // G
    PER: tl.constexpr = 4 if BITS == 3 else 8 // BITS
    wrow = w + rows.to(tl.int64)[:, None] * RB
    srow = s + rows.to(tl.int64) * NG
    zrow = z + rows.to(tl.int64) * NG
    acc = tl.zeros([BN, G // PER], dtype=tl.float32)
    acc_hi = tl.zeros([BN, G // 8], dtype=tl.float32)                                    # int3's third bit
    for g in tl.range(0, NG, loop_unroll_factor=2):  # unrolled fully, int3/int2 code took minutes to compile
        k0 = g * G
        sc = tl.load(srow + g, mask=nmask, other=0.0).to(tl.float32)
        ze = tl.load(zrow + g, mask=nmask, other=0.0).to(tl.float32)
        if BITS == 3:
            acc = _plane_acc(acc, wrow, nmask, x, k0 // 4, k0, sc, ze, 4, 2, G)
            acc_hi = _plane_acc(acc_hi, wrow, nmask, x, K // 4 + k0 // 8, k0, 4.0 * sc, 0.0 * ze, 8, 1, G)
        else:
            acc = _plane_acc(acc, wrow, nmask, x, k0 * BITS // 8, k0, sc, ze, PER, BITS, G)
    return tl.sum(acc, axis=1) + tl.sum(acc_hi, axis=1)


@triton.jit
def _gemv_float(w, rows, nmask, x, K: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Rows of a float matrix (bf16 or fp8 codes) ``[N, K]`` times ``x [K]`` -> ``[BN]`` float32."""
    wrow = w + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(wrow + kk[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
        acc += a * tl.load(x + kk).to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_int_any(w, s, z, rows, nmask, x, K: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr,
                  FLAT: tl.constexpr):
    if FLAT:
        acc = _gemv_int_flat(w, s.to(tl.pointer_type(tl.float16)), z.to(tl.pointer_type(tl.float16)),
                             rows, nmask, x, K, BITS, G, BN)
    else:
        acc = _gemv_int(w, s.to(tl.pointer_type(tl.float16)), z.to(tl.pointer_type(tl.float16)),
                        rows, nmask, x, K, BITS, G, BN)
    return acc


@triton.jit
def _gemv_cls(C: tl.constexpr, wp, sp, zp, rows, nmask, x, K: tl.constexpr, BN: tl.constexpr, G8: tl.constexpr,
              G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr, FLAT: tl.constexpr):
    """Rows ``rows`` of plain kernel class ``C`` (weight, scales, zeros at ``wp``, ``sp``, ``zp``) times ``x``."""
    if C == 0:
        acc = _gemv_float(wp.to(tl.pointer_type(tl.bfloat16)), rows, nmask, x, K, 128, BN)
    elif C == 1:
        acc = _gemv_float(wp.to(tl.pointer_type(tl.float8e4nv)), rows, nmask, x, K, 128, BN)
        acc *= tl.load(sp.to(tl.pointer_type(tl.float32)) + rows, mask=nmask, other=0.0)
    elif C == 2:
        acc = _gemv_int_any(wp, sp, zp, rows, nmask, x, K, 8, G8, BN, FLAT)
    elif C == 3:
        acc = _gemv_int_any(wp, sp, zp, rows, nmask, x, K, 4, G4, BN, FLAT)
    elif C == 4:
        acc = _gemv_int_any(wp, sp, zp, rows, nmask, x, K, 3, G3, BN, FLAT)
    else:
        acc = _gemv_int_any(wp, sp, zp, rows, nmask, x, K, 2, G2, BN, FLAT)
    return acc


@triton.jit
def slab_field(buf, d, base, i):
    """Byte pointer of descriptor field ``i`` of the slab at ``base`` (fields are 16-byte aligned)."""
    return buf + tl.multiple_of(base + tl.load(d + i), 16)


@triton.jit
def kept_of(rp, rows, nmask, NK: tl.constexpr, STEPS: tl.constexpr, BN: tl.constexpr):
    """(position in the kept rows ``[BN]``, kept ``[BN]``) of the contiguous output rows ``rows`` of a channel
    mix whose ``NK`` kept row ids (ascending) are at ``rp``: a lower-bound search for the tile's first row
    (``STEPS`` = NK's bit length halvings), then the tile's candidates compared at once."""
    n0 = tl.min(rows, 0)
    lo = n0 * 0
    hi = lo + NK
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        v = tl.load(rp + mid, mask=mid < NK, other=0)
        go = (lo < hi) & (v < n0)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(go, hi, mid)
    j = lo + tl.arange(0, BN)
    cand = tl.load(rp + j, mask=j < NK, other=-1)                                         # [BN]
    eq = cand[None, :] == rows[:, None]                                                   # [BN, BN]
    kept = (tl.sum(eq.to(tl.int32), axis=1) > 0) & nmask
    return tl.sum(tl.where(eq, j[None, :], 0), axis=1), kept


@triton.jit
def _gemv_mix(buf, d, base, proj: tl.constexpr, rows, nmask, x, K: tl.constexpr, BN: tl.constexpr,
              G8: tl.constexpr, G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr, FLAT: tl.constexpr,
              MIX: tl.constexpr):
    """A channel mix (``MIX``: :func:`mix_const`): every row from the low copy, kept rows from the high rows."""
    LO: tl.constexpr = MIX & 7
    HI: tl.constexpr = (MIX >> 3) & 7
    NK: tl.constexpr = (MIX >> (6 + 20 * proj)) & 0xFFFFF
    STEPS: tl.constexpr = (MIX >> (46 + 5 * proj)) & 31
    acc = _gemv_cls(LO, slab_field(buf, d, base, 2 + 3 * proj), slab_field(buf, d, base, 3 + 3 * proj),
                    slab_field(buf, d, base, 4 + 3 * proj), rows, nmask, x, K, BN, G8, G4, G3, G2, FLAT)
    if NK > 0:
        rp = slab_field(buf, d, base, 11 + 4 * proj).to(tl.pointer_type(tl.int32))
        pos, kept = kept_of(rp, rows, nmask, NK, STEPS, BN)
        if tl.max(kept.to(tl.int32), 0) > 0:
            hi = _gemv_cls(HI, slab_field(buf, d, base, 8 + 4 * proj), slab_field(buf, d, base, 9 + 4 * proj),
                           slab_field(buf, d, base, 10 + 4 * proj), pos, kept, x, K, BN, G8, G4, G3, G2, FLAT)
            acc = tl.where(kept, hi, acc)
    return acc


@triton.jit
def _gemv_any(buf, d, base, proj: tl.constexpr, cls, rows, nmask, x, K: tl.constexpr, BN: tl.constexpr,
              HAS: tl.constexpr, G8: tl.constexpr, G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr,
              FLAT: tl.constexpr, MIX: tl.constexpr):
    """Dispatch on the kernel class read from the table (``HAS`` bit c: class c has slabs)."""
    wp = slab_field(buf, d, base, 2 + 3 * proj)
    sp = slab_field(buf, d, base, 3 + 3 * proj)
    zp = slab_field(buf, d, base, 4 + 3 * proj)
    acc = tl.zeros([BN], dtype=tl.float32)
    if HAS & 8:
        if cls == 3:
            acc = _gemv_cls(3, wp, sp, zp, rows, nmask, x, K, BN, G8, G4, G3, G2, FLAT)
    if HAS & 1:
        if cls == 0:
            acc = _gemv_cls(0, wp, sp, zp, rows, nmask, x, K, BN, G8, G4, G3, G2, FLAT)
    if HAS & 2:
        if cls == 1:
            acc = _gemv_cls(1, wp, sp, zp, rows, nmask, x, K, BN, G8, G4, G3, G2, FLAT)
    if HAS & 4:
        if cls == 2:
            acc = _gemv_cls(2, wp, sp, zp, rows, nmask, x, K, BN, G8, G4, G3, G2, FLAT)
    if HAS & 16:
        if cls == 4:
            acc = _gemv_cls(4, wp, sp, zp, rows, nmask, x, K, BN, G8, G4, G3, G2, FLAT)
    if HAS & 32:
        if cls == 5:
            acc = _gemv_cls(5, wp, sp, zp, rows, nmask, x, K, BN, G8, G4, G3, G2, FLAT)
    if HAS & 64:
        if cls == 6:
            acc = _gemv_mix(buf, d, base, proj, rows, nmask, x, K, BN, G8, G4, G3, G2, FLAT, MIX)
    return acc


@triton.jit
def slab_address(table, desc, e):
    """(descriptor row pointer, slab base byte, class) of expert ``e``."""
    code = tl.load(table + e)
    cls = code & 7
    d = desc + cls * 16                      # len(runtime.residency.DESC_FIELDS)
    base = tl.load(d) + (code >> 3).to(tl.int64) * tl.load(d + 1)
    return d, base, cls


# ----------------------------------------------------------------------------- the two expert kernels
@triton.jit
def _up_kernel(x_ptr, ids_ptr, table, desc, buf, h_ptr, out_ptr,
               H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BN: tl.constexpr, ZERO: tl.constexpr, ZC: tl.constexpr,
               HAS: tl.constexpr, G8: tl.constexpr, G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr,
               FLAT: tl.constexpr, MIX: tl.constexpr):
    pair = tl.program_id(0)
    nb = tl.program_id(1)
    if ZERO:  # zero out [T, H] for the down kernel: the token's first pair, ZC columns per row block
        if pair % TOPK == 0:
            zo = nb * ZC + tl.arange(0, ZC)
            tl.store(out_ptr + (pair // TOPK).to(tl.int64) * H + zo, tl.zeros([ZC], dtype=tl.float32), mask=zo < H)
    e = tl.load(ids_ptr + pair)
    d, base, cls = slab_address(table, desc, e)
    x = x_ptr + (pair // TOPK).to(tl.int64) * H
    rows = nb * BN + tl.arange(0, BN)
    nmask = rows < I
    g = _gemv_any(buf, d, base, 0, cls, rows, nmask, x, H, BN, HAS, G8, G4, G3, G2, FLAT, MIX)
    u = _gemv_any(buf, d, base, 0, cls, rows + I, nmask, x, H, BN, HAS, G8, G4, G3, G2, FLAT, MIX)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + pair.to(tl.int64) * I + rows, h, mask=nmask)


@triton.jit
def _down_kernel(h_ptr, ids_ptr, w_ptr, table, desc, buf, out_ptr,
                 H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BN: tl.constexpr,
                 HAS: tl.constexpr, G8: tl.constexpr, G4: tl.constexpr, G3: tl.constexpr, G2: tl.constexpr,
                 FLAT: tl.constexpr, MIX: tl.constexpr):
    pair = tl.program_id(0)
    e = tl.load(ids_ptr + pair)
    rw = tl.load(w_ptr + pair).to(tl.float32)
    d, base, cls = slab_address(table, desc, e)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = rows < H
    y = _gemv_any(buf, d, base, 1, cls, rows, nmask, h_ptr + pair.to(tl.int64) * I, I, BN, HAS, G8, G4, G3, G2, FLAT,
                  MIX)
    dst = out_ptr + (pair // TOPK).to(tl.int64) * H + rows
    tl.atomic_add(dst, y * rw, mask=nmask, sem="relaxed")


# ----------------------------------------------------------------------------- launchers
def has_bits(pd: PoolDescriptor) -> int:
    """The kernels' ``HAS`` constant: bit c set when the pool has slabs of kernel class c."""
    return sum(1 << kernel_class(p) for p in pd.classes)


def mix_const(pd: PoolDescriptor) -> int:
    """The kernels' ``MIX`` constant for the pool's channel mix (0: none): its low and high classes (3 bits
    each), kept rows of gate_up and down (20 bits each), their search steps (bit lengths, 5 bits each)."""
    if pd.mix is None:
        return 0
    mix = get_channel_mix(pd.mix)
    assert mix is not None
    nku, nkd = pd.kept
    if max(nku, nkd) >= 1 << 20:
        raise ValueError(f"channel mix {pd.mix}: {max(nku, nkd)} kept rows, more than the kernels' 2**20")
    return (KERNEL_CLASS[mix.low] | KERNEL_CLASS[mix.high] << 3 | nku << 6 | nkd << 26
            | nku.bit_length() << 46 | nkd.bit_length() << 51)


def launch_consts(pd: PoolDescriptor) -> dict[str, int]:
    """The constants every expert kernel is specialised on: classes present, group sizes, the channel mix."""
    g = group_sizes()
    return dict(HAS=has_bits(pd), G8=g["int8"], G4=g["int4"], G3=g["int3"], G2=g["int2"], MIX=mix_const(pd))


def route(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, normalize: bool) -> None:
    """Top-k routing of ``logits [T, E]`` into ``ids [T, k]`` int32 and ``weights [T, k]`` float32."""
    t, e = logits.shape
    _route_kernel[(t,)](logits, ids, weights, E=e, EP=triton.next_power_of_2(e), TOPK=ids.shape[1], NORM=normalize, num_warps=1)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor, pd: PoolDescriptor,
            out: torch.Tensor, h_buf: torch.Tensor, zero_out: bool, cfg: MoeKernelConfig = DEFAULT_CONFIG) -> None:
    """``out [T, H]`` float32 (+)= the routed experts of ``x [T, H]`` served from the slabs ``codes [E]`` name.

    ``ids``/``weights [T, k]``; ``h_buf [>= S, I]`` float32 scratch; ``zero_out`` zeroes ``out`` first
    (else the experts' sum is added to it, e.g. into the residual stream).
    """
    t, k = ids.shape
    s, hid, inter = t * k, pd.hidden, pd.intermediate
    consts = dict(launch_consts(pd), FLAT=cfg.flat)
    n_up = triton.cdiv(inter, cfg.bn_up)
    _up_kernel[(s, n_up)](
        x, ids, codes, pd.desc, pd.buffer, h_buf, out,
        H=hid, I=inter, TOPK=k, BN=cfg.bn_up, ZERO=zero_out, ZC=triton.next_power_of_2(triton.cdiv(hid, n_up)), num_warps=cfg.warps, **consts)
    _down_kernel[(s, triton.cdiv(hid, cfg.bn_down))](
        h_buf, ids, weights, codes, pd.desc, pd.buffer, out,
        H=hid, I=inter, TOPK=k, BN=cfg.bn_down, num_warps=cfg.warps, **consts)
