"""The quality bookkeeping: each served copy's expert error, as the quality proxy charges it.

Per (layer, expert): the error of its copy at each pool precision, and of the host's bf16
copy (``MissRule.HOST``), from the run's sensitivity table (the analytic default where none is
given). A channel mix (:func:`core.precision.get_channel_mix`) costs its two parts' errors
mixed by :meth:`core.precision.ChannelMix.error`. A layer step's proxy is the gate-weighted sum
over its (expert, copy) pairs, accumulated in the miss rule (:mod:`drive.missrule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import get_channel_mix
from moebits.core.quality import SensitivityTable, analytic_error


@dataclass
class ErrorTable:
    """``table [L, E, P]`` (float64, pool precisions in order), the same as nested lists
    ``of[layer][expert][p]`` for the engines' inner loops, and ``host[layer][expert]``."""

    table: np.ndarray
    of: list[list[list[float]]]
    host: list[list[float]]


def error_table(spec: ModelSpec, precisions: list[str], table: SensitivityTable | None) -> ErrorTable:
    """The errors of ``precisions`` (and of the host's bf16 copy) for every expert of ``spec``."""
    L, E, row = spec.layers, spec.experts, spec.hidden
    names = [*precisions, "bf16"]
    mixes = {n: get_channel_mix(n) for n in names}
    base = sorted({b for n, m in mixes.items() for b in ((n,) if m is None else (m.low, m.high))})
    if table is None:
        arr = np.broadcast_to(np.array([analytic_error(p, row) for p in base]), (L, E, len(base)))
    else:
        arr = table.error_array(L, E, base, row)
    col: dict[str, Any] = {b: arr[:, :, i] for i, b in enumerate(base)}
    per = []
    for n in names:
        mix = mixes[n]
        per.append(col[n] if mix is None else np.asarray(mix.error(col[mix.low], col[mix.high])))
    P = len(precisions)
    err = np.stack(per[:P], axis=2).astype(np.float64) if P else np.zeros((L, E, 0))
    return ErrorTable(err, err.tolist(), per[P].tolist())
