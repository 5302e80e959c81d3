"""The primary config schema of ``moebits sim`` and its ConfigStore registration.

The group schemas (``model/``, ``hardware/``, ``policy/``, ``workload/``, ``budget/``) live in
:mod:`core.config`, shared with ``moebits runtime``, and are re-exported here. The primary
config is :class:`RunConfig`. ``main()`` turns the composed config into these dataclasses once
(``OmegaConf.to_object``); nothing downstream touches a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebits.core.config import (  # noqa: F401  (re-exported: the schemas live in core, shared with runtime)
    GROUPS,
    MISSING,
    BaseRunConfig,
    BudgetConfig,
    ModelConfig,
    WorkloadConfig,
    WorkloadKind,
    preset_stem,
    register_schemas,
)


@dataclass
class RunConfig(BaseRunConfig):
    """One simulation run: :class:`core.config.BaseRunConfig` plus the simulator's own switches.

    ``budget_gb``: GPU memory for expert weights (1e9 bytes), unless ``budget`` names a
    per-model budget (:class:`BudgetConfig`). ``seed``: the policy's RNG and
    the synthetic workload. ``resume``: in a multirun, skip runs whose ``summary.json``
    exists. ``check``: pin served slabs and assert invariants every step (slower).
    ``figure``: write ``figure.pdf`` and ``figure.png``.
    ``quality_table``: a per-expert sensitivity table (Parquet/CSV, see core.quality); null
    builds a synthetic one from ``seed`` (``policies._tables.synthetic_table``) that both the
    policy and the quality proxy read; ``analytic`` gives the proxy the analytic default.
    """

    check: bool = False
    figure: bool = True


def register_configs() -> None:
    """Store the schemas in hydra's ConfigStore (idempotent; call before composing)."""
    from moebits.policies.base import policy_configs

    register_schemas(RunConfig, policy_configs())
