"""Triton kernels of the attention block of a decode/prefill step (imports triton: load lazily).

Dimension legend: T rows (tokens of a chunk, or one per sequence of a batch), B sequences,
L cache positions, Q query heads, V kv heads, D head dim, H hidden.

Each row carries its sequence ``row_seq [T]`` and position ``row_pos [T]`` (device tensors, so
a captured graph serves any position). The KV cache is static: ``[B, L, V, D]`` bf16 per layer.

* ``_rmsnorm_kernel`` (grid ``[T]``): ``y = w * x / rms(x)`` from the float32 residual stream
  to bf16.
* ``_qk_rope_cache_kernel`` (grid ``[T, Q + V]``): Qwen3's per-head RMSNorm of q and k, rotary
  embedding (rotate-half, ``theta``), q to a buffer, k and v into the cache at the row's
  position.
* ``_attention_kernel`` (grid ``[T, Q]``): one query head of one row against its sequence's
  cache up to and including its position (causal within a prefill chunk, since the chunk's
  keys are written first), online softmax in float32, -> ``o [T, Q * D]`` bf16. The loop stops
  at the row's position (a bound read on the device, so a captured graph serves any position):
  its time grows with the position, not with the cache's length (it looped over the whole
  cache, masked, until session 4: the calibration designs, with a longer cache than a replay,
  then priced every step of a replay too high).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, eps, H: tl.constexpr, HP: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, HP)
    m = o < H
    x = tl.load(x_ptr + r * H + o, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * H + o, (x * inv).to(tl.bfloat16).to(tl.float32) * w, mask=m)


@triton.jit
def _qk_rope_cache_kernel(qkv_ptr, qkn_ptr, seq_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, eps, log_theta,
                          L, Q: tl.constexpr, V: tl.constexpr, D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half = tl.arange(0, D // 2)
    row = qkv_ptr + r * (Q + 2 * V) * D
    pos = tl.load(pos_ptr + r)
    seq = tl.load(seq_ptr + r).to(tl.int64)
    freq = tl.exp(-(2.0 * half.to(tl.float32) / D) * log_theta)                  # theta^(-2i/D)
    ang = pos.to(tl.float32) * freq
    cos, sin = tl.cos(ang), tl.sin(ang)
    is_q = h < Q
    nw = qkn_ptr + tl.where(is_q, 0, D)                                            # q_norm, then k_norm
    lo = tl.load(row + h * D + half).to(tl.float32)
    hi = tl.load(row + h * D + D // 2 + half).to(tl.float32)
    inv = 1.0 / tl.sqrt((tl.sum(lo * lo, 0) + tl.sum(hi * hi, 0)) / D + eps)
    lo = (lo * inv).to(tl.bfloat16).to(tl.float32) * tl.load(nw + half).to(tl.float32)
    hi = (hi * inv).to(tl.bfloat16).to(tl.float32) * tl.load(nw + D // 2 + half).to(tl.float32)
    out_lo, out_hi = lo * cos - hi * sin, hi * cos + lo * sin
    if is_q:
        dst = q_ptr + (r * Q + h) * D
    else:
        kv = h - Q
        cell = ((seq * L + pos) * V + kv) * D
        dst = kc_ptr + cell
        vrow = row + (Q + V + kv) * D
        tl.store(vc_ptr + cell + half, tl.load(vrow + half))
        tl.store(vc_ptr + cell + D // 2 + half, tl.load(vrow + D // 2 + half))
    tl.store(dst + half, out_lo.to(tl.bfloat16))
    tl.store(dst + D // 2 + half, out_hi.to(tl.bfloat16))


@triton.jit
def _attention_kernel(q_ptr, kc_ptr, vc_ptr, seq_ptr, pos_ptr, o_ptr, scale, L: tl.constexpr,
                      Q: tl.constexpr, V: tl.constexpr, D: tl.constexpr, BL: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kv = h // (Q // V)
    pos = tl.load(pos_ptr + r)
    seq = tl.load(seq_ptr + r).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (r * Q + h) * D + d).to(tl.float32) * scale              # [D]
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    base = (seq * L * V + kv) * D
    for l0 in range(0, pos + 1, BL):  # up to the row's position only (the last block masked): cost grows with pos
        ll = l0 + tl.arange(0, BL)
        valid = ll <= pos
        off = base + ll.to(tl.int64)[:, None] * (V * D) + d[None, :]              # [BL, D]
        k = tl.load(kc_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], 1), -float("inf"))            # [BL]
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(vc_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    tl.store(o_ptr + (r * Q + h) * D + d, (acc / l_i).to(tl.bfloat16))


def rmsnorm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    """``y [T, H]`` bf16 = RMSNorm(``x [T, H]`` float32) * ``w``."""
    t, h = x.shape
    _rmsnorm_kernel[(t,)](x, w, y, eps, H=h, HP=triton.next_power_of_2(h), num_warps=4)


def qk_rope_cache(qkv: torch.Tensor, qk_norm: torch.Tensor, row_seq: torch.Tensor,
                  row_pos: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  eps: float, theta: float) -> None:
    """q/k norm (``qk_norm [2, D]``: q's, k's) + rotary of ``qkv [T, (Q + 2V) * D]`` -> ``q [T, Q, D]``,
    k and v into the caches ``[B, L, V, D]`` at each row's (sequence, position)."""
    t = qkv.shape[0]
    _, n_q, d = q.shape
    _, length, n_kv, _ = k_cache.shape
    _qk_rope_cache_kernel[(t, n_q + n_kv)](qkv, qk_norm, row_seq, row_pos, q, k_cache, v_cache, eps,
                                           float(torch.tensor(theta).log()), length, Q=n_q, V=n_kv, D=d,
                                           num_warps=1)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, row_seq: torch.Tensor,
              row_pos: torch.Tensor, o: torch.Tensor, block_l: int = 64) -> None:
    """``o [T, Q * D]`` = softmax(q k^T / sqrt(D)) v over each row's cache prefix."""
    t, n_q, d = q.shape
    _, length, n_kv, _ = k_cache.shape
    _attention_kernel[(t, n_q)](q, k_cache, v_cache, row_seq, row_pos, o, d ** -0.5, L=length,
                                Q=n_q, V=n_kv, D=d, BL=block_l, num_warps=4)
