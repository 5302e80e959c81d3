"""Importer for ``hf-csv``: DeepSeek-V2-Lite per-prompt expert activations (MoE-Beyond, HF hooks).

One CSV per prompt with header ``Layer ID,Batch Number,Token,Activated Expert IDs``; rows are
layer-major (all tokens of layer 1 in order, then layer 2, ...). ``Layer ID`` 1..26 are the MoE
layers (decoder layer 0 is dense) and become moebits layers 0..25. ``Activated Expert IDs`` is a
Python-list string of the 6 routed experts, in the source's (unsorted) top-k order. Prefill only:
steps are the prompt-token positions. No gate weights. A folder imports as one trace, one
sequence per file in natural path order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from moebits.traces.format import Phase, Trace, TraceError
from moebits.traces.importers._common import RowCollector
from tqdm import tqdm

NAME = "hf-csv"
MODEL = "DeepSeek-V2-Lite"
SUFFIXES = (".csv",)
LAYERS = 26
K = 6
HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]


def sniff(path: Path, head: str) -> bool:
    """A .csv with the MoE-Beyond header."""
    return head.lstrip("\ufeff").split("\n", 1)[0].strip().split(",") == HEADER


def _read(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, keep_default_na=False, dtype={"Token": str, "Activated Expert IDs": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise TraceError(f"{path}: not a readable CSV ({str(exc).strip().splitlines()[0]})") from None
    if list(df.columns) != HEADER:
        raise TraceError(f"{path}: columns {list(df.columns)}, expected {HEADER}")
    return df


def _parse_ids(col: pd.Series, path: Path) -> np.ndarray:
    """'[8, 26, 56, 57, 60, 11]' strings -> [n, 6] ints."""
    cells = col.tolist()
    flat = ",".join(cells).replace("[", "").replace("]", "").split(",")
    if len(flat) != K * len(cells):
        row = next(i for i, c in enumerate(cells) if c.count(",") != K - 1)
        raise TraceError(f"{path}: data row {row + 1}: expected {K} expert ids, got {cells[row]!r}")
    try:
        return np.asarray(flat, dtype=np.int64).reshape(-1, K)
    except ValueError:
        raise TraceError(f"{path}: 'Activated Expert IDs' holds a non-integer id") from None


def _layer_blocks(df: pd.DataFrame, path: Path) -> int:
    """Check the layer-major layout; return the token count per layer."""
    try:
        layer = df["Layer ID"].to_numpy(dtype=np.int64)
        batch = df["Batch Number"].to_numpy(dtype=np.int64)
    except (ValueError, TypeError):
        raise TraceError(f"{path}: 'Layer ID' / 'Batch Number' must be integers") from None
    if (batch != 0).any():
        raise TraceError(f"{path}: 'Batch Number' other than 0; only batch-1 captures are supported")
    n_tok, rem = divmod(layer.shape[0], LAYERS)
    expected = np.repeat(np.arange(1, LAYERS + 1), n_tok)
    if rem or n_tok == 0 or not np.array_equal(layer, expected):
        present = sorted(set(layer.tolist()))
        raise TraceError(
            f"{path}: expected layer-major rows of Layer ID 1..{LAYERS} with equal token counts; "
            f"found {layer.shape[0]} rows over layers {present[:3]}..{present[-3:]}"
        )
    tokens = df["Token"].to_numpy().reshape(LAYERS, n_tok)
    if not (tokens == tokens[0]).all():
        raise TraceError(f"{path}: the Token column differs between layers; rows are not aligned")
    return n_tok


def _add_file(rows: RowCollector, seq: int, path: Path) -> int:
    df = _read(path)
    n_tok = _layer_blocks(df, path)
    ids = _parse_ids(df["Activated Expert IDs"], path)  # [L * T, k], layer-major
    step = np.tile(np.arange(n_tok), LAYERS)
    layer = np.repeat(np.arange(LAYERS), n_tok)
    rows.add(seq, step, Phase.PREFILL, layer, ids)
    return n_tok


def load(files: list[Path], root: Path) -> Trace:
    """Import one prompt CSV or a folder of them."""
    rows = RowCollector(k=K, has_gates=False)
    tokens = 0
    for seq, path in enumerate(tqdm(files, desc="hf-csv", unit="file", disable=len(files) < 20 or None)):
        tokens += _add_file(rows, seq, path)
    names = "; ".join(f"{i}={f.name}" for i, f in enumerate(files))
    provenance = {
        "model": "deepseek-ai/DeepSeek-V2-Lite-Chat (bitsandbytes 8-bit, HF transformers)",
        "dataset": "Puffin chat prompts (tagged_puffin_prompts.txt), prompt tokens only",
        "capture_tool": "HF forward hooks on the MoE gates (ngavhane/moe-beyond)",
        "source": str(root),
        "format": NAME,
        "sequences": names,
        "layers": "Layer ID 1..26 -> MoE layer 0..25 (decoder layer 0 is dense)",
        "gates": "none in the source; the 2 shared experts are always active and not listed",
        "repairs": f"none ({len(files)} files, {tokens:,} prefill tokens; prefill only, no decode)",
    }
    return rows.to_trace(MODEL, provenance, str(root))
