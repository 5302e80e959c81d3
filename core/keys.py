"""ExpertKey: the one name for an expert, used everywhere instead of bare tuples."""

from __future__ import annotations

from typing import NamedTuple


class ExpertKey(NamedTuple):
    """One routed expert of one MoE layer.

    ``layer`` is the MoE-layer index (0-based over the model's MoE layers, not its decoder
    layers); ``expert`` is the routed-expert id within that layer. A NamedTuple so that keys
    hash fast and sort in (layer, expert) order, which keeps every engine deterministic.
    """

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"L{self.layer}E{self.expert}"
