"""The driver: consults the policy at the seam's points and hands its actions to a mechanism.

An engine owns a :class:`Mechanism` (the simulator's timed slab pool, the runtime's device
pool and copy stream) and one :class:`Driver`. The driver

1. places the policy's ``initial_loads()`` (untimed, uncounted) through the mechanism;
2. at every layer step, once the router has run, gives the policy a
   :class:`policies.base.LayerObs` (skipped for static policies) and hands the actions it
   returns, in order, to :meth:`Mechanism.apply`: the mechanism carries each out or refuses it
   with a :class:`core.slabs.Refusal`, which the driver counts and reports back through
   ``policy.on_refused``;
3. checks every action names an expert of the model (:class:`drive.context.PolicyError`).

Observation lag (``observe_lag`` = d layer steps, part of the seam's contract): a fast engine
learns a step's routing through an asynchronous device-to-host copy, so the policy sees layer
step t's routing only before step t + d is served (``obs.index`` = t, ``obs.now_s`` = the clock
at step t + d), and its actions take effect from then on. d = 0 is the synchronous seam. The
routing of the last d steps of a run is never delivered. Both engines go through
:meth:`Driver.observe`, so the lag is the same rule in the simulator and the runtime.

Which lag applies is the seam's rule too (:func:`applied_lag`): a demand-fetch policy
(``MissRule.STALL``) fetches what the step it serves needs, so an engine stops before each
layer's experts to read that layer's routing (the graph runtime splits its step per layer and
syncs there): such a policy always observes with lag 0, whatever ``observe_lag`` says. Policies
whose miss rule serves without waiting for the host (SERVE_LOWER, HOST) observe with the lag.

What a step is then served from is the miss rule's (:mod:`drive.missrule`), read from the
mechanism's residency; when a copy is ready the mechanism says (:meth:`Mechanism.ready_time`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.slabs import Refusal, SlabLedger
from moebits.drive.context import PolicyError, policy_name
from moebits.drive.missrule import Masks
from moebits.policies.base import Action, ActionKind, LayerObs, MissRule, Policy

COUNTS = ("promotions", "prefetches", "demotions", "refusals", "bypasses")  # bypasses: counted by the engines

Refused = Callable[[Action, Refusal], None]
Accepted = Callable[[Action, float, float], None]
Watcher = Callable[[Action, Refusal, float], None]


class Mechanism(Protocol):
    """What an engine's mechanism offers the driver and the miss rule.

    ``precisions``: its pool's precisions, highest first (bit ``p`` of a residency mask).
    ``ready[layer][expert]`` / ``loading[layer][expert]``: bitmasks of READY / LOADING copies.
    """

    precisions: list[str]

    @property
    def ready(self) -> Sequence[Masks]: ...

    @property
    def loading(self) -> Sequence[Masks]: ...

    def place(self, key: ExpertKey, precision: str) -> int | Refusal:
        """An untimed initial load: the copy is READY at once and moves no counted bytes."""
        ...

    def evict(self, key: ExpertKey, precision: str) -> int | Refusal:
        """Drop a READY copy at once (untimed)."""
        ...

    def apply(self, actions: Sequence[Action], now_s: float, counts: dict[str, int], refused: Refused,
              bad_key: Callable[[ExpertKey], None], accepted: Accepted | None = None) -> None:
        """Carry out ``actions`` in order at ``now_s`` (DEMOTE drops a READY copy, PROMOTE and
        PREFETCH reserve a slab and start the copy); count accepted ones in ``counts``, send each
        refusal to ``refused`` at once and a key outside the model to ``bad_key``;
        ``accepted(action, now_s, ready_s)`` if given."""
        ...

    def ready_time(self, layer: int, expert: int, p: int) -> float:
        """When the LOADING copy of (layer, expert) at precision index ``p`` is READY (a time,
        or any key that orders copies by completion)."""
        ...


def applied_lag(policy: Policy, observe_lag: int) -> int:
    """The observation lag ``policy`` runs under when the engine's setting is ``observe_lag``:
    0 for demand fetch (``MissRule.STALL``: the engine syncs per layer to serve the step it
    observes), else ``observe_lag``; see the module docstring."""
    if observe_lag < 0:
        raise ValueError(f'"observe_lag" must be >= 0 layer steps, got {observe_lag}')
    return 0 if policy.miss_rule is MissRule.STALL else observe_lag


STATIC_READ_LAG = 8   # passes: a static policy's routing is read for the records only, late enough never to wait


def read_lag(static: bool, route_lag: int) -> int:
    """Passes after which the per-pass seam reads a pass's routing back: ``route_lag``, or for a static
    policy (whose routing feeds the records only) at least :data:`STATIC_READ_LAG`."""
    return max(route_lag, STATIC_READ_LAG) if static else route_lag


def per_pass(policy: Policy, route_lag: int) -> bool:
    """Whether ``policy`` runs on the per-pass seam at ``route_lag`` passes (the graph-captured
    runtime's whole-step graphs): ``route_lag`` >= 1 and a miss rule that never waits for a copy.

    The per-pass seam, the same rule in every engine: a pass is served whole from the residency
    decided at the boundary before it. At the boundary before pass n the policy observes every
    layer step of the passes up to n - ``route_lag`` not yet observed, in order (with
    ``observe_lag`` layer steps on top, :meth:`Driver.observe`); then every copy issued at an
    earlier boundary completes (the host waits for it when it has not landed) and the new copies
    are issued. A copy issued at boundary n is servable from pass n + 1, whatever its timing, so
    decisions do not depend on when copies land; only time does."""
    if route_lag < 0:
        raise ValueError(f'"route_lag" must be >= 0 passes, got {route_lag}')
    return route_lag > 0 and policy.miss_rule is not MissRule.STALL


class Driver:
    """One policy over one mechanism; see the module docstring."""

    def __init__(self, policy: Policy, ledger: SlabLedger, spec: ModelSpec, observe_lag: int = 0) -> None:
        self.policy, self.ledger, self.spec = policy, ledger, spec
        self.lag = applied_lag(policy, observe_lag)  # 0 for demand fetch
        self._waiting: deque[LayerObs] = deque()
        self.name = policy_name(policy)
        self.counts = dict.fromkeys(COUNTS, 0)
        self.static = policy.is_static
        self._on_step = policy.on_layer_step
        self.mech: Mechanism | None = None
        self._watch: tuple[Watcher, Accepted] | None = None
        self._direct: Callable[..., None] | None = None  # mech.apply when nothing watches (the hot path)
        self._refused, self._check_key = self.refused, self.check_key  # bound once

    def watch(self, refused: Watcher, accepted: Accepted) -> None:
        """Also report each refusal (``refused(action, reason, now_s)``, before it is counted)
        and each accepted action (``accepted(action, now_s, ready_s)``): an engine's event log."""
        self._watch = (refused, accepted)
        self._direct = None

    def attach(self, mech: Mechanism) -> None:
        """Carry out actions through ``mech`` from now on; places the initial loads."""
        self.mech = mech
        self._direct = mech.apply if self._watch is None else None
        for a in self.policy.initial_loads():
            self.check_key(a.key)
            r = mech.evict(a.key, a.precision) if a.kind is ActionKind.DEMOTE else mech.place(a.key, a.precision)
            if isinstance(r, Refusal):
                self.refused(a, r)

    def observe(self, obs: LayerObs) -> None:
        """A layer step's routing is known: give it to the policy (with the lag: the routing of
        ``lag`` steps ago, stamped now) and carry out its actions at ``obs.now_s``."""
        if self.lag:
            self._waiting.append(obs)
            if len(self._waiting) <= self.lag:
                return
            now_s, obs = obs.now_s, self._waiting.popleft()
            obs.now_s = now_s
        actions = self._on_step(obs, self.ledger)
        if actions:
            if self._direct is not None:  # as apply(), one call less
                self._direct(actions, obs.now_s, self.counts, self._refused, self._check_key)
            else:
                self.apply(actions, obs.now_s)

    def apply(self, actions: Sequence[Action], now_s: float) -> None:
        """Hand ``actions`` to the mechanism; refusals come back to :meth:`refused`."""
        mech = self.mech
        assert mech is not None, "attach a mechanism first"
        if self._watch is None:
            mech.apply(actions, now_s, self.counts, self._refused, self._check_key)
            return
        watch_refused, accepted = self._watch

        def refused(a: Action, reason: Refusal) -> None:
            watch_refused(a, reason, now_s)
            self.refused(a, reason)

        mech.apply(actions, now_s, self.counts, refused, self.check_key, accepted)

    def refused(self, a: Action, reason: Refusal) -> None:
        """Count a refusal and tell the policy."""
        self.counts["refusals"] += 1
        self.policy.on_refused(a, reason)

    def check_key(self, key: ExpertKey) -> None:
        spec = self.spec
        if not (0 <= key[0] < spec.layers and 0 <= key[1] < spec.experts):
            raise PolicyError(f"policy {self.name} named expert {key}, outside {spec.name}'s "
                              f"{spec.layers} layers x {spec.experts} experts")
