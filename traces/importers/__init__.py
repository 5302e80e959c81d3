"""Importers for public MoE routing-trace formats, into the moebits trace format.

One module per format, each exposing ``NAME``, ``MODEL`` (the ModelSpec preset), ``SUFFIXES``,
``sniff(path, head) -> bool`` (does this file look like the format, judged from its first few KB)
and ``load(files, root) -> Trace``. A source is one file or a folder (searched recursively);
files of no known format in a folder (prompt lists, READMEs, generation outputs) are ignored,
but a folder holding two formats is an error.

=================  ===============================================  ======================
format             source                                            model preset
=================  ===============================================  ======================
``mixtral-jsonl``  vLLM profiler JSON lines (speculative-moe)        Mixtral-8x7B
``sglang-json``    SGLang per-request JSON (Llama-4 MMLU traces)     Llama-4-Maverick
``hf-csv``         HF-hook per-prompt CSV (MoE-Beyond)               DeepSeek-V2-Lite
``vllm-logger``    vLLM-MoE-Logger per-layer JSON lines              Qwen1.5-MoE-A2.7B
=================  ===============================================  ======================
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from moebits.traces.format import Trace, TraceError
from moebits.traces.importers import hf_csv, mixtral_jsonl, sglang_json, vllm_logger
from moebits.traces.importers._common import natural_key, read_head

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (mixtral_jsonl, sglang_json, hf_csv, vllm_logger)}

__all__ = ["FORMATS", "detect_format", "import_source"]


def _sniff(path: Path) -> str | None:
    """The format of one file, or None when it is no known trace format."""
    candidates = [m for m in FORMATS.values() if path.suffix.lower() in m.SUFFIXES]
    if not candidates:
        return None
    head = read_head(path)
    for module in candidates:
        if module.sniff(path, head):
            return str(module.NAME)
    return None


def _data_files(folder: Path) -> list[Path]:
    """Files under ``folder`` that could hold traces (no hidden files, no .md), naturally sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".") and not f.endswith(".md")]
    return sorted(out, key=lambda p: natural_key(p.relative_to(folder)))


def _check_exists(src: Path) -> None:
    if not src.exists():
        raise TraceError(f"{src}: no such file or folder")


def _formats_in(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in _data_files(folder):
        fmt = _sniff(path)
        if fmt is not None:
            found.setdefault(fmt, []).append(path)
    return found


def _folder_format(folder: Path) -> tuple[str, list[Path]]:
    """The one format of a folder's trace files, and those files."""
    found = _formats_in(folder)
    if not found:
        raise TraceError(f"{folder}: no files of a known trace format ({', '.join(FORMATS)}) in this folder")
    if len(found) > 1:
        detail = "; ".join(f"{fmt}: {len(files)} file(s), e.g. {files[0]}" for fmt, files in found.items())
        raise TraceError(f"{folder}: mixed trace formats in one folder ({detail}); import them separately")
    return next(iter(found.items()))


def detect_format(src: str | os.PathLike[str]) -> str:
    """Name of the trace format of a file or folder; TraceError if unknown or mixed."""
    src = Path(src)
    _check_exists(src)
    if src.is_dir():
        return _folder_format(src)[0]
    fmt = _sniff(src)
    if fmt is None:
        raise TraceError(f"{src}: not a known trace format; known formats: {', '.join(FORMATS)}")
    return fmt


def import_source(src: str | os.PathLike[str], fmt: str | None = None) -> Trace:
    """Import a public trace file or folder; ``fmt`` None means auto-detect.

    A file given with an explicit ``fmt`` is parsed without sniffing, so a damaged file gets
    the parser's precise error rather than "unknown format".
    """
    src = Path(src)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; known formats: {', '.join(FORMATS)}")
    _check_exists(src)
    if src.is_dir():
        detected, files = _folder_format(src)
    else:
        detected, files = fmt or detect_format(src), [src]
    fmt = fmt or detected
    if detected != fmt:
        raise TraceError(f"{src}: holds {detected!r} files, not {fmt!r} (drop --format to auto-detect)")
    return FORMATS[fmt].load(files, src)
