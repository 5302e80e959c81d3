"""The device slab pool: one buffer for the whole expert budget, carved into typed slab views.

Dimension legend: H hidden, I expert intermediate, g quantization group, b bits, P slabs of
one class (one precision), C packed columns.

A *slab* holds one expert in one precision, packed exactly as the Precision registry counts
its bytes (:class:`SlabLayout`): the fields of ``gate_up [2I, H]`` and ``down [H, I]`` one after
another, widest element type first so that every field starts aligned::

    bf16   gate_up.weight [2I, H] bf16 | down.weight [H, I] bf16
    fp8    gate_up.scale [2I] f32 | down.scale [H] f32 | gate_up.weight [2I, H] e4m3 | down.weight
    intb   gate_up.scales, gate_up.zeros [2I, H/g] f16 | down.scales, down.zeros [H, I/g] f16 |
           gate_up.qweight [2I, H*b/8] u8 | down.qweight [H, I*b/8] u8
    mix    a channel mix (:mod:`runtime.channelmix`): the ``low.*`` fields of its low format,
           the ``high.*`` fields of its kept rows, their ``rows`` ids [n] int32 (widest first)

A host copy of an expert (:mod:`runtime.host_store`) has the same bytes, so promoting it is
one contiguous copy. :class:`DevicePool` allocates one ``uint8`` buffer at start-up for the
policy's slab plan (never more than the budget), and lays each class out as ``P`` slabs at a
fixed stride. Every field of a class is then one strided view ``[P, N, C]`` over the buffer
(dimension 0 steps one slab), which is exactly the stacked :mod:`runtime.quant` weight stack
the grouped kernels read; slab ``s`` of the class is slot ``s - first`` of those stacks.
Which slab holds which expert is the :class:`core.slabs.SlabLedger`'s business (deterministic
lowest-id allocation); nothing here allocates after start-up.

A policy's *staging slab* (``staging``: ``count`` slots of one precision for bypassed experts, its
bytes part of the budget but not of the ledger's plan) is laid out as spare slots after that
class's ledger slabs (a class of its own when the plan has none of that precision): slots
``count .. count + spare - 1`` of the class's stacks, with no slab id (:meth:`DevicePool.staging_slot`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import ChannelMix, get_channel_mix, get_precision
from moebits.core.slabs import PoolError, SlabLedger
from moebits.runtime.channelmix import ROW_ID, AnyStack, MixStack, kept_rows, quantize_mix
from moebits.runtime.quant import (
    DEFAULT_HQQ,
    DenseStack,
    Fp8Stack,
    HQQConfig,
    QuantizedStack,
    QuantMethod,
    WeightStack,
    quantize_stack,
)

CLASS_ALIGN = 256  # bytes: where each class starts, when the budget leaves room for it
STRIDE_ALIGN = 16  # bytes: slab stride, when the budget leaves room for it
_PROJ = ("gate_up", "down")


@dataclass(frozen=True)
class Field:
    """One tensor of a packed expert: ``proj.attr`` with per-expert shape ``shape`` at ``offset`` bytes."""

    proj: str
    attr: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class SlabLayout:
    """Byte layout of one expert in ``precision`` (see the module docstring)."""

    precision: str
    hidden: int
    intermediate: int
    fields: tuple[Field, ...]
    nbytes: int

    @property
    def align(self) -> int:
        """The widest element size: slab strides and bases must be multiples of it."""
        return max(f.dtype.itemsize for f in self.fields)

    def stacks(self, buf: torch.Tensor, base: int, count: int, stride: int) -> tuple[AnyStack, AnyStack]:
        """(gate_up, down) stacks of ``count`` slabs in ``buf`` (1-D uint8) from byte ``base``, ``stride`` apart."""
        if base % self.align or stride % self.align:
            raise PoolError(f"{self.precision} slabs need {self.align}-byte alignment, got base {base}, stride {stride}")
        if count and base + (count - 1) * stride + self.nbytes > buf.numel():
            raise PoolError(f"{count} {self.precision} slabs from byte {base} overrun a {buf.numel()}-byte buffer")
        views = {(f.proj, f.attr): _field_view(buf, base, count, stride, f) for f in self.fields}
        return self._stack("gate_up", views), self._stack("down", views)

    def quantize(self, proj: str, w: torch.Tensor, method: QuantMethod = QuantMethod.RTN,
                 hqq: HQQConfig = DEFAULT_HQQ) -> AnyStack:
        """``w [E, N, K]`` (projection ``proj``) in this layout's precision: a plain format, or a channel mix
        with as many kept rows as the layout holds (:mod:`runtime.channelmix`)."""
        mix = get_channel_mix(self.precision)
        if mix is None:
            return quantize_stack(w if self.precision == "bf16" else w.float(), self.precision, method, hqq=hqq)
        kept = next(f.shape[0] for f in self.fields if f.proj == proj and f.attr == "rows")
        high = sum(f.nbytes for f in self.fields if f.proj == proj and f.attr.startswith("high."))
        return quantize_mix(w.float(), mix, high // kept if kept else 0, method, hqq)

    def kept_rows(self, proj: str) -> int:
        """Rows of ``proj`` a channel-mix layout keeps at its high precision (0 for a plain format)."""
        return next((f.shape[0] for f in self.fields if f.proj == proj and f.attr == "rows"), 0)

    def _stack(self, proj: str, v: dict[tuple[str, str], torch.Tensor]) -> AnyStack:
        mix = get_channel_mix(self.precision)
        if mix is None:
            return _plain_stack(self.precision, proj, v, "")
        return MixStack(_plain_stack(mix.low, proj, v, "low."), _plain_stack(mix.high, proj, v, "high."),
                        v[(proj, "rows")], mix.name)


def _plain_stack(precision: str, proj: str, v: dict[tuple[str, str], torch.Tensor], prefix: str) -> WeightStack:
    p = get_precision(precision)
    if p.name == "bf16":
        return DenseStack(v[(proj, prefix + "weight")])
    if p.name == "fp8":
        return Fp8Stack(v[(proj, prefix + "weight")], v[(proj, prefix + "scale")])
    return QuantizedStack(p.bits, p.group_size, v[(proj, prefix + "qweight")], v[(proj, prefix + "scales")],
                          v[(proj, prefix + "zeros")])


def _field_view(buf: torch.Tensor, base: int, count: int, stride: int, f: Field) -> torch.Tensor:
    """``[count, *f.shape]`` view of field ``f`` of every slab (dim 0 steps ``stride`` bytes)."""
    isz = f.dtype.itemsize
    if count == 0:
        return torch.empty((0, *f.shape), dtype=f.dtype, device=buf.device)
    start = base + f.offset
    span = (count - 1) * stride + f.nbytes
    flat = buf[start : start + span].view(f.dtype)
    inner = [1] * len(f.shape)
    for i in range(len(f.shape) - 2, -1, -1):
        inner[i] = inner[i + 1] * f.shape[i + 1]
    return flat.as_strided((count, *f.shape), (stride // isz, *inner))


FieldSpec = tuple[str, str, torch.dtype, tuple[int, ...]]  # (proj, attr, dtype, per-expert shape)


def _plain_fields(precision: str, shapes: dict[str, tuple[int, int]], prefix: str = "") -> list[FieldSpec]:
    """The fields of a plain format (bf16, fp8, int8/4/3/2) for projections of ``shapes`` (N, K)."""
    p = get_precision(precision)
    if p.name == "bf16":
        return [(proj, prefix + "weight", torch.bfloat16, shapes[proj]) for proj in _PROJ]
    if p.name == "fp8":
        spec: list[FieldSpec] = [(proj, prefix + "scale", torch.float32, shapes[proj][:1]) for proj in _PROJ]
        return spec + [(proj, prefix + "weight", torch.float8_e4m3fn, shapes[proj]) for proj in _PROJ]
    spec = []
    for proj in _PROJ:
        n, k = shapes[proj]
        if k % p.group_size:
            raise PoolError(f"{p.name}: the input size {k} of {proj} is not a multiple of the group size "
                            f"{p.group_size}; pick sizes that are (e.g. hidden and intermediate multiples of 128)")
        spec += [(proj, prefix + a, torch.float16, (n, k // p.group_size)) for a in ("scales", "zeros")]
    return spec + [(proj, prefix + "qweight", torch.uint8, (shapes[proj][0], shapes[proj][1] * p.bits // 8))
                   for proj in _PROJ]


def _bytes(spec: list[FieldSpec], proj: str) -> int:
    return sum(Field(pr, a, dt, sh, 0).nbytes for pr, a, dt, sh in spec if pr == proj)


def _mix_fields(mix: ChannelMix, shapes: dict[str, tuple[int, int]]) -> list[FieldSpec]:
    """A channel-mix copy (:mod:`runtime.channelmix`): the ``low`` fields, the kept rows at ``high``, their ids."""
    row = _plain_fields(mix.high, {proj: (1, k) for proj, (_, k) in shapes.items()})
    kept = {proj: (kept_rows(mix, n, _bytes(row, proj)), k) for proj, (n, k) in shapes.items()}
    return (_plain_fields(mix.low, shapes, "low.") + _plain_fields(mix.high, kept, "high.")
            + [(proj, "rows", ROW_ID, kept[proj][:1]) for proj in _PROJ])


def slab_layout(precision: str, hidden: int, intermediate: int) -> SlabLayout:
    """The packed layout of one ``hidden`` x ``intermediate`` expert in ``precision`` (a plain
    format or a registered channel mix); fields widest element first, so each starts aligned."""
    h, i = hidden, intermediate
    shapes = {"gate_up": (2 * i, h), "down": (h, i)}
    mix = get_channel_mix(precision)
    spec = _plain_fields(precision, shapes) if mix is None else _mix_fields(mix, shapes)
    spec = sorted(spec, key=lambda f: -f[2].itemsize)  # stable: plain layouts keep their order
    fields, off = [], 0
    for proj, attr, dtype, shape in spec:
        f = Field(proj, attr, dtype, shape, off)
        fields.append(f)
        off += f.nbytes
    if mix is not None:  # padded to the bytes the policy planned, rounded up to the row ids' alignment
        planned = mix.expert_bytes(*(sum(_bytes(_plain_fields(q, shapes), pr) for pr in _PROJ) for q in (mix.low, mix.high)))
        end = _round_up(planned, ROW_ID.itemsize)
        fields.append(Field("pad", "pad", torch.uint8, (end - off,), off))
        off = end
    return SlabLayout(precision, h, i, tuple(fields), off)


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


@dataclass(frozen=True)
class ClassRegion:
    """Where one slab class lives in the buffer: slabs ``first .. first + count - 1``."""

    precision: str
    first: int
    count: int
    base: int
    stride: int
    spare: int = 0   # staging slots after the ledger's slabs (slots count .. count + spare - 1; no slab id)

    @property
    def slots(self) -> int:
        return self.count + self.spare


def carve(ledger: SlabLedger, layouts: dict[str, SlabLayout], class_align: int, stride_align: int,
          staging: tuple[str, int] | None = None) -> list[ClassRegion]:
    """Class regions in plan order; slab ids run consecutively through the classes, as the ledger numbers them.
    ``staging`` (precision, slots): spare slots after that class's slabs (a last class when the plan has none)."""
    regions, first, end = [], 0, 0
    counts = [(name, cls.count, cls.slab_bytes) for name, cls in ledger.classes.items()]
    if staging is not None and staging[0] not in ledger.classes:
        counts.append((staging[0], 0, layouts[staging[0]].nbytes))
    for name, count, slab_bytes in counts:
        lay = layouts[name]
        spare = staging[1] if staging is not None and staging[0] == name else 0
        stride = _round_up(max(slab_bytes, lay.nbytes), max(stride_align, lay.align))
        base = _round_up(end, max(class_align, lay.align))
        regions.append(ClassRegion(name, first, count, base, stride, spare))
        first += count
        end = base + stride * (count + spare)
    return regions


class DevicePool:
    """The expert slab pool's storage on ``device``; see the module docstring."""

    def __init__(self, ledger: SlabLedger, spec: ModelSpec, device: torch.device | str,
                 staging: tuple[str, int] | None = None) -> None:
        self.ledger = ledger
        self.device = torch.device(device)
        self.staging = staging if staging is not None and staging[1] > 0 else None
        names = [*ledger.classes] + ([self.staging[0]] if self.staging and self.staging[0] not in ledger.classes else [])
        self.layouts = {p: slab_layout(p, spec.hidden, spec.expert_intermediate) for p in names}
        for p, lay in self.layouts.items():  # a channel mix: its planned bytes, rounded up to its alignment
            if p not in ledger.classes:
                continue
            planned = ledger.classes[p].slab_bytes
            if lay.nbytes != (planned if get_channel_mix(p) is None else _round_up(planned, lay.align)):
                raise PoolError(f"the plan's {p} slab is {planned} bytes but a packed "
                                f"{spec.hidden}x{spec.expert_intermediate} expert takes {lay.nbytes}")
        self.regions = self._fit(ledger)
        self.nbytes = max((r.base + r.stride * r.slots for r in self.regions), default=0)
        self.buffer = torch.zeros(max(self.nbytes, 1), dtype=torch.uint8, device=self.device)  # the one allocation
        self.region = {r.precision: r for r in self.regions}
        self._class_of: list[ClassRegion] = [r for r in self.regions for _ in range(r.count)]
        self.stacks = {r.precision: self.layouts[r.precision].stacks(self.buffer, r.base, r.slots, r.stride)
                       for r in self.regions}

    def _fit(self, ledger: SlabLedger) -> list[ClassRegion]:
        """Aligned regions if they fit the budget (the staging slab's bytes on top of the plan's), else the
        tightest layout that does."""
        budget = ledger.budget_bytes + (self.staging[1] * self.layouts[self.staging[0]].nbytes if self.staging else 0)
        for class_align, stride_align in ((CLASS_ALIGN, STRIDE_ALIGN), (1, 1)):
            regions = carve(ledger, self.layouts, class_align, stride_align, self.staging)
            total = max((r.base + r.stride * r.slots for r in regions), default=0)
            if total <= budget:
                return regions
        raise PoolError(f"the slab plan needs {total} bytes once aligned, more than the budget of {budget} bytes")

    def staging_slot(self, i: int) -> int:
        """The class slot of staging slot ``i`` (in the staging precision's stacks and table codes)."""
        assert self.staging is not None and 0 <= i < self.staging[1], f"no staging slot {i}"
        return self.region[self.staging[0]].count + i

    def staging_bytes(self, i: int) -> torch.Tensor:
        """The raw bytes of staging slot ``i`` (a 1-D uint8 view; a bypassed expert's copy lands here)."""
        assert self.staging is not None
        r = self.region[self.staging[0]]
        start = r.base + self.staging_slot(i) * r.stride
        return self.buffer[start:start + self.layouts[r.precision].nbytes]

    @property
    def slabs(self) -> int:
        return len(self._class_of)

    def slot(self, slab: int) -> tuple[str, int]:
        """(precision, slot in its class's stacks) of slab id ``slab``."""
        r = self._class_of[slab]
        return r.precision, slab - r.first

    def span(self, slab: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of slab ``slab`` in the buffer."""
        r = self._class_of[slab]
        start = r.base + (slab - r.first) * r.stride
        return start, start + self.layouts[r.precision].nbytes

    def slab_bytes(self, slab: int) -> torch.Tensor:
        """The raw bytes of slab ``slab`` (a 1-D uint8 view; copies land here)."""
        start, end = self.span(slab)
        return self.buffer[start:end]

    def slab_stacks(self, slab: int) -> tuple[AnyStack, AnyStack]:
        """Typed (gate_up, down) views of the one expert in slab ``slab`` (leading dimension 1)."""
        r = self._class_of[slab]
        start, _ = self.span(slab)
        return self.layouts[r.precision].stacks(self.buffer, start, 1, r.stride)
