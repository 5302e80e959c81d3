"""The Precision registry: weight formats and what they cost in bytes.

A Precision is a weight format (bf16, fp8, int8, int4, int3, int2, ...). Integer formats are
group-wise and asymmetric: every ``group_size`` consecutive weights along the input dimension
share one scale and one zero point, each ``scale_bits`` / ``zero_bits`` wide. fp8 carries one
fp32 scale per output row. Bytes for a matrix follow from that and nothing else.
"""

from __future__ import annotations

import math
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
