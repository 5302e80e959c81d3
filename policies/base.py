"""The policy seam: what an engine tells a policy, and what a policy may answer.

An engine (the SimPy simulator or the torch runtime) calls a policy at fixed points with
plain data and carries out the plain decisions it returns:

1. ``prepare(ctx)`` once, with the model, the budget, a seeded ``numpy.random.Generator``
   and, where the policy asks for them, a profiling trace or the replay's own future.
2. ``slab_plan()``: how many slabs of which precision the expert budget is carved into, and
   ``staging()``: the staging slab (if any) through which the engine streams needed experts
   that have no copy (bypass: copied, used by the step, dropped); its bytes are part of the budget.
3. ``initial_loads()``: copies placed before serving starts (untimed, like loading weights).
4. ``on_layer_step(obs, res)`` at every layer step, once the router has run: the routing of
   this step (:class:`LayerObs`) and the residency view (the engine's
   :class:`core.slabs.SlabLedger`, read-only). It returns :class:`Action` s: promote and
   prefetch load a copy into a free slab over PCIe, demote drops a copy.
5. ``on_refused(action, reason)`` for each action the mechanism could not carry out.

A needed expert is served from its best READY copy; when that is not the copy the step wants,
the policy's :class:`MissRule` says what happens. Policies keep no clock (time arrives in
``obs.now_s``), no global RNG and do no I/O; they import neither simpy nor torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, ClassVar, NamedTuple

import numpy as np
from moebits.core.hardware import HardwareProfile
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.quality import SensitivityTable
from moebits.core.routing import LayerSteps
from moebits.core.slabs import Refusal, SlabClass, SlabLedger


class MissRule(Enum):
    """What an engine does when a needed expert has no READY copy at the wanted precision.

    SERVE_LOWER: serve the best READY copy at once (any precision); stall only if none exists.
    STALL: wait for the copy in flight (the highest precision loading), then serve it.
    HOST: compute experts with no READY copy on the host, without waiting for the link.
    """

    SERVE_LOWER = "serve_lower"
    STALL = "stall"
    HOST = "host"


class ActionKind(IntEnum):
    """Promote: load a copy needed now or soon. Prefetch: load ahead of predicted need.
    Demote: drop a copy (its slab frees once no kernel reads it)."""

    PROMOTE = 0
    PREFETCH = 1
    DEMOTE = 2


class Action(NamedTuple):
    """One decision about one expert copy.

    A NamedTuple (immutable, hashable, compared by value): it costs about half a frozen
    dataclass to build, and policies that thrash build one or two per miss."""

    kind: ActionKind
    key: ExpertKey
    precision: str


_PROMOTE, _PREFETCH, _DEMOTE = ActionKind.PROMOTE, ActionKind.PREFETCH, ActionKind.DEMOTE


def promote(layer: int, expert: int, precision: str) -> Action:
    return Action(_PROMOTE, ExpertKey(layer, expert), precision)


def prefetch(layer: int, expert: int, precision: str) -> Action:
    return Action(_PREFETCH, ExpertKey(layer, expert), precision)


def demote(layer: int, expert: int, precision: str) -> Action:
    return Action(_DEMOTE, ExpertKey(layer, expert), precision)


@dataclass(slots=True)
class LayerObs:
    """The routing of one layer step, as the router produced it (read-only by contract).

    ``experts`` are the distinct experts needed (ascending), ``tokens`` the tokens routed to
    each and ``gate`` their summed gate weight, all numpy arrays of equal length. ``index`` is
    the layer step's position in the replay (0, 1, ...), ``now_s`` the engine's clock.
    Not frozen: an engine builds one per layer step, and a frozen dataclass costs six times
    as much to build; policies must not assign to it.
    """

    index: int
    layer: int
    phase: int
    pass_index: int
    experts: np.ndarray
    tokens: np.ndarray
    gate: np.ndarray
    now_s: float


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know before serving starts.

    ``profile`` is a profiling trace's routing (offline policies learn from it); ``future`` is
    the replay's own routing, given only to policies whose ``needs_future`` is true (the
    oracle, as an upper bound). ``precision_bytes`` maps each precision to one expert's bytes.
    ``sensitivity`` is the per-expert sensitivity table the run's policy reads, if any
    (policies that rank experts by measured error, router norms or variance read it).
    ``hardware`` is the machine's cost model (:class:`core.hardware.HardwareProfile`), for
    policies that weigh kernel time (:func:`core.hardware.expert_time_s`); None where the
    engine has none.
    """

    spec: ModelSpec
    budget_bytes: int
    rng: np.random.Generator
    precision_bytes: dict[str, int]
    profile: LayerSteps | None = None
    future: LayerSteps | None = None
    sensitivity: SensitivityTable | None = None
    hardware: HardwareProfile | None = None


class Policy:
    """Base class of all controllers; subclasses override the hooks they need."""

    needs_future: ClassVar[bool] = False
    needs_profile: ClassVar[bool] = False
    miss_rule: MissRule = MissRule.STALL
    #: the miss rules this policy may be configured with (``miss_rule`` of its config); the
    #: parity test runs each through both engines
    supported_miss_rules: ClassVar[tuple[MissRule, ...]] = tuple(MissRule)

    def prepare(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def slab_plan(self) -> list[SlabClass]:
        raise NotImplementedError

    def staging(self) -> SlabClass | None:
        """The staging slab (``count`` expert slots of ``precision``) for bypassed experts, or None.

        A needed expert with no copy and none in flight is then streamed through it by the
        engine instead of being an error (caching policies that admit only some misses)."""
        return None

    def per_layer_budget_bytes(self, spec: ModelSpec, experts: int) -> int:
        """The budget that gives each layer ``experts`` cache slots (``budget.experts``)."""
        raise ValueError(f"{type(self).__name__} keeps no per-layer cache: budget.experts needs lru_offload, "
                         "lfu_offload or oracle with scope LAYER")

    def initial_loads(self) -> list[Action]:
        return []

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        return ()

    def on_refused(self, action: Action, reason: Refusal) -> None:
        """Called for each action the engine could not carry out. Default: ignore."""

    @property
    def is_static(self) -> bool:
        """True when ``on_layer_step`` never acts (lets engines skip the call)."""
        return False

    # helpers for subclasses
    def slabs_that_fit(self, precision: str, budget_bytes: int | None = None) -> int:
        """How many experts of ``precision`` fit in ``budget_bytes`` (default: the whole budget)."""
        budget = self.ctx.budget_bytes if budget_bytes is None else budget_bytes
        return max(0, budget // self.ctx.precision_bytes[precision])


class PolicyConfig:
    """Marker base of policy config dataclasses; ``name`` is the preset name in conf/policy/."""

    name: ClassVar[str] = ""


_REGISTRY: dict[type, type[Policy]] = {}
_BY_NAME: dict[str, type] = {}


def register_policy(config_type: type) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: ``@register_policy(LruConfig)`` makes ``build_policy(LruConfig())`` work."""

    def wrap(cls: type[Policy]) -> type[Policy]:
        if config_type in _REGISTRY:
            raise ValueError(f"policy config {config_type.__name__} is already registered to {_REGISTRY[config_type].__name__}")
        name = getattr(config_type, "name", "")
        if not name or name in _BY_NAME:
            raise ValueError(f"policy config {config_type.__name__} needs a unique 'name', got {name!r}")
        _REGISTRY[config_type] = cls
        _BY_NAME[name] = config_type
        return cls

    return wrap


def discover() -> None:
    """Import every module of the ``policies`` package so their decorators register them.

    Adding a policy is one file with one decorator; nothing else lists it."""
    package = importlib.import_module("moebits.policies")
    for info in pkgutil.iter_modules(package.__path__, "moebits.policies."):
        importlib.import_module(info.name)


def build_policy(cfg: Any) -> Policy:
    """The policy for a config object, looked up by the config's type."""
    discover()
    try:
        cls = _REGISTRY[type(cfg)]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise ValueError(f"no policy registered for config type {type(cfg).__name__}; known policies: {known}") from None
    return cls(cfg)  # type: ignore[call-arg]


def policy_configs() -> dict[str, type]:
    """Registered policy names → config types (for hydra's ConfigStore and --help)."""
    discover()
    return dict(_BY_NAME)
