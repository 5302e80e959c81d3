"""Structured-config schemas shared by ``moebits sim`` and ``moebits runtime``.

Both apps compose the same config groups under ``conf/``: ``model/`` (:class:`ModelConfig`),
``hardware/`` (:class:`core.hardware.HardwareProfile` itself), ``policy/`` (each registered
policy's config dataclass, stored as ``base_<name>`` so that a YAML preset starts with
``defaults: [base_<name>]``), ``workload/`` (:class:`WorkloadConfig`) and ``budget/``
(:class:`BudgetConfig`). Each app's primary config extends :class:`BaseRunConfig` with its own
fields (``sim.config.RunConfig``, ``runtime.app.RuntimeRunConfig``).

This module imports neither hydra nor omegaconf: :func:`register_schemas` imports hydra when
called, and :data:`MISSING` is OmegaConf's own marker value (the string ``"???"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from moebits.core.hardware import HardwareProfile
from moebits.core.model_spec import PRESET_KEYS, ModelSpec, preset_key
from moebits.core.precision import PRECISIONS, get_precision

MISSING: Any = "???"  # omegaconf.MISSING, without importing omegaconf
GROUPS = ("model", "hardware", "policy", "workload", "budget")


class WorkloadKind(Enum):
    """Where the routing comes from: the embedded default trace, a trace file, or a synthetic
    generator (:mod:`traces.zipf`, replayed by both engines)."""

    DEFAULT = "default"
    FILE = "file"
    SYNTH = "synth"


@dataclass
class WorkloadConfig:
    """What is replayed (or, in the runtime's generation mode, generated), and how.

    ``batch``: sequences decoded together. ``max_seqs``: replay only the first N sequences
    (0: all). ``profile_path``: a profiling trace for offline policies (default: the replayed
    trace itself, flagged ``in-sample`` in the summary). ``seqs`` ... ``reuse``: the
    synthetic generator's knobs (``kind: synth`` only); ``seqs``, ``prompt_tokens`` and
    ``decode_tokens`` also size the runtime's live generation.
    """

    kind: WorkloadKind = WorkloadKind.DEFAULT
    path: str | None = None
    batch: int = 1
    max_seqs: int = 0
    profile_path: str | None = None
    seqs: int = 8
    prompt_tokens: int = 32
    decode_tokens: int = 64
    skew: float = 1.0
    reuse: float = 0.3

    def ignored_settings(self, generates: bool = False) -> list[str]:
        """The fields set away from their defaults that this ``kind`` does not read (a replay
        that would silently run something else than its saved config claims). ``generates``:
        the caller sizes a live generation from ``seqs``/``prompt_tokens``/``decode_tokens``."""
        base = WorkloadConfig()
        synth_knobs = ("skew", "reuse") + (() if generates else ("seqs", "prompt_tokens", "decode_tokens"))
        unread = {WorkloadKind.DEFAULT: ("path", *synth_knobs), WorkloadKind.FILE: synth_knobs,
                  WorkloadKind.SYNTH: ("path",)}[self.kind]
        return [f"workload.{f}={getattr(self, f)}" for f in unread if getattr(self, f) != getattr(base, f)]


@dataclass
class ModelConfig:
    """A :class:`core.model_spec.ModelSpec`, field for field; ``from_trace: true`` takes the
    model from the replayed trace's metadata instead (``model=trace``); ``config`` (a Hugging
    Face ``config.json`` or a local model directory) builds it from that config instead
    (``model=hf model.config=PATH``, :mod:`core.hf_config`)."""

    from_trace: bool = False
    config: str | None = None
    name: str = ""
    layers: int = 0
    experts: int = 0
    top_k: int = 0
    hidden: int = 0
    expert_intermediate: int = 0
    shared_experts: int = 0
    shared_intermediate: int = 0
    attention_params: int = 0
    dense_params: int = 0
    vocab_size: int = 32000

    def to_spec(self) -> ModelSpec | None:
        """The ModelSpec, or None for ``from_trace``."""
        if self.from_trace:
            return None
        if self.config:
            from moebits.core.hf_config import spec_from_hf

            return spec_from_hf(self.config)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSpec)}
        return ModelSpec(**fields)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelConfig:
        return cls(**spec.to_dict())


@dataclass
class BudgetConfig:
    """The expert budget as a share of the model's own expert bytes, resolved per model.

    ``all_at`` null: the budget is ``budget_gb``. Else the budget is ``fraction`` x the bytes
    of every routed expert stored at precision ``all_at`` (``ModelSpec.all_experts_bytes``),
    e.g. ``all_at: int4`` = every expert fits at int4; ``all_at: bf16, fraction: 0.25`` = a
    quarter of the bf16 experts. ``experts`` > 0 (``budget=per_layer budget.experts=N``):
    each MoE layer gets exactly N cache slots at the policy's precision, plus the policy's
    staging slab (caching policies with a cache per layer only). Presets: ``conf/budget/``.
    """

    all_at: str | None = None
    fraction: float = 1.0
    experts: int = 0


@dataclass
class BaseRunConfig:
    """The fields every app's run config has.

    ``budget_gb``: GPU memory for expert weights (1e9 bytes), unless ``budget`` names a
    per-model budget (:class:`BudgetConfig`). ``seed``: the policy's RNG and the workload.
    ``resume``: in a multirun, skip runs whose ``summary.json`` exists. ``quality_table``: a
    per-expert sensitivity table (Parquet/CSV, see core.quality); null builds a synthetic one
    from ``seed``; ``analytic`` gives the quality proxy the analytic default.
    ``observe_lag``: layer steps between a step's routing and the policy seeing it (0: at once;
    d: before step t + d is served, see :mod:`drive.driver`); both engines apply the same rule.
    ``route_lag``: 0 is the per-layer seam; p >= 1 the per-pass seam of a graph-captured runtime
    (pass t's routing reaches the policy at the boundary before pass t + p; copies issued at a
    boundary are servable from the next pass; see :func:`drive.driver.per_pass`). Demand-fetch
    (STALL) policies keep the per-layer seam.
    """

    model: ModelConfig = MISSING
    hardware: HardwareProfile = MISSING
    policy: Any = MISSING
    workload: WorkloadConfig = MISSING
    budget_gb: float = 24.0
    budget: BudgetConfig = dataclasses.field(default_factory=BudgetConfig)
    seed: int = 0
    resume: bool = True
    progress: bool = True
    quality_table: str | None = None
    observe_lag: int = 0
    route_lag: int = 0


preset_stem = preset_key  # the ``conf/model/`` file stem of a ModelSpec preset (see core.model_spec)


def budget_bytes(budget_gb: float, budget: BudgetConfig, spec: ModelSpec,
                 per_layer_bytes: Callable[[int], int] | None = None) -> int:
    """The expert budget in bytes: ``budget_gb``, or ``fraction`` x all experts at ``all_at``,
    or ``per_layer_bytes(budget.experts)`` (the policy's bytes for that many slots per layer)."""
    if budget.experts < 0 or (budget.experts and budget.all_at is not None):
        raise ValueError(f'"budget.experts" must be >= 0 and needs "budget.all_at" null, got {budget.experts} '
                         f"and {budget.all_at!r}")
    if budget.experts:
        if budget.experts > spec.experts:
            raise ValueError(f'"budget.experts"={budget.experts} exceeds the {spec.experts} experts of a layer '
                             f"of {spec.name}")
        if per_layer_bytes is None:
            raise ValueError('"budget.experts" (budget=per_layer) is not supported here')
        return per_layer_bytes(budget.experts)
    if budget.all_at is None:
        out = int(round(budget_gb * 1e9))
        if out <= 0:
            raise ValueError(f'"budget_gb" must be > 0, got {budget_gb:g}')
        return out
    if not budget.fraction > 0:
        raise ValueError(f'"budget.fraction" must be > 0, got {budget.fraction:g}')
    if budget.all_at not in PRECISIONS:
        raise ValueError(f'"budget.all_at" names no precision: {budget.all_at!r}; known: {", ".join(PRECISIONS)}')
    return int(budget.fraction * spec.all_experts_bytes(get_precision(budget.all_at)))


def register_schemas(run_schema: type, policies: Mapping[str, type], schema_name: str = "run_schema") -> None:
    """Store ``run_schema`` and every group's schema in hydra's ConfigStore (idempotent).

    ``policies`` maps policy names to their config types (``policies.base.policy_configs()``;
    core does not import policies)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name=schema_name, node=run_schema)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="hardware", name="base_hardware", node=HardwareProfile)
    cs.store(group="workload", name="base_workload", node=WorkloadConfig)
    cs.store(group="budget", name="base_budget", node=BudgetConfig)
    for name, cfg_type in policies.items():
        cs.store(group="policy", name=f"base_{name}", node=cfg_type)


def one_line(exc: BaseException) -> str:
    """An exception and its causes as one line (first line of each, deduplicated)."""
    parts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None:
        text = str(cur).strip().splitlines()
        if text and text[0].strip() not in parts:
            parts.append(text[0].strip())
        cur = cur.__cause__
    return ": ".join(parts) or type(exc).__name__


def unknown_preset(args: list[str], presets: Mapping[str, list[str]]) -> str | None:
    """An error for a ``group=value`` override naming no preset of ``presets[group]``, else None."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in presets or "(" in value:
            continue
        for v in value.split(","):
            if v.strip() not in presets[key]:
                return f"unknown {key} preset {v.strip()!r}; known: {', '.join(presets[key])}"
    return None


def model_choice_spelling(args: list[str]) -> tuple[list[str], list[str]]:
    """``model=Qwen3-30B-A3B`` (a model's name) rewritten to its preset key ``model=qwen3_30b_a3b``
    (sweeps ``model=a,b`` too); returns the arguments and one hint per rewrite."""
    out, hints = [], []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key.lstrip("+~") != "model" or not sep or "(" in value:
            out.append(arg)
            continue
        names = value.split(",")
        fixed = [preset_key(v) if v not in PRESET_KEYS and preset_key(v) in PRESET_KEYS else v for v in names]
        if fixed != names:
            hints.append(f"note: model presets are named by their conf/model/ file in every command: "
                         f"{key}={','.join(fixed)} (was {value})")
        out.append(f"{key}={','.join(fixed)}")
    return out, hints
