"""The routing plan's types and static bounds, shared by the grouped launches and their kernels.

Dimension legend as in :mod:`runtime.grouped` (which builds the plan and runs the classes);
:mod:`runtime.triton_kernels` reads these types too, so they live apart from both (no cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassLayout:
    """Static layout of the pools: class order, slots per class, first group of each class."""

    precisions: tuple[str, ...]
    slots: tuple[int, ...]

    @property
    def bases(self) -> tuple[int, ...]:
        """First global group of each class, plus the total: ``[C + 1]``."""
        out = [0]
        for p in self.slots:
            out.append(out[-1] + p)
        return tuple(out)

    @property
    def groups(self) -> int:
        return sum(self.slots)


@dataclass(frozen=True)
class RoutePlan:
    """Pairs sorted by group (class-major) and padded per group to ``block_m`` rows.

    Attributes:
        pair_pad: ``[R]`` int32, the pair id ``t*k + j`` of each padded row; ``S`` marks padding.
        block_group: ``[NB]`` int32, the global group of each block; -1 past the last block.
        group_pad_end: ``[G]`` int32, cumulative padded rows at the end of each group.
        class_block: ``[C + 1]`` int32, first block of each class (last entry: blocks in use).
    """

    block_m: int
    tokens: int
    top_k: int
    pair_pad: torch.Tensor
    block_group: torch.Tensor
    group_pad_end: torch.Tensor
    class_block: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.tokens * self.top_k

    @property
    def rows(self) -> int:
        return self.pair_pad.numel()


def plan_rows(pairs: int, groups: int, block_m: int) -> int:
    """Upper bound on padded rows: every active group wastes at most ``block_m - 1`` rows."""
    rows = pairs + min(pairs, groups) * (block_m - 1)
    return -(-rows // block_m) * block_m


def class_block_bound(pairs: int, slots: int, block_m: int) -> int:
    """Upper bound on the M-blocks of one class (a kernel's static grid size)."""
    return pairs // block_m + min(pairs, slots) + 1
