"""The mixed-precision MoE layer: routed experts whose precision differs expert by expert.

Dimension legend: T tokens, k experts per token, E experts, H hidden, I expert intermediate,
P slots in one precision's pool.

Each precision has a pool (:class:`ExpertPool`): packed ``gate_up [P, 2I, H]`` and
``down [P, H, I]`` stacks, as a slab pool would hold them on the device. An expert's
:class:`ExpertHandle` names its precision and slot. The layer computes, as Qwen3-MoE does,

    out[t] = sum_j  w[t, j] * down_e( silu(gate_e(x[t])) * up_e(x[t]) ),   e = ids[t, j]

with one grouped launch per precision class (see runtime/grouped.py). Reassigning precisions
(:meth:`MixedPrecisionMoE.set_handles`) rewrites one small device table in place, so a CUDA
graph captured around :meth:`MixedPrecisionMoE.forward` stays valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from moebits.core.precision import by_bits_desc, get_channel_mix, get_precision
from moebits.drive.context import precision_order
from moebits.runtime.channelmix import AnyStack, stack_tensors
from moebits.runtime.grouped import ClassLayout, build_plan, plan_rows, run_class, triton_kernels
from moebits.runtime.quant import DEFAULT_HQQ, HQQConfig, QuantMethod, quantize_stack

PRECISION_ORDER = tuple(p.name for p in by_bits_desc())  # bf16 first: its rows start at row 0


@dataclass(frozen=True)
class ExpertHandle:
    """Where one expert's weights live: the pool of ``precision``, slot ``slot``."""

    precision: str
    slot: int


@dataclass(frozen=True)
class ExpertPool:
    """Packed weights of one precision: ``gate_up [P, 2I, H]`` and ``down [P, H, I]``."""

    gate_up: AnyStack
    down: AnyStack

    def __post_init__(self) -> None:
        if self.gate_up.precision != self.down.precision:
            raise ValueError(f"pool mixes {self.gate_up.precision} and {self.down.precision}")
        (p, n2i, h), (p2, h2, i) = self.gate_up.shape, self.down.shape
        if p != p2 or n2i != 2 * i or h != h2:
            raise ValueError(f"gate_up {self.gate_up.shape} and down {self.down.shape} do not match")

    @property
    def precision(self) -> str:
        return self.gate_up.precision

    @property
    def slots(self) -> int:
        return self.gate_up.shape[0]


class MixedPrecisionMoE:
    """Routed experts of one MoE layer, each served from its precision's pool."""

    def __init__(self, pools: Mapping[str, ExpertPool], handles: Sequence[ExpertHandle],
                 use_triton: bool | None = None) -> None:
        unknown = sorted(p for p in pools if p not in PRECISION_ORDER and get_channel_mix(p) is None)
        if unknown:
            raise ValueError(f"unknown pool precision(s) {unknown}; known: {PRECISION_ORDER} and registered channel mixes")
        order = precision_order(list(pools))  # highest first, as PRECISION_ORDER (channel mixes by effective bits)
        for name in order:
            if pools[name].precision != name:
                raise ValueError(f"pool under {name!r} holds {pools[name].precision} weights")
        self.pools = {p: pools[p] for p in order}
        self.layout = ClassLayout(tuple(order), tuple(pools[p].slots for p in order))
        first = self.pools[order[0]]
        self.hidden, self.intermediate = first.down.shape[1], first.down.shape[2]
        self.device = _device_of(first.down)
        self.use_triton = (self.device.type == "cuda" and triton_kernels() is not None
                           if use_triton is None else use_triton)
        self.block_m = 16 if (self.device.type == "cuda" or self.use_triton) else 1
        self.class_base = torch.tensor(self.layout.bases, dtype=torch.int32, device=self.device)  # [C + 1]
        self.group_of_expert = torch.empty(len(handles), dtype=torch.int32, device=self.device)  # [E]
        self.set_handles(handles)

    @property
    def num_experts(self) -> int:
        return self.group_of_expert.numel()

    def set_handles(self, handles: Sequence[ExpertHandle]) -> None:
        """Point experts at new slots (in place: captured CUDA graphs see the change)."""
        if len(handles) != self.group_of_expert.numel():
            raise ValueError(f"expected {self.group_of_expert.numel()} handles, got {len(handles)}")
        bases = dict(zip(self.layout.precisions, self.layout.bases, strict=False))
        groups = []
        for e, h in enumerate(handles):
            if h.precision not in self.pools:
                raise ValueError(f"expert {e}: no {h.precision!r} pool (pools: {list(self.pools)})")
            if not 0 <= h.slot < self.pools[h.precision].slots:
                raise ValueError(f"expert {e}: slot {h.slot} outside the {h.precision} pool")
            groups.append(bases[h.precision] + h.slot)
        if len(set(groups)) != len(groups):
            raise ValueError("two experts share one slot")
        self.handles = tuple(handles)
        self.group_of_expert.copy_(torch.tensor(groups, dtype=torch.int32))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                group_of_expert: torch.Tensor | None = None) -> torch.Tensor:
        """``x [T, H]``, ``topk_ids``/``topk_weights [T, k]`` -> ``[T, H]`` in x's dtype.

        ``group_of_expert [E]`` int32 (on the device), if given, replaces the handles' table for
        this call: the slab pool keeps one such table per layer over pools shared by all layers."""
        t, k = topk_ids.shape
        groups = self.group_of_expert if group_of_expert is None else group_of_expert
        if x.shape != (t, self.hidden) or topk_weights.shape != (t, k):
            raise ValueError(f"shapes x {tuple(x.shape)}, ids {tuple(topk_ids.shape)}, "
                             f"weights {tuple(topk_weights.shape)} do not fit hidden size {self.hidden}")
        xc = (x.to(torch.bfloat16) if x.is_cuda else x).contiguous()               # [T, H]
        plan = build_plan(topk_ids, groups, self.class_base, self.layout, self.block_m,
                          self.use_triton)
        s = t * k
        w_ext = torch.cat([topk_weights.reshape(-1).float(), topk_weights.new_zeros(1, dtype=torch.float32)])
        y_pair = torch.zeros(s + 1, self.hidden, dtype=torch.float32, device=x.device)   # [S + 1, H]
        h_buf = None
        if self.use_triton:
            h_buf = torch.empty(plan_rows(s, self.layout.groups, self.block_m), self.intermediate,
                                dtype=xc.dtype, device=x.device)                   # [R, I]
        for c, name in enumerate(self.layout.precisions):
            pool = self.pools[name]
            run_class(xc, plan, self.layout, c, pool.gate_up, pool.down, w_ext, y_pair, h_buf, self.use_triton)
        return y_pair[:s].view(t, k, self.hidden).sum(1).to(x.dtype)

    __call__ = forward

    def dequantized_experts(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's weights as served, dequantized: ``[E, 2I, H]`` and ``[E, H, I]``."""
        gu, dn = [], []
        for h in self.handles:
            pool, slot = self.pools[h.precision], torch.tensor([h.slot], device=self.device)
            gu.append(pool.gate_up.dequantize(slot, dtype)[0])
            dn.append(pool.down.dequantize(slot, dtype)[0])
        return torch.stack(gu), torch.stack(dn)


def _device_of(stack: AnyStack) -> torch.device:
    return next(iter(stack_tensors(stack).values())).device


def build_mixed_experts(
    gate_up: torch.Tensor, down: torch.Tensor, precisions: Sequence[str],
    method: QuantMethod = QuantMethod.RTN, hqq: HQQConfig = DEFAULT_HQQ,
) -> tuple[dict[str, ExpertPool], list[ExpertHandle]]:
    """Quantize expert ``e`` of ``gate_up [E, 2I, H]`` / ``down [E, H, I]`` into ``precisions[e]``.

    Returns one pool per precision used (slots in expert order) and every expert's handle.
    """
    if len(precisions) != gate_up.shape[0] or down.shape[0] != gate_up.shape[0]:
        raise ValueError(f"{len(precisions)} precisions for {gate_up.shape[0]} / {down.shape[0]} experts")
    for name in set(precisions):
        get_precision(name)
    pools, handles = {}, []
    slot_of: dict[int, int] = {}
    for name in (p for p in PRECISION_ORDER if p in set(precisions)):
        members = [e for e, p in enumerate(precisions) if p == name]
        slot_of.update({e: i for i, e in enumerate(members)})
        idx = torch.tensor(members, device=gate_up.device)
        pools[name] = ExpertPool(quantize_stack(gate_up[idx], name, method, hqq=hqq),
                                 quantize_stack(down[idx], name, method, hqq=hqq))
    handles = [ExpertHandle(p, slot_of[e]) for e, p in enumerate(precisions)]
    return pools, handles


def reference_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Plain per-expert loop in the weights' dtype (use float64): the test oracle, ``[T, H]``."""
    xd = x.to(gate_up.dtype)
    out = torch.zeros_like(xd)
    inter = down.shape[-1]
    for e in torch.unique(topk_ids).tolist():
        tok, j = torch.nonzero(topk_ids == e, as_tuple=True)
        gu = xd[tok] @ gate_up[e].T                                      # [n, 2I]
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]      # [n, I]
        out.index_add_(0, tok, (h @ down[e].T) * topk_weights[tok, j, None].to(xd.dtype))
    return out
