"""Workloads for both engines: the replay view of the embedded default trace, a trace file, or
a synthetic one (:mod:`traces.zipf`), cut to ``workload.max_seqs`` sequences.

Also the model check: a trace carries its ModelSpec, and a run whose ``model=`` disagrees
with it stops before simulating, naming the fields that differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from moebits.core.config import WorkloadConfig, WorkloadKind, preset_stem
from moebits.core.model_spec import MODEL_PRESETS, ModelSpec
from moebits.traces.format import Trace, read_trace
from moebits.traces.replay import ReplayView, build_view, load_view
from moebits.traces.zipf import synth_trace

from moebits import traces


class WorkloadError(ValueError):
    """The workload cannot be loaded or does not fit the configured model."""


@dataclass
class Workload:
    """A replay view and what it came from."""

    view: ReplayView
    spec: ModelSpec
    source: str


def default_trace_path() -> Path:
    """The embedded default workload (a Qwen3-30B-A3B-shaped synthetic trace)."""
    return Path(traces.__file__).resolve().parent / "data" / "default.parquet"


def first_seqs(t: Trace, n: int) -> Trace:
    """The rows of the first ``n`` sequences (in id order) of ``t``."""
    keep = np.unique(t.seq)[:n]
    rows = np.isin(t.seq, keep)
    return Trace(t.meta, t.seq[rows], t.step[rows], t.phase[rows], t.layer[rows], t.expert[rows],
                 None if t.gate is None else t.gate[rows])


def first_layers(t: Trace, layers: int) -> Trace:
    """The rows of the first ``layers`` MoE layers of ``t`` (its model cut to as many layers)."""
    if layers >= t.spec.layers:
        return t
    rows = t.layer < layers
    meta = dataclasses.replace(t.meta, spec=dataclasses.replace(t.spec, layers=layers))
    return Trace(meta, t.seq[rows], t.step[rows], t.phase[rows], t.layer[rows], t.expert[rows],
                 None if t.gate is None else t.gate[rows])


def _view_of_file(path: Path, cfg: WorkloadConfig, layers: int | None) -> tuple[ReplayView, ModelSpec]:
    """The view of a trace file (cut as asked) and the trace's own model."""
    if cfg.max_seqs > 0 or layers is not None:
        trace = read_trace(path)
        trace = first_seqs(trace, cfg.max_seqs) if cfg.max_seqs > 0 else trace
        return build_view(first_layers(trace, layers or trace.spec.layers), cfg.batch), trace.spec
    view = load_view(path, cfg.batch)
    assert view.meta is not None
    return view, view.meta.spec


def check_model(trace_spec: ModelSpec, spec: ModelSpec, where: str) -> None:
    """Raise WorkloadError when the trace's model differs from the configured one."""
    if trace_spec == spec:
        return
    diff = [f"{f.name} {getattr(trace_spec, f.name)} vs {getattr(spec, f.name)}"
            for f in dataclasses.fields(ModelSpec) if getattr(trace_spec, f.name) != getattr(spec, f.name)]
    match = [n for n, s in MODEL_PRESETS.items() if s == trace_spec]
    hint = f"pass model={preset_stem(match[0])}" if match else "pass model=trace to take the trace's own model"
    raise WorkloadError(f"{where} is a trace of {trace_spec.name} but model= is {spec.name} ({'; '.join(diff)}); {hint}")


def check_settings_used(cfg: WorkloadConfig) -> None:
    """Refuse settings that this workload kind would silently ignore (the saved config would
    lie); for a replay that reads the workload only (the simulator), not a live generation."""
    ignored = cfg.ignored_settings()
    if not ignored:
        return
    wants_file = any(s.startswith("workload.path=") for s in ignored)
    hint = "add workload=file to replay that file" if wants_file else "add workload=synth to generate a synthetic workload"
    raise WorkloadError(f"{', '.join(ignored)} has no effect with workload={cfg.kind.value} (nothing reads it); {hint}")


def load_workload(cfg: WorkloadConfig, spec: ModelSpec | None, seed: int, layers: int | None = None) -> Workload:
    """The replay view for ``cfg``; ``spec`` None takes the model from the trace. ``layers``
    keeps only the first MoE layers (a scaled-down runtime model); ``Workload.spec`` stays the
    full model's."""
    if cfg.batch < 1:
        raise WorkloadError(f'"workload.batch" must be >= 1, got {cfg.batch}')
    if cfg.kind is WorkloadKind.SYNTH:
        if spec is None:
            raise WorkloadError("workload=synth needs a model preset (model=trace has no trace to read)")
        trace = synth_trace(spec, np.random.default_rng(seed), seqs=cfg.seqs, prompt_tokens=cfg.prompt_tokens,
                            decode_tokens=cfg.decode_tokens, skew=cfg.skew, reuse=cfg.reuse)
        if cfg.max_seqs > 0:
            trace = first_seqs(trace, cfg.max_seqs)
        if layers is not None:
            trace = first_layers(trace, layers)
        return Workload(build_view(trace, cfg.batch), spec, f"synth(seed={seed})")
    if cfg.kind is WorkloadKind.DEFAULT:
        path = default_trace_path()
        if not path.exists():
            raise WorkloadError(f"the embedded default workload {path} is missing; "
                                "use workload=synth or workload=file workload.path=TRACE.parquet")
    else:
        if not cfg.path:
            raise WorkloadError("workload=file needs workload.path=TRACE.parquet")
        path = Path(cfg.path).expanduser()
    view, trace_spec = _view_of_file(path, cfg, layers)
    if spec is not None:
        check_model(trace_spec, spec, str(path))
    return Workload(view, trace_spec, str(path))


def load_profile(path: str, spec: ModelSpec) -> ReplayView:
    """A profiling trace's routing (batch 1), checked against the model."""
    view = load_view(Path(path).expanduser(), 1)
    assert view.meta is not None
    check_model(view.meta.spec, spec, path)
    return view
