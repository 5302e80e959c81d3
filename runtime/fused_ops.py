"""One entry point per fused operation, on the Triton kernels (CUDA, or Triton's interpreter) or torch.

The fast model (:mod:`runtime.fast_model`) calls these and nothing else for its custom
operations, so one flag decides whether a step runs the Triton kernels (capturable in a CUDA
graph) or the pure-torch references (any device; the CPU path CI tests; host syncs allowed).
Both write into caller-owned buffers, so a captured graph sees fixed addresses.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch
from moebits.runtime import residency
from moebits.runtime.pool import DevicePool


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """``runtime.<name>`` (a Triton kernel module), or None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"moebits.runtime.{name}")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run here: on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
    if triton_module("fused_moe") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class MoeOps:
    """Routing and routed experts, by Triton kernels (``use_triton``) or torch references."""

    def __init__(self, pool: DevicePool, use_triton: bool, cfg: object | None = None) -> None:
        self.pool = pool
        self.pd = residency.PoolDescriptor.of(pool)
        self.use_triton = use_triton
        self.k = triton_module("fused_moe") if use_triton else None
        if use_triton and self.k is None:
            raise ValueError("use_triton needs the triton package")
        self.cfg = cfg if cfg is not None or self.k is None else self.k.DEFAULT_CONFIG

    def route(self, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, normalize: bool) -> None:
        """``logits [T, E]`` -> ``ids [T, k]`` int32, ``weights [T, k]`` float32 (in place)."""
        if self.k is not None:
            self.k.route(logits, ids, weights, normalize)
            return
        i, w = residency.route_reference(logits, ids.shape[1], normalize)
        ids.copy_(i)
        weights.copy_(w)

    def experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor,
                out: torch.Tensor, h_buf: torch.Tensor, zero_out: bool) -> None:
        """``out [T, H]`` float32 (+)= routed experts of ``x`` from the slabs ``codes [E]`` names."""
        if self.k is not None:
            grouped = triton_module("fused_moe_grouped")
            if grouped is not None and grouped.use_grouped(ids.numel(), self.cfg):
                grouped.experts_grouped(x, ids, weights, codes, self.pd, out, zero_out)
            else:
                self.k.experts(x, ids, weights, codes, self.pd, out, h_buf, zero_out, self.cfg)
            return
        y = residency.serve_reference(x, ids, weights, codes, self.pool)
        if zero_out:
            out.copy_(y)
        else:
            out.add_(y)


class AttnOps:
    """RMSNorm, q/k norm + rotary + cache write, and cached attention: Triton or torch references."""

    def __init__(self, use_triton: bool) -> None:
        self.k = triton_module("fused_attention") if use_triton else None
        if use_triton and self.k is None:
            raise ValueError("use_triton needs the triton package")

    def rmsnorm(self, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, eps: float) -> None:
        """``y [T, H]`` bf16 = RMSNorm(``x`` float32) * ``w`` (rounded to bf16 before the weight, as HF)."""
        if self.k is not None:
            self.k.rmsnorm(x, w, y, eps)
            return
        xf = x.float()
        y.copy_(w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(torch.bfloat16).float())

    def qk_rope_cache(self, qkv: torch.Tensor, qk_norm: torch.Tensor, row_seq: torch.Tensor, row_pos: torch.Tensor,
                      q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float, theta: float) -> None:
        """See :func:`runtime.fused_attention.qk_rope_cache`."""
        if self.k is not None:
            self.k.qk_rope_cache(qkv, qk_norm, row_seq, row_pos, q, k_cache, v_cache, eps, theta)
            return
        t, (_, n_q, d), n_kv = qkv.shape[0], q.shape, k_cache.shape[2]
        heads = qkv.float().view(t, n_q + 2 * n_kv, d)
        qk = heads[:, : n_q + n_kv]
        qk = (qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + eps)).to(torch.bfloat16).float()
        qk = qk * torch.cat([qk_norm[0].expand(n_q, d), qk_norm[1].expand(n_kv, d)]).float()
        freq = theta ** (-(2.0 * torch.arange(d // 2, device=qkv.device, dtype=torch.float32)) / d)
        ang = row_pos.float()[:, None, None] * freq                                 # [T, 1, D/2]
        lo, hi = qk[..., : d // 2], qk[..., d // 2 :]
        roped = torch.cat([lo * ang.cos() - hi * ang.sin(), hi * ang.cos() + lo * ang.sin()], -1)
        q.copy_(roped[:, :n_q])
        seq, pos = row_seq.long(), row_pos.long()
        k_cache[seq, pos] = roped[:, n_q:].to(k_cache.dtype)
        v_cache[seq, pos] = heads[:, n_q + n_kv :].to(v_cache.dtype)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, row_seq: torch.Tensor,
                  row_pos: torch.Tensor, o: torch.Tensor) -> None:
        """See :func:`runtime.fused_attention.attention` (the torch path reads positions on the host)."""
        if self.k is not None:
            self.k.attention(q, k_cache, v_cache, row_seq, row_pos, o)
            return
        t, n_q, d = q.shape
        group = n_q // k_cache.shape[2]
        for r, (b, p) in enumerate(zip(row_seq.tolist(), row_pos.tolist(), strict=True)):
            k = k_cache[b, : p + 1].float().repeat_interleave(group, dim=1)         # [p+1, Q, D]
            v = v_cache[b, : p + 1].float().repeat_interleave(group, dim=1)
            s = torch.einsum("qd,lqd->ql", q[r].float(), k) * d ** -0.5
            o[r] = torch.einsum("ql,lqd->qd", torch.softmax(s, -1), v).reshape(-1).to(o.dtype)
