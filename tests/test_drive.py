"""The driver on its own: a scripted policy over a fake mechanism (no engine, no clock)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.slabs import Refusal, SlabClass, SlabLedger
from moebits.drive.context import PolicyError
from moebits.drive.driver import Driver, applied_lag
from moebits.policies.base import Action, LayerObs, MissRule, Policy, promote

SPEC = ModelSpec("drive", layers=2, experts=4, top_k=1, hidden=128, expert_intermediate=128, vocab_size=16)


class Seen(Policy):
    """Records (step index, now) of every observation; promotes expert 1 of layer 0 when it sees step 1."""

    miss_rule = MissRule.SERVE_LOWER

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []
        self.refused: list[tuple[Action, Refusal]] = []

    def on_layer_step(self, obs: LayerObs, res: SlabLedger) -> Sequence[Action]:
        self.seen.append((obs.index, obs.now_s))
        return [promote(0, 1, "bf16")] if obs.index == 1 else ()

    def on_refused(self, action: Action, reason: Refusal) -> None:
        self.refused.append((action, reason))


class Refuses:
    """A mechanism that refuses every action (and records when it was asked)."""

    precisions = ["bf16"]
    ready = [[0] * 4, [0] * 4]
    loading = [[0] * 4, [0] * 4]

    def __init__(self) -> None:
        self.asked: list[float] = []

    def place(self, key: ExpertKey, precision: str) -> int | Refusal:
        return Refusal.NO_FREE_SLAB

    def evict(self, key: ExpertKey, precision: str) -> int | Refusal:
        return Refusal.NOT_PRESENT

    def apply(self, actions: Sequence[Action], now_s: float, counts: dict[str, int],
              refused: Callable[[Action, Refusal], None], bad_key: Callable[[ExpertKey], None],
              accepted: object = None) -> None:
        for a in actions:
            bad_key(a.key)
            self.asked.append(now_s)
            refused(a, Refusal.NO_FREE_SLAB)

    def ready_time(self, layer: int, expert: int, p: int) -> float:
        return 0.0


def obs(i: int) -> LayerObs:
    e = np.array([i % 4])
    return LayerObs(i, i % 2, 1, 1, e, np.array([1]), np.array([1.0]), float(i) * 10)


def driver(lag: int) -> tuple[Driver, Seen, Refuses]:
    policy, mech = Seen(), Refuses()
    d = Driver(policy, SlabLedger([SlabClass("bf16", 100, 1)], 100), SPEC, observe_lag=lag)
    d.attach(mech)  # type: ignore[arg-type]
    return d, policy, mech


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_lag_delivers_step_t_before_step_t_plus_d(lag: int) -> None:
    d, policy, mech = driver(lag)
    for i in range(5):
        d.observe(obs(i))
    # step t's routing arrives when step t + lag is known, stamped with that step's clock
    assert policy.seen == [(t, (t + lag) * 10.0) for t in range(5 - lag)]
    # its action is carried out then, refused, counted and reported back
    assert mech.asked == [(1 + lag) * 10.0] and d.counts["refusals"] == 1
    assert policy.refused == [(promote(0, 1, "bf16"), Refusal.NO_FREE_SLAB)]


def test_bad_settings_and_bad_keys_are_one_clear_error() -> None:
    with pytest.raises(ValueError, match='"observe_lag" must be >= 0'):
        Driver(Seen(), SlabLedger([], 100), SPEC, observe_lag=-1)
    d, _, _ = driver(0)
    with pytest.raises(PolicyError, match=r"outside drive's 2 layers x 4 experts"):
        d.apply([promote(0, 9, "bf16")], 0.0)


@pytest.mark.parametrize("rule", list(MissRule))
def test_demand_fetch_observes_without_lag(rule: MissRule) -> None:
    """The seam's lag rule: STALL (demand fetch, the engine syncs per layer) sees every step
    before it is served, whatever observe_lag says; the other miss rules see it ``lag`` late."""
    policy = Seen()
    policy.miss_rule = rule
    d = Driver(policy, SlabLedger([SlabClass("bf16", 100, 1)], 100), SPEC, observe_lag=2)
    assert d.lag == applied_lag(policy, 2) == (0 if rule is MissRule.STALL else 2)
    d.attach(Refuses())  # type: ignore[arg-type]
    for i in range(4):
        d.observe(obs(i))
    assert [t for t, _ in policy.seen] == list(range(4 - d.lag))
