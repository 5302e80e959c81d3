"""Structured-config schemas of ``python -m sim`` and their ConfigStore registration.

Groups under ``conf/``: ``model/`` (:class:`ModelConfig`), ``hardware/``
(:class:`core.hardware.HardwareProfile` itself), ``policy/`` (each registered policy's config
dataclass, stored as ``base_<name>`` so that a YAML preset starts with
``defaults: [base_<name>]``) and ``workload/`` (:class:`WorkloadConfig`). The primary config
is :class:`RunConfig`. ``main()`` turns the composed config into these dataclasses once
(``OmegaConf.to_object``); nothing downstream touches a DictConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING

from core.hardware import HardwareProfile
from core.model_spec import ModelSpec


class WorkloadKind(Enum):
    """Where the routing comes from: the embedded default trace, a trace file, or
    :func:`sim.synth.synth_trace`."""

    DEFAULT = "default"
    FILE = "file"
    SYNTH = "synth"


@dataclass
class WorkloadConfig:
    """What is replayed, and how.

    ``batch``: sequences decoded together. ``max_seqs``: replay only the first N sequences
    (0: all). ``profile_path``: a profiling trace for offline policies (default: the replayed
    trace itself, flagged ``in-sample`` in the summary). ``seqs`` ... ``reuse``: the
    synthetic generator's knobs (``kind: synth`` only).
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


@dataclass
class ModelConfig:
    """A :class:`core.model_spec.ModelSpec`, field for field; ``from_trace: true`` takes the
    model from the replayed trace's metadata instead (``model=trace``)."""

    from_trace: bool = False
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
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSpec)}
        return ModelSpec(**fields)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelConfig:
        return cls(**spec.to_dict())


@dataclass
class RunConfig:
    """One simulation run.

    ``budget_gb``: GPU memory for expert weights (1e9 bytes). ``seed``: the policy's RNG and
    the synthetic workload. ``resume``: in a multirun, skip runs whose ``summary.json``
    exists. ``check``: pin served slabs and assert invariants every step (slower).
    ``quality_table``: a per-expert sensitivity table (Parquet/CSV, see core.quality).
    """

    model: ModelConfig = MISSING
    hardware: HardwareProfile = MISSING
    policy: Any = MISSING
    workload: WorkloadConfig = MISSING
    budget_gb: float = 24.0
    seed: int = 0
    resume: bool = True
    progress: bool = True
    check: bool = False
    figure: bool = True
    quality_table: str | None = None


GROUPS = ("model", "hardware", "policy", "workload")


def preset_stem(model_name: str) -> str:
    """The ``conf/model/`` file stem of a ModelSpec preset: ``Qwen1.5-MoE-A2.7B`` -> ``qwen15_moe_a27b``."""
    return model_name.lower().replace(".", "").replace("-", "_")


def register_configs() -> None:
    """Store the schemas in hydra's ConfigStore (idempotent; call before composing)."""
    from hydra.core.config_store import ConfigStore

    from policies.base import policy_configs

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="hardware", name="base_hardware", node=HardwareProfile)
    cs.store(group="workload", name="base_workload", node=WorkloadConfig)
    for name, cfg_type in policy_configs().items():
        cs.store(group="policy", name=f"base_{name}", node=cfg_type)
