"""``moebits analysis prepare-traces``: the real traces as replayable Parquet files in a cache.

The real traces (``../shared/traces/real/<folder>/``, read-only, no licence) are never copied
into the repository. This step imports each folder with :func:`traces.importers.import_source`
into a cache directory outside the repo, once (a file already there is kept unless
``--force``), and writes what the study needs beside it:

- ``<folder>.parquet``: the whole import, the trace's own ModelSpec;
- ``<folder>.profile.parquet``: a held-out profiling split, the second half of the sequences
  (in id order), for the offline policies (``workload.profile_path``); the study replays only
  sequences of the first half, so the profile never saw the replayed tokens. Not written for
  the Qwen1.5 trace: its sequences are batch positions of one 25-way batch (see its
  provenance), so it is replayed whole at ``workload.batch=25`` and profiled in-sample;
- ``llama4maverick_mmlu_small.parquet`` (+ profile): Llama-4-Maverick's routing (24 MoE
  layers x 128 experts, top-1) on :data:`MAVERICK_SMALL`, a model with Qwen3-30B-A3B-sized
  experts. The real Maverick's routed experts take 121 GB even at int2 (28 GB of non-expert
  weights besides), more than any single GPU of the study, so the real-spec file is kept
  for reference but cannot be replayed there;
- ``default.profile.parquet``: the same split of the embedded default trace.

The cache is ``$MOEBITS_TRACES`` when set, else ``~/.cache/moebits/traces``; the study
(``conf/experiment/trace/*.yaml``) reads the files from the same place.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from moebits.core.model_spec import MODEL_PRESETS, ModelSpec
from moebits.traces.format import Trace, TraceMeta, read_trace, write_trace
from moebits.traces.importers import import_source

ENV_VAR = "MOEBITS_TRACES"
DEFAULT_CACHE = "~/.cache/moebits/traces"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "traces" / "real"
DEFAULT_TRACE = REPO_ROOT / "traces" / "data" / "default.parquet"

_QWEN3 = MODEL_PRESETS["Qwen3-30B-A3B"]
# Maverick's routing shape, Qwen3-30B-A3B's expert and attention shapes; one shared expert of
# the routed size and Maverick's interleaved dense layers (intermediate 2x the expert's) scaled alike.
MAVERICK_SMALL = ModelSpec(
    "Llama-4-Maverick-S", layers=24, experts=128, top_k=1, hidden=_QWEN3.hidden,
    expert_intermediate=_QWEN3.expert_intermediate, shared_experts=1,
    shared_intermediate=_QWEN3.expert_intermediate, attention_params=_QWEN3.attention_params,
    dense_params=24 * (3 * _QWEN3.hidden * 2 * _QWEN3.expert_intermediate + _QWEN3.attention_params),
    vocab_size=202048,
)
NO_PROFILE_SPLIT = {"qwen15moe_vllm-logger"}
SMALL_VARIANTS = {"llama4maverick_mmlu": ("llama4maverick_mmlu_small", MAVERICK_SMALL)}


@dataclass
class Prepared:
    """One file of the cache and whether this call wrote it."""

    path: Path
    written: bool
    note: str = ""


def cache_dir(out: str | os.PathLike[str] | None = None) -> Path:
    """``out``, else ``$MOEBITS_TRACES``, else ``~/.cache/moebits/traces`` (expanded)."""
    return Path(out or os.environ.get(ENV_VAR) or DEFAULT_CACHE).expanduser()


def select_seqs(t: Trace, keep: np.ndarray) -> Trace:
    """The rows of the sequences in ``keep``."""
    rows = np.isin(t.seq, keep)
    return Trace(t.meta, t.seq[rows], t.step[rows], t.phase[rows], t.layer[rows], t.expert[rows],
                 None if t.gate is None else t.gate[rows])


def profile_split(t: Trace) -> Trace:
    """The held-out profiling split: the second half of the sequences, in id order."""
    seqs = np.unique(t.seq)
    if seqs.size < 2:
        raise ValueError(f"{t.spec.name}: a profile split needs at least 2 sequences, the trace has {seqs.size}")
    return select_seqs(t, seqs[(seqs.size + 1) // 2 :])


def with_spec(t: Trace, spec: ModelSpec, note: str) -> Trace:
    """The same routing under another ModelSpec of the same routing shape."""
    old = t.spec
    if (old.layers, old.experts, old.top_k) != (spec.layers, spec.experts, spec.top_k):
        raise ValueError(f"{spec.name}: routing shape differs from {old.name}'s")
    prov = {**t.meta.provenance, "resized": note}
    return dataclasses.replace(t, meta=TraceMeta(spec, prov))


def _write(t: Trace, path: Path, force: bool, note: str = "") -> Prepared:
    if path.exists() and not force:
        return Prepared(path, False, "kept")
    write_trace(t, path)
    return Prepared(path, True, note)


def _derived(t: Trace, stem: str, out: Path, force: bool) -> list[Prepared]:
    done = [_write(t, out / f"{stem}.parquet", force)]
    if stem not in NO_PROFILE_SPLIT:
        done.append(_write(profile_split(t), out / f"{stem}.profile.parquet", force, "profile split"))
    return done


def _wanted(folder: str, out: Path) -> list[Path]:
    stems = [folder, *([SMALL_VARIANTS[folder][0]] if folder in SMALL_VARIANTS else [])]
    files = [out / f"{s}.parquet" for s in stems]
    files += [out / f"{s}.profile.parquet" for s in stems if s not in NO_PROFILE_SPLIT]
    return files


def prepare_folder(src: Path, out: Path, force: bool = False) -> list[Prepared]:
    """Import one real-trace folder and write its files (skipped when all exist)."""
    name = src.name
    wanted = _wanted(name, out)
    if not force and all(p.exists() for p in wanted):
        return [Prepared(p, False, "kept") for p in wanted]
    t = import_source(src)
    done = _derived(t, name, out, force)
    if name in SMALL_VARIANTS:
        stem, spec = SMALL_VARIANTS[name]
        small = with_spec(t, spec, f"routing of {t.spec.name} on {spec.name} (Qwen3-30B-A3B-sized experts), "
                                   "written by moebits analysis prepare-traces")
        done += _derived(small, stem, out, force)
    return done


def real_folders(src: Path) -> list[Path]:
    """The trace folders under ``src`` (those with a SOURCE.md), sorted."""
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder of real traces (pass --src)")
    folders = sorted(p.parent for p in src.glob("*/SOURCE.md"))
    if not folders:
        raise ValueError(f"{src}: holds no trace folders (sub-folders with a SOURCE.md)")
    return folders


def prepare_traces(src: Path = DEFAULT_SRC, out: Path | None = None, force: bool = False,
                   progress: bool = True) -> list[Prepared]:
    """Import every real-trace folder under ``src`` into the cache, plus the default's profile."""
    from tqdm import tqdm

    dest = cache_dir(out)
    dest.mkdir(parents=True, exist_ok=True)
    done: list[Prepared] = []
    for folder in tqdm(real_folders(src), desc="import", unit="trace", disable=not progress):
        done += prepare_folder(folder, dest, force)
    prof = dest / "default.profile.parquet"
    if force or not prof.exists():
        done.append(_write(profile_split(read_trace(DEFAULT_TRACE)), prof, True, "profile split"))
    else:
        done.append(Prepared(prof, False, "kept"))
    return done
