"""The quality proxy: how much error serving an expert in a given precision adds.

The simulator's quality proxy is the gate-weighted expert quantization error per token and
layer: for every token routed at a layer, sum over its k experts of gate weight x the relative
error of the precision the expert was served in, averaged over (token, layer) pairs.

Relative error of a precision (``analytic_error``), where no measured table is given; bf16 is
the reference (error 0), weights are modelled as Gaussian:

- integer formats, round-to-nearest with one asymmetric (scale, zero) per group of ``g``
  weights: the step is range/(2^b - 1), the rounding error uniform, so the RMS error relative
  to the weights' RMS is ``R(g) / ((2^b - 1) * sqrt(12))`` with ``R(g)`` the expected range of
  ``g`` standard normals (Blom: ``2 * Phi^-1((g - 0.375) / (g + 0.25))``; 5.15 at g = 128).
  int8 0.0058, int4 0.099, int3 0.21, int2 (g = 64) 0.45.
- float formats with ``m`` mantissa bits (fp8 = e4m3, m = 3): the rounding error is uniform
  over one ulp, and one ulp relative to a log-uniform mantissa averages ``2^-m / (2 ln 2)``,
  so the relative RMS error is ``2^-m * 0.7213 / sqrt(12)`` = 0.026 for fp8.

A *sensitivity table* replaces these per expert: a Parquet or CSV file with one row per
(layer, expert, precision) and columns ``layer, expert, precision, error`` plus optional
``router_norm, router_norm_change, max_intra_neuron_variance, frequency, dataset,
output_error, kl_estimate, kl_measured``. Rows missing from a table fall back to the analytic
default. Where tables come from:

- *measured*: ``moebits train sensitivity`` measures one on a text split of the project's own
  trained MoE (:mod:`train.sensitivity`); its ``error`` is in other units than the analytic
  default: an estimated next-token KL (nats) per unit of gate weight routed to the expert, so
  that the proxy times the layers estimates a run's KL. The embedded tables
  ``train/data/sensitivity/{calibration,evaluation}.parquet`` are measured on the CALIBRATION
  split (for policies) and the EVALUATION split (for grading);
- *synthetic*: ``policies._tables.synthetic_table`` draws a plausible table from a seed (the
  default of ``moebits sim`` / ``moebits runtime`` without ``quality_table``); it is a guess,
  and a run with it says so beside its proxy (:func:`table_kind`; ``drive.report.quality_source``);
- *analytic*: no table, the per-precision errors above.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
from moebits.core.precision import Precision, get_precision

REFERENCE = "bf16"
REQUIRED_COLUMNS = ("layer", "expert", "precision", "error")
OPTIONAL_COLUMNS = ("router_norm", "router_norm_change", "max_intra_neuron_variance", "frequency", "dataset",
                    "output_error", "kl_estimate", "kl_measured")
FLOAT_MANTISSA_BITS = {"bf16": 7, "fp8": 3}  # fp8 is e4m3


def table_kind(source: str | None) -> str:
    """``synthetic``, ``analytic`` or ``measured``: what a run's ``quality_table`` source names."""
    if not source or str(source).startswith("synthetic"):
        return "synthetic"
    return "analytic" if source == "analytic" else "measured"


def expected_range_sigma(group: int) -> float:
    """Expected range of ``group`` standard normal samples, in sigmas (Blom's approximation)."""
    if group < 2:
        raise ValueError(f'"group" must be >= 2, got {group}.')
    return 2.0 * NormalDist().inv_cdf((group - 0.375) / (group + 0.25))


def analytic_error(precision: Precision | str, row_len: int = 2048) -> float:
    """Relative RMS weight error of ``precision`` vs bf16 (see the module docstring).

    ``row_len`` is the input dimension, used for per-row (group_size 0) integer scales."""
    p = get_precision(precision) if isinstance(precision, str) else precision
    if p.name == REFERENCE:
        return 0.0
    if p.is_float:
        m = FLOAT_MANTISSA_BITS.get(p.name, max(p.bits - 5, 1))
        return 2.0**-m * (0.5 / math.log(2)) / math.sqrt(12)
    group = p.group_size if p.group_size > 0 else row_len
    return expected_range_sigma(group) / ((2**p.bits - 1) * math.sqrt(12))


@dataclass
class SensitivityTable:
    """Measured error per (layer, expert, precision); extra columns ride along in ``extra``."""

    layer: np.ndarray  # [N] int
    expert: np.ndarray  # [N] int
    precision: list[str]
    error: np.ndarray  # [N] float64
    extra: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.precision)
        if self.layer.shape != (n,) or self.expert.shape != (n,) or self.error.shape != (n,):
            raise ValueError("sensitivity table columns must all have the same length")
        if n and ((self.layer < 0).any() or (self.expert < 0).any()):
            raise ValueError("sensitivity table has negative layer or expert ids")
        if n and (~np.isfinite(self.error) | (self.error < 0)).any():
            raise ValueError("sensitivity table has a negative, NaN or infinite error")
        for name in set(self.precision):
            get_precision(name)

    def error_array(self, layers: int, experts: int, precisions: list[str], row_len: int = 2048) -> np.ndarray:
        """``[layers, experts, len(precisions)]`` errors: the table where it has a row, the
        analytic default elsewhere. Rows outside the model's shape are an error."""
        out = np.empty((layers, experts, len(precisions)), dtype=np.float64)
        out[:] = [analytic_error(p, row_len) for p in precisions]
        if len(self.precision) and (self.layer.max() >= layers or self.expert.max() >= experts):
            raise ValueError(
                f"sensitivity table names layer {int(self.layer.max())} / expert {int(self.expert.max())}, "
                f"outside the model's {layers} layers x {experts} experts"
            )
        index = {p: i for i, p in enumerate(precisions)}
        for layer, expert, prec, err in zip(self.layer, self.expert, self.precision, self.error, strict=True):
            if prec in index:
                out[layer, expert, index[prec]] = err
        return out


def read_sensitivity(path: str | os.PathLike[str]) -> SensitivityTable:
    """Read a sensitivity table from ``.parquet`` or ``.csv``; problems raise one ValueError."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such sensitivity table")
    try:
        cols = _read_parquet(path) if path.suffix == ".parquet" else _read_csv(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable sensitivity table ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise ValueError(f"{path}: sensitivity table lacks column(s) {missing}; needs {list(REQUIRED_COLUMNS)}")
    try:
        return SensitivityTable(
            layer=np.asarray(cols["layer"], dtype=np.int64),
            expert=np.asarray(cols["expert"], dtype=np.int64),
            precision=[str(p) for p in cols["precision"]],
            error=np.asarray(cols["error"], dtype=np.float64),
            extra={c: list(cols[c]) for c in OPTIONAL_COLUMNS if c in cols},
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_sensitivity(table: SensitivityTable, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as ``.parquet`` or ``.csv`` (by the suffix of ``path``)."""
    path = Path(path)
    cols: dict[str, list] = {
        "layer": table.layer.tolist(),
        "expert": table.expert.tolist(),
        "precision": list(table.precision),
        "error": table.error.tolist(),
        **{k: list(v) for k, v in table.extra.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa  # file edge only: core stays numpy + stdlib at import
        import pyarrow.parquet as pq

        pq.write_table(pa.table(cols), path, compression="zstd")
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(cols))
            w.writerows(zip(*cols.values(), strict=True))
    return path


def _read_parquet(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pydict()
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise OSError(str(exc)) from None


def _read_csv(path: Path) -> dict[str, list]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    names = rows[0].keys() if rows else []
    return {n: [r[n] for r in rows] for n in names}
