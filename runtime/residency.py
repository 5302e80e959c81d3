"""The device residency table and the pool descriptor the fused MoE kernels read.

Dimension legend: L MoE layers, E experts per layer, H hidden, I expert intermediate,
C kernel classes (one per precision), F descriptor fields.

A graph-captured step cannot ask the host which slab holds an expert. Instead every kernel
reads two small device tensors:

* :class:`ResidencyTable` ``codes [L, E]`` int32: expert ``(layer, e)`` is served from slot
  ``code >> 3`` of kernel class ``code & 7``. Writing an entry in place retargets every
  captured graph at once; no re-capture.
* :class:`PoolDescriptor` ``desc [C, F]`` int64: per kernel class, where its slabs live in the
  one pool buffer (:class:`runtime.pool.DevicePool`) - region base, slab stride - and the
  byte offset inside a slab of each field (weight, scales, zeros of gate_up and down).

Kernel classes are numbered once, here (:data:`KERNEL_CLASS`); a precision without a class
has no kernel. The pure-torch server :func:`serve_reference` dequantizes exactly what the
table names, in float32: the CPU path, and the oracle every kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moebits.core.keys import ExpertKey
from moebits.core.precision import get_precision
from moebits.runtime.pool import DevicePool
from moebits.runtime.quant import quantize_stack

KERNEL_CLASS = {"bf16": 0, "fp8": 1, "int8": 2, "int4": 3, "int3": 4, "int2": 5}
CLASS_NAME = {v: k for k, v in KERNEL_CLASS.items()}
CLASS_BITS = 3                      # code = slot << CLASS_BITS | class
DESC_FIELDS = ("base", "stride", "gate_up.w", "gate_up.s", "gate_up.z", "down.w", "down.s", "down.z")
_ATTR = {"weight": "w", "qweight": "w", "scale": "s", "scales": "s", "zeros": "z"}


def encode(precision: str, slot: int) -> int:
    """The table code of ``slot`` in ``precision``'s class."""
    return slot << CLASS_BITS | KERNEL_CLASS[precision]


def decode(code: int) -> tuple[str, int]:
    """(precision, slot) of a table code."""
    return CLASS_NAME[code & ((1 << CLASS_BITS) - 1)], code >> CLASS_BITS


def group_sizes() -> dict[str, int]:
    """Quantization group of each integer class (the registry's; kernels take them as constants)."""
    return {p: get_precision(p).group_size for p in ("int8", "int4", "int3", "int2")}


@dataclass(frozen=True)
class PoolDescriptor:
    """The pool buffer and, per kernel class, where its slabs and fields are (see module docstring)."""

    buffer: torch.Tensor          # [bytes] uint8, the DevicePool's one allocation
    desc: torch.Tensor            # [C, F] int64 on the buffer's device
    classes: frozenset[str]       # precisions the pool has slabs of
    hidden: int
    intermediate: int

    @classmethod
    def of(cls, pool: DevicePool) -> PoolDescriptor:
        rows = np.zeros((1 << CLASS_BITS, len(DESC_FIELDS)), dtype=np.int64)  # unused classes: zeros
        for r in pool.regions:
            lay = pool.layouts[r.precision]
            row = rows[KERNEL_CLASS[r.precision]]
            row[0], row[1] = r.base, r.stride
            for f in lay.fields:
                row[DESC_FIELDS.index(f"{f.proj}.{_ATTR[f.attr]}")] = f.offset
        if (rows % 16).any():
            raise ValueError("the fused kernels need 16-byte aligned slab regions, strides and fields; "
                             "give the pool a budget with room for alignment (DevicePool falls back to none)")
        lay0 = next(iter(pool.layouts.values()))
        return cls(pool.buffer, torch.from_numpy(rows).to(pool.device), frozenset(pool.region),
                   lay0.hidden, lay0.intermediate)


class ResidencyTable:
    """``codes [L, E]`` int32 on the device plus its host mirror; see the module docstring.

    Writes are staged on the host (:meth:`stage`) and land on the device in one ordered write
    (:meth:`flush`), enqueued on the current stream: kernels enqueued before it read the old
    codes, kernels after it the new ones.
    """

    def __init__(self, layers: int, experts: int, device: torch.device | str) -> None:
        self.host = np.full((layers, experts), -1, dtype=np.int64)
        self.codes = torch.full((layers, experts), -1, dtype=torch.int32, device=device)
        self._staged: dict[int, int] = {}
        self.version = 0   # flushes that wrote something (a host-side copy of the codes is current while equal)
        cuda = torch.device(device).type == "cuda"
        # a flush copies the whole table from one of these pinned buffers (one copy, no index kernel); a buffer is
        # rewritten only once the copy that read it has run (its event)
        self._ring = [torch.empty((layers, experts), dtype=torch.int32, pin_memory=True) for _ in range(4)] if cuda else []
        self._ring_ev: list[Any] = [None] * len(self._ring)
        self._flushes = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.host.shape  # type: ignore[return-value]

    def stage(self, layer: int, expert: int, precision: str, slot: int) -> None:
        """Point ``(layer, expert)`` at ``slot`` of ``precision`` at the next flush."""
        self._staged[layer * self.host.shape[1] + expert] = encode(precision, slot)

    def clear(self, layer: int, expert: int) -> None:
        """Mark ``(layer, expert)`` as having no resident copy at the next flush (code -1: kernels add 0)."""
        self._staged[layer * self.host.shape[1] + expert] = -1

    def pending(self) -> int:
        return len(self._staged)

    def flush(self) -> list[int]:
        """Write the staged entries to the device (current stream); the flat indices written."""
        if not self._staged:
            return []
        idx = list(self._staged)
        self.host.reshape(-1)[idx] = [self._staged[i] for i in idx]
        if self._ring:
            k = self._flushes % len(self._ring)
            if self._ring_ev[k] is not None:
                self._ring_ev[k].synchronize()   # the copy that last read this buffer (long done, normally)
            buf = self._ring[k]
            np.copyto(buf.numpy(), self.host, casting="unsafe")
            self.codes.copy_(buf, non_blocking=True)
            ev = self._ring_ev[k] = self._ring_ev[k] or torch.cuda.Event()
            ev.record()
        else:
            self.codes.copy_(torch.from_numpy(self.host.astype(np.int32)))
        self._flushes += 1
        self._staged.clear()
        self.version += 1
        return idx

    def where(self, layer: int, expert: int) -> tuple[str, int]:
        """(precision, slot) the host mirror holds for ``(layer, expert)``."""
        code = int(self.host[layer, expert])
        if code < 0:
            raise KeyError(f"expert ({layer}, {expert}) has no resident copy")
        return decode(code)


# ----------------------------------------------------------------------------- torch reference
def expert_weights(pool: DevicePool, precision: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized float32 ``gate_up [2I, H]`` and ``down [H, I]`` of one slot."""
    gu, dn = pool.stacks[precision]
    s = torch.tensor([slot], device=pool.device)
    return gu.dequantize(s, torch.float32)[0], dn.dequantize(s, torch.float32)[0]


def serve_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor,
                    pool: DevicePool) -> torch.Tensor:
    """The MoE layer in float32 from the slabs ``codes [E]`` names: ``x [T, H]`` -> ``[T, H]`` float32.

    ``ids``/``weights [T, k]``; an expert coded -1 adds nothing. Reads ids and codes on the host (syncs): CPU path
    and test oracle.
    """
    xf = x.float()
    out = torch.zeros_like(xf)
    code_of = codes.tolist()
    inter = pool.layouts[next(iter(pool.layouts))].intermediate
    for e in torch.unique(ids).tolist():
        if code_of[e] < 0:   # no resident copy: adds nothing, as in the fused kernels
            continue
        tok, j = torch.nonzero(ids == e, as_tuple=True)
        gu, dn = expert_weights(pool, *decode(int(code_of[e])))
        a = xf[tok] @ gu.T                                                     # [n, 2I]
        h = F.silu(a[:, :inter]) * a[:, inter:]                                # [n, I]
        out.index_add_(0, tok, (h @ dn.T) * weights[tok, j, None].float())
    return out


def route_reference(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE routing: softmax in float32, top-k, optional renormalization -> (ids int32, weights fp32)."""
    p = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(p, top_k, dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return ids.to(torch.int32), w


def write_expert(pool: DevicePool, slab: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Quantize one expert (``gate_up [2I, H]``, ``down [H, I]``) into slab ``slab``'s precision and store it."""
    precision, _ = pool.slot(slab)
    for dst, w in zip(pool.slab_stacks(slab), (gate_up, down), strict=True):
        src = quantize_stack(w[None].float(), precision)
        for name, t in vars(dst).items():
            if isinstance(t, torch.Tensor):
                t.copy_(getattr(src, name))


def load_layer(pool: DevicePool, table: ResidencyTable, layer: int, gate_up: torch.Tensor, down: torch.Tensor,
               precision: str, experts: list[int] | None = None) -> None:
    """Make experts of ``layer`` (all, or ``experts``) resident in ``precision`` (``gate_up [E, 2I, H]``, ``down [E, H, I]``).

    Reserves one slab per expert in the ledger (READY at once: an initial load, before serving),
    quantizes the layer in one go on the weights' device, writes the slabs and stages the table.
    """
    slots = []
    chosen = list(range(gate_up.shape[0])) if experts is None else experts
    for e in chosen:
        slab = pool.ledger.begin_load(ExpertKey(layer, e), precision)
        if slab.__class__ is not int:
            raise ValueError(f"no {precision} slab left for expert ({layer}, {e}): {slab!r}")
        pool.ledger.finish_load(slab)
        slots.append(pool.slot(slab)[1])
        table.stage(layer, e, precision, slots[-1])
    write_slots(pool, precision, slots, gate_up, down, chosen)


def write_slots(pool: DevicePool, precision: str, slots: list[int], gate_up: torch.Tensor, down: torch.Tensor,
                experts: list[int]) -> None:
    """Quantize experts ``experts`` of one layer (``gate_up [E, 2I, H]``, ``down [E, H, I]``) in one
    go on the weights' device and store them in ``slots`` of ``precision``'s class."""
    idx = torch.tensor(slots, device=pool.device)
    sel = torch.tensor(experts, device=gate_up.device)
    for dst, w in zip(pool.stacks[precision], (gate_up[sel], down[sel]), strict=True):
        src = quantize_stack(w.float() if precision != "bf16" else w, precision)
        for name, t in vars(dst).items():
            if isinstance(t, torch.Tensor):
                t[idx] = getattr(src, name).to(t.device)
