"""The Precision registry: weight formats and what they cost in bytes.

A Precision is a weight format (bf16, fp8, int8, int4, int3, int2, ...). Integer formats are
group-wise and asymmetric: every ``group_size`` consecutive weights along the input dimension
share one scale and one zero point, each ``scale_bits`` / ``zero_bits`` wide. fp8 carries one
fp32 scale per output row. Bytes for a matrix follow from that and nothing else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Precision:
    """A weight format.

    Attributes:
        name: registry key, e.g. ``"int4"``.
        bits: bits per stored weight.
        group_size: weights per (scale, zero) group along the input dimension; 0 means one
            scale per output row (per-channel), and no scale at all when ``scale_bits`` is 0.
        scale_bits: bits of each group's scale (0 for formats without scales, e.g. bf16).
        zero_bits: bits of each group's zero point (0 for symmetric formats).
        is_float: a floating-point format (bf16, fp8) rather than an integer one.
    """

    name: str
    bits: int
    group_size: int = 0
    scale_bits: int = 0
    zero_bits: int = 0
    is_float: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 32:
            raise ValueError(f'"bits" must be in 1..32, got {self.bits} for {self.name!r}.')
        if self.group_size < 0:
            raise ValueError(f'"group_size" must be >= 0, got {self.group_size} for {self.name!r}.')

    def matrix_bytes(self, rows: int, cols: int) -> int:
        """Bytes to store a ``[rows, cols]`` weight matrix (``cols`` is the input dimension)."""
        if rows <= 0 or cols <= 0:
            raise ValueError(f"matrix shape must be positive, got [{rows}, {cols}].")
        payload = math.ceil(rows * cols * self.bits / 8)
        overhead_bits = self.scale_bits + self.zero_bits
        if overhead_bits == 0:
            return payload
        groups_per_row = 1 if self.group_size == 0 else math.ceil(cols / self.group_size)
        return payload + math.ceil(rows * groups_per_row * overhead_bits / 8)

    @property
    def effective_bits(self) -> float:
        """Bits per weight including scale/zero overhead (for a long row)."""
        if self.group_size == 0:
            return float(self.bits)
        return self.bits + (self.scale_bits + self.zero_bits) / self.group_size


def _registry(*precisions: Precision) -> dict[str, Precision]:
    out: dict[str, Precision] = {}
    for p in precisions:
        if p.name in out:
            raise ValueError(f"duplicate precision {p.name!r}")
        out[p.name] = p
    return out


PRECISIONS: dict[str, Precision] = _registry(
    Precision("bf16", 16, is_float=True),
    Precision("fp8", 8, group_size=0, scale_bits=32, is_float=True),
    Precision("int8", 8, group_size=128, scale_bits=16, zero_bits=16),
    Precision("int4", 4, group_size=128, scale_bits=16, zero_bits=16),
    Precision("int3", 3, group_size=128, scale_bits=16, zero_bits=16),
    Precision("int2", 2, group_size=64, scale_bits=16, zero_bits=16),
)


def get_precision(name: str) -> Precision:
    """Look a precision up by name, with a message that lists the known ones."""
    try:
        return PRECISIONS[name]
    except KeyError:
        known = ", ".join(PRECISIONS)
        raise ValueError(f"unknown precision {name!r}; known precisions: {known}") from None


def by_bits_desc() -> list[Precision]:
    """All registered precisions, highest bits first (bf16 before fp8 before int8 ...)."""
    return sorted(PRECISIONS.values(), key=lambda p: (-p.effective_bits, p.name))


@dataclass(frozen=True, slots=True)
class ChannelMix:
    """A partial promotion (DynaMo's channel-level switching): an expert's ``low`` copy plus
    its most significant ``fraction`` of channels also held at ``high``.

    Engines treat its :attr:`name` as one more precision: one copy of ``low`` bytes plus
    ``fraction`` of the ``high`` copy's bytes (:meth:`expert_bytes`), served by a ``low``
    kernel plus a ``high`` kernel on ``fraction`` of the channels (:meth:`kernel_time_s`),
    with quantization error ``low - significance_share * (low - high)`` (:meth:`error`),
    where ``significance_share`` is the share of the expert's error reduction carried by
    those channels. Policies register the mixes they use with :func:`register_channel_mix`.
    """

    low: str
    high: str
    fraction: float
    significance_share: float

    def __post_init__(self) -> None:
        get_precision(self.low)
        get_precision(self.high)
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f'"fraction" must be in (0, 1], got {self.fraction}.')
        if not 0.0 <= self.significance_share <= 1.0:
            raise ValueError(f'"significance_share" must be in [0, 1], got {self.significance_share}.')

    @property
    def name(self) -> str:
        return f"{self.low}+{self.high}@f{float(self.fraction)!r}s{float(self.significance_share)!r}"

    @property
    def effective_bits(self) -> float:
        """Bits per weight of the whole copy (ranks it between ``low`` and above)."""
        return get_precision(self.low).effective_bits + self.fraction * get_precision(self.high).effective_bits

    def expert_bytes(self, low_bytes: int, high_bytes: int) -> int:
        """One expert's bytes, given its ``low`` and ``high`` copies' bytes."""
        return low_bytes + math.ceil(self.fraction * high_bytes)

    def error(self, low_error: float, high_error: float) -> float:
        """Quantization error, given the expert's errors at ``low`` and ``high``."""
        return low_error - self.significance_share * (low_error - high_error)

    def kernel_time_s(self, low_s: float, high_s: float) -> float:
        """Kernel time, given the ``low`` and ``high`` kernels' times on the same tokens."""
        return low_s + self.fraction * high_s


CHANNEL_MIXES: dict[str, ChannelMix] = {}


def register_channel_mix(mix: ChannelMix) -> str:
    """Make ``mix.name`` a precision engines can resolve with :func:`get_channel_mix`."""
    if mix.name in PRECISIONS:
        raise ValueError(f"channel mix name {mix.name!r} clashes with a registered precision")
    CHANNEL_MIXES.setdefault(mix.name, mix)
    return mix.name


def get_channel_mix(name: str) -> ChannelMix | None:
    """The registered channel mix called ``name``, or None for any other name."""
    return CHANNEL_MIXES.get(name)


_MIX_NAME = re.compile(r"^(\w+)\+(\w+)@f([0-9.eE+-]+)s([0-9.eE+-]+)$")


def channel_mix_of(name: str) -> ChannelMix | None:
    """The channel mix a name like ``int2+int8@f0.1s0.5`` (:attr:`ChannelMix.name`) spells, registered; None
    for a name of any other form (a plain precision). Lets tools that take precision lists (calibration
    designs) name a mix before any policy has registered it."""
    m = _MIX_NAME.match(name)
    if m is None:
        return None
    mix = ChannelMix(m[1], m[2], float(m[3]), float(m[4]))
    if mix.name != name:
        raise ValueError(f"channel mix {name!r} is spelled {mix.name!r}; use that name")
    register_channel_mix(mix)
    return CHANNEL_MIXES[name]
