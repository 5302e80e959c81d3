"""The device residency table and the pool descriptor the fused MoE kernels read.

Dimension legend: L MoE layers, E experts per layer, H hidden, I expert intermediate,
C kernel classes (one per precision, one for a channel mix), F descriptor fields.

A graph-captured step cannot ask the host which slab holds an expert. Instead every kernel
reads two small device tensors:

* :class:`ResidencyTable` ``codes [L, E]`` int32: expert ``(layer, e)`` is served from slot
  ``code >> 3`` of kernel class ``code & 7``. Writing an entry in place retargets every
  captured graph at once; no re-capture.
* :class:`PoolDescriptor` ``desc [C, F]`` int64: per kernel class, where its slabs live in the
  one pool buffer (:class:`runtime.pool.DevicePool`) - region base, slab stride - and the
  byte offset inside a slab of each field (weight, scales, zeros of gate_up and down; for a
  channel mix those of its ``low`` copy, then the ``high`` rows' weight, scales, zeros and row ids).

Kernel classes are numbered once, here (:data:`KERNEL_CLASS`); a pool's one channel mix
(:mod:`runtime.channelmix`), whatever its name, is class :data:`MIX_CLASS` (:func:`kernel_class`). The pure-torch server :func:`serve_reference` dequantizes exactly what the
table names, in float32: the CPU path, and the oracle every kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moebits.core.keys import ExpertKey
from moebits.core.precision import get_channel_mix, get_precision
from moebits.runtime.channelmix import stack_tensors
from moebits.runtime.pool import DevicePool

KERNEL_CLASS = {"bf16": 0, "fp8": 1, "int8": 2, "int4": 3, "int3": 4, "int2": 5}
MIX_CLASS = 6                       # a pool's one channel mix (runtime.channelmix), whatever its name
CLASS_NAME = {v: k for k, v in KERNEL_CLASS.items()}
CLASS_BITS = 3                      # code = slot << CLASS_BITS | class
DESC_FIELDS = ("base", "stride", "gate_up.w", "gate_up.s", "gate_up.z", "down.w", "down.s", "down.z",
               "gate_up.hw", "gate_up.hs", "gate_up.hz", "gate_up.rows", "down.hw", "down.hs", "down.hz", "down.rows")
_ATTR = {"weight": "w", "qweight": "w", "scale": "s", "scales": "s", "zeros": "z"}


def kernel_class(precision: str) -> int:
    """The kernel class of ``precision``: a plain format's, or :data:`MIX_CLASS` for a registered channel mix."""
    if precision in KERNEL_CLASS:
        return KERNEL_CLASS[precision]
    if get_channel_mix(precision) is not None:
        return MIX_CLASS
    raise KeyError(f"the fused kernels have no class for precision {precision!r}")


def encode(precision: str, slot: int) -> int:
    """The table code of ``slot`` in ``precision``'s class."""
    return slot << CLASS_BITS | kernel_class(precision)


def decode(code: int, mix: str | None = None) -> tuple[str, int]:
    """(precision, slot) of a table code; ``mix``: the name of the pool's channel mix (class :data:`MIX_CLASS`)."""
    cls = code & ((1 << CLASS_BITS) - 1)
    if cls == MIX_CLASS:
        if mix is None:
            raise KeyError(f"code {code} names the channel-mix class, but no mix name was given")
        return mix, code >> CLASS_BITS
    return CLASS_NAME[cls], code >> CLASS_BITS


def _desc_field(proj: str, attr: str) -> str:
    """The descriptor field of a slab layout's field (``low.X`` of a mix as plain ``X``, ``high.X`` as ``hX``)."""
    if attr.startswith("low."):
        attr = attr[4:]
    elif attr.startswith("high."):
        return f"{proj}.h{_ATTR[attr[5:]]}"
    return f"{proj}.{attr if attr == 'rows' else _ATTR[attr]}"


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
    mix: str | None = None        # the pool's channel mix (class MIX_CLASS), if any
    kept: tuple[int, int] = (0, 0)  # its kept rows of gate_up and down

    @classmethod
    def of(cls, pool: DevicePool) -> PoolDescriptor:
        mixes = [p for p in pool.region if get_channel_mix(p) is not None]
        if len(mixes) > 1:
            raise ValueError(f"the fused kernels serve one channel mix per pool, this one has {mixes}; "
                             "run it in the eager runtime")
        rows = np.zeros((1 << CLASS_BITS, len(DESC_FIELDS)), dtype=np.int64)  # unused classes: zeros
        for r in pool.regions:
            lay = pool.layouts[r.precision]
            row = rows[kernel_class(r.precision)]
            row[0], row[1] = r.base, r.stride
            for f in lay.fields:
                if f.proj != "pad":
                    row[DESC_FIELDS.index(_desc_field(f.proj, f.attr))] = f.offset
        if (rows % 16).any():
            raise ValueError("the fused kernels need 16-byte aligned slab regions, strides and fields; "
                             "give the pool a budget with room for alignment (DevicePool falls back to none)")
        lay0 = next(iter(pool.layouts.values()))
        mix = mixes[0] if mixes else None
        kept = (pool.layouts[mix].kept_rows("gate_up"), pool.layouts[mix].kept_rows("down")) if mix else (0, 0)
        return cls(pool.buffer, torch.from_numpy(rows).to(pool.device), frozenset(pool.region),
                   lay0.hidden, lay0.intermediate, mix, kept)


class ResidencyTable:
    """``codes [L, E]`` int32 on the device plus its host mirror; see the module docstring.

    Writes are staged on the host (:meth:`stage`) and land on the device in one ordered write
    (:meth:`flush`), enqueued on the current stream: kernels enqueued before it read the old
    codes, kernels after it the new ones.
    """

    def __init__(self, layers: int, experts: int, device: torch.device | str, mix: str | None = None) -> None:
        self.mix = mix   # the pool's channel mix (what class MIX_CLASS names), if any
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
        return decode(code, self.mix)


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
        gu, dn = expert_weights(pool, *decode(int(code_of[e]), pool_mix(pool)))
        a = xf[tok] @ gu.T                                                     # [n, 2I]
        h = F.silu(a[:, :inter]) * a[:, inter:]                                # [n, I]
        out.index_add_(0, tok, (h @ dn.T) * weights[tok, j, None].float())
    return out


def pool_mix(pool: DevicePool) -> str | None:
    """The name of ``pool``'s channel mix (table class :data:`MIX_CLASS`), or None."""
    return next((p for p in pool.layouts if get_channel_mix(p) is not None), None)


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
    lay = pool.layouts[precision]
    for dst, w, proj in zip(pool.slab_stacks(slab), (gate_up, down), ("gate_up", "down"), strict=True):
        src = stack_tensors(lay.quantize(proj, w[None].float()))
        for name, t in stack_tensors(dst).items():
            t.copy_(src[name])


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
    lay = pool.layouts[precision]
    for dst, w, proj in zip(pool.stacks[precision], (gate_up[sel], down[sel]), ("gate_up", "down"), strict=True):
        src = stack_tensors(lay.quantize(proj, w))
        for name, t in stack_tensors(dst).items():
            t[idx] = src[name].to(t.device)
