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
            self.k.experts(x, ids, weights, codes, self.pd, out, h_buf, zero_out, self.cfg)
            return
        y = residency.serve_reference(x, ids, weights, codes, self.pool)
        if zero_out:
            out.copy_(y)
        else:
            out.add_(y)
