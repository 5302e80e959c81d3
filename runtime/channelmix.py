"""DynaMo's channel-mix copies on real tensors: an expert whose output channels are at two precisions.

Dimension legend: E experts (slots), N output channels of a projection, K its input size,
n channels kept at the high precision.

A channel-mix copy (:class:`core.precision.ChannelMix` ``low + high @ fraction``) holds the
expert's whole ``low`` copy plus its ``n`` most significant output channels (rows of
``gate_up [2I, H]`` and ``down [H, I]``) at ``high``, and the ids of those rows. The most
significant channels are the rows with the largest ``low`` quantization error (squared error
summed over the row): where outlier channels dominate the error, these carry most of it,
which is what DynaMo's channel-level switching raises. ``n`` per projection is the most rows
whose ``high`` bytes plus a 4-byte row id fit in ``fraction`` of that projection's ``high``
bytes, rounded down to a multiple of :data:`ROW_MULTIPLE` (so every field of a packed copy stays
16-byte aligned for the fused kernels), so a packed copy never exceeds the bytes the policy
planned for it (:meth:`ChannelMix.expert_bytes`).

Serving: the eager runtime rebuilds the mixed weights (:meth:`MixStack.dequantize`: ``low``
everywhere, ``high`` on the kept rows) and runs the class through the grouped
dequantize-then-GEMM path (:func:`runtime.grouped.dequant_class`) on any device. The graph
path's fused kernels serve a pool's one channel mix as a kernel class of its own
(:data:`runtime.residency.MIX_CLASS`): every output row from the ``low`` copy, and the rows of a
tile that are kept (found by a binary search of the sorted row ids) again from the ``high``
rows, which replace them. Both are tested against :meth:`MixStack.dequantize`. The proxy's error
model of a mix stays the policy's (:meth:`ChannelMix.error`); the runtime measures real quality (KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moebits.core.precision import ChannelMix
from moebits.runtime.quant import DEFAULT_HQQ, HQQConfig, QuantMethod, WeightStack, quantize_stack

ROW_ID = torch.int32
ROW_MULTIPLE = 8     # kept rows per projection: a multiple of this (every packed field 16-byte aligned)


@dataclass(frozen=True)
class MixStack:
    """Channel-mix weights of ``E`` experts: ``low [E, N, K]``, ``high [E, n, K]`` (the kept
    rows), ``rows [E, n]`` int32 (their ids, ascending), ``name``: the mix's precision name."""

    low: WeightStack
    high: WeightStack
    rows: torch.Tensor
    name: str

    @property
    def precision(self) -> str:
        return self.name

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.low.shape

    def dequantize(self, slots: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Mixed weights ``[E', N, K]``: ``low`` dequantized, kept rows replaced by ``high``."""
        w = self.low.dequantize(slots, torch.float32)                                 # [E', N, K]
        h = self.high.dequantize(slots, torch.float32)                                # [E', n, K]
        rows = (self.rows if slots is None else self.rows[slots]).long()             # [E', n]
        w.scatter_(1, rows.unsqueeze(-1).expand(-1, -1, w.shape[-1]), h)
        return w.to(dtype)

    def nbytes(self) -> int:
        return self.low.nbytes() + self.high.nbytes() + self.rows.numel() * self.rows.element_size()


AnyStack = WeightStack | MixStack


def kept_rows(mix: ChannelMix, n: int, high_row_bytes: int) -> int:
    """Rows of an ``n``-row projection kept at ``high``: the most whose bytes plus row ids fit in
    ``fraction`` of the projection's ``high`` bytes, in multiples of :data:`ROW_MULTIPLE`."""
    fit = int(mix.fraction * n * high_row_bytes) // (high_row_bytes + ROW_ID.itemsize)
    return fit - fit % ROW_MULTIPLE


def quantize_mix(w: torch.Tensor, mix: ChannelMix, high_row_bytes: int, method: QuantMethod = QuantMethod.RTN,
                 hqq: HQQConfig = DEFAULT_HQQ) -> MixStack:
    """The channel-mix copy of ``w [E, N, K]`` (see the module docstring)."""
    low = quantize_stack(w, mix.low, method, hqq=hqq)
    err = (low.dequantize(None, torch.float32) - w.float()).square().sum(-1)       # [E, N]
    n = kept_rows(mix, w.shape[1], high_row_bytes)
    rows = torch.topk(err, n, dim=1).indices.sort(dim=1).values                    # [E, n]
    picked = torch.gather(w, 1, rows.unsqueeze(-1).expand(-1, -1, w.shape[-1]))    # [E, n, K]
    high = quantize_stack(picked.contiguous(), mix.high, method, hqq=hqq)
    return MixStack(low, high, rows.to(ROW_ID).contiguous(), mix.name)


def stack_tensors(stack: AnyStack, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a stack by field name (``low.qweight``, ``rows``, ...), nested stacks flattened."""
    out: dict[str, torch.Tensor] = {}
    for name, value in vars(stack).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, MixStack | WeightStack):
            out.update(stack_tensors(value, f"{prefix}{name}."))
    return out
