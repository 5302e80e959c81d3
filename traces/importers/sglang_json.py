"""Importer for ``sglang-json``: Llama-4-Maverick per-request expert selections (SGLang).

One JSON file per request: a list of forward steps, element 0 the prefill and 1..N the decode
steps. A step maps the decoder-layer index ("0".."47") to null for dense layers or, for the 24
MoE layers (odd indices 1, 3, .., 47), to a list over the step's tokens of the selected expert
ids (top-1, so ``[[e], [e], ...]``). Decoder layer i becomes moebits MoE layer (i - 1) // 2.
There are no gate weights. A folder (subfolders included) imports as one trace, one sequence
per file in natural path order; steps are token positions, prefill tokens first.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from moebits.traces.format import Phase, Trace, TraceError
from moebits.traces.importers._common import RowCollector, load_json
from tqdm import tqdm

NAME = "sglang-json"
MODEL = "Llama-4-Maverick"
SUFFIXES = (".json",)
DECODER_LAYERS = 48
MOE_KEYS = tuple(str(i) for i in range(1, DECODER_LAYERS, 2))  # odd decoder layers
DENSE_KEYS = tuple(str(i) for i in range(0, DECODER_LAYERS, 2))
_HEAD = re.compile(r'^\s*\[\s*\{\s*"\d+"\s*:')


def sniff(path: Path, head: str) -> bool:
    """A .json list of dicts keyed by decoder-layer numbers."""
    return bool(_HEAD.match(head))


def _step_experts(step: object, where: str) -> np.ndarray:
    """[24 MoE layers, T tokens, k] expert ids of one forward step."""
    if not isinstance(step, dict):
        raise TraceError(
            f"{where}: a step must be an object keyed by decoder layer, got {type(step).__name__}"
        )
    missing = [key for key in MOE_KEYS if step.get(key) is None]
    if missing:
        raise TraceError(f"{where}: MoE decoder layer(s) {missing[:5]} missing or null")
    dense = [key for key in DENSE_KEYS if step.get(key) is not None]
    if dense:
        raise TraceError(f"{where}: even decoder layer(s) {dense[:5]} carry routing; expected dense (null)")
    try:
        ids = np.asarray([step[key] for key in MOE_KEYS], dtype=np.int64)
    except (ValueError, TypeError):
        raise TraceError(f"{where}: MoE layers disagree on the token count or hold non-integer ids") from None
    if ids.ndim != 3:
        raise TraceError(f"{where}: expected [tokens][k] expert ids per layer, got shape {ids.shape[1:]}")
    return ids


def _add_file(rows: RowCollector, seq: int, path: Path) -> tuple[int, int]:
    """Rows of one request file; returns (prefill tokens, decode tokens)."""
    steps = load_json(path)
    if not isinstance(steps, list) or not steps:
        raise TraceError(f"{path}: expected a non-empty JSON list of forward steps")
    layers = np.arange(len(MOE_KEYS))
    pos, counts = 0, [0, 0]
    for i, step in enumerate(steps):
        ids = _step_experts(step, f"{path} step {i}")  # [L, T, k]
        n_tok = ids.shape[1]
        step_ids = np.repeat(np.arange(pos, pos + n_tok), len(layers))  # token-major
        layer_ids = np.tile(layers, n_tok)
        expert = ids.transpose(1, 0, 2).reshape(-1, ids.shape[2])
        phase = Phase.PREFILL if i == 0 else Phase.DECODE
        rows.add(seq, step_ids, phase, layer_ids, expert)
        counts[int(phase)] += n_tok
        pos += n_tok
    return counts[0], counts[1]


def load(files: list[Path], root: Path) -> Trace:
    """Import one request file or a folder of them."""
    rows = RowCollector(k=1, has_gates=False)
    prefill = decode = 0
    for seq, path in enumerate(tqdm(files, desc="sglang-json", unit="file", disable=len(files) < 20 or None)):
        p, d = _add_file(rows, seq, path)
        prefill, decode = prefill + p, decode + d
    names = "; ".join(f"{i}={_rel(f, root)}" for i, f in enumerate(files))
    provenance = {
        "model": "meta-llama/Llama-4-Maverick-17B-128E-Instruct (SGLang)",
        "dataset": "MMLU ("
        + ", ".join(sorted({_rel(f, root).rpartition("/")[0] or "." for f in files}))
        + ")",
        "capture_tool": "SGLang expert-selection recorder (core12345/MoE_expert_selection_trace, via andronius-yang/cse223b-proj)",
        "source": str(root),
        "format": NAME,
        "sequences": names,
        "layers": "decoder layer i (odd, MoE) -> MoE layer (i-1)//2; even decoder layers are dense",
        "gates": "none in the source",
        "repairs": f"none (read {len(files)} files: {prefill:,} prefill + {decode:,} decode tokens, all 24 MoE layers each)",
    }
    return rows.to_trace(MODEL, provenance, str(root))


def _rel(path: Path, root: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()
