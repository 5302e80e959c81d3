"""SlabLedger invariants (core/slabs.py), checked against a plain reference model.

Random op sequences of begin_load / finish_load / evict / pin / unpin must give exactly the
reference model's answers, and after every op: used bytes equal the bytes of the non-free
slabs and stay within the budget, no slab holds two copies, only READY slabs can be pinned,
a pinned evicted slab is not handed out again before its last unpin, and allocation is
deterministic (the lowest free slab id of the class).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moebits.core.keys import ExpertKey
from moebits.core.slabs import PoolError, Refusal, SlabClass, SlabLedger, SlabState

PRECISIONS = ("bf16", "int4", "int2")  # int2 is never in a plan: UNKNOWN_PRECISION
KEYS = [ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(1, 0)]  # few keys: ops meet often


@dataclass
class Model:
    """The reference semantics of the ledger, slab by slab."""

    classes: list[SlabClass]
    cls_of: list[str] = field(default_factory=list)
    state: list[SlabState] = field(default_factory=list)
    pins: list[int] = field(default_factory=list)
    slot: dict[tuple[ExpertKey, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in self.classes:
            self.cls_of += [c.precision] * c.count
        self.state = [SlabState.FREE] * len(self.cls_of)
        self.pins = [0] * len(self.cls_of)

    def bytes_of(self, slab: int) -> int:
        return next(c.slab_bytes for c in self.classes if c.precision == self.cls_of[slab])

    def begin_load(self, key: ExpertKey, p: str) -> int | Refusal:
        if p not in {c.precision for c in self.classes}:
            return Refusal.UNKNOWN_PRECISION
        if (key, p) in self.slot:
            loading = self.state[self.slot[(key, p)]] == SlabState.LOADING
            return Refusal.IN_FLIGHT if loading else Refusal.ALREADY_PRESENT
        free = [s for s, c in enumerate(self.cls_of) if c == p and self.state[s] == SlabState.FREE]
        if not free:
            return Refusal.NO_FREE_SLAB
        self.state[free[0]] = SlabState.LOADING
        self.slot[(key, p)] = free[0]
        return free[0]

    def finish_load(self, slab: int) -> str | None:
        if self.state[slab] != SlabState.LOADING:
            return "error"
        self.state[slab] = SlabState.READY
        return None

    def evict(self, key: ExpertKey, p: str) -> int | Refusal:
        slab = self.slot.get((key, p))
        if slab is None:
            return Refusal.NOT_PRESENT
        if self.state[slab] == SlabState.LOADING:
            return Refusal.IN_FLIGHT
        del self.slot[(key, p)]
        self.state[slab] = SlabState.DRAINING if self.pins[slab] else SlabState.FREE
        return slab

    def pin(self, slab: int) -> str | None:
        if self.state[slab] != SlabState.READY:
            return "error"
        self.pins[slab] += 1
        return None

    def unpin(self, slab: int) -> str | None:
        if self.pins[slab] == 0:
            return "error"
        self.pins[slab] -= 1
        if self.pins[slab] == 0 and self.state[slab] == SlabState.DRAINING:
            self.state[slab] = SlabState.FREE
        return None


def _apply(ledger: SlabLedger, op: tuple) -> object:
    """Run one op on the ledger; a PoolError reads as "error"."""
    name, *args = op
    try:
        if name in ("begin_load", "evict"):
            return getattr(ledger, name)(KEYS[args[0]], PRECISIONS[args[1]])
        return getattr(ledger, name)(args[0])
    except PoolError:
        return "error"


def _apply_model(model: Model, op: tuple) -> object:
    name, *args = op
    if name in ("begin_load", "evict"):
        return getattr(model, name)(KEYS[args[0]], PRECISIONS[args[1]])
    return getattr(model, name)(args[0])


def _check_invariants(ledger: SlabLedger, model: Model) -> None:
    busy = [s for s, st_ in enumerate(model.state) if st_ != SlabState.FREE]
    assert ledger.used_bytes == sum(model.bytes_of(s) for s in busy)
    assert ledger.used_bytes <= ledger.budget_bytes
    copies = ledger.copies()
    assert copies == sorted((k, p, model.state[s]) for (k, p), s in model.slot.items())
    slabs = [ledger.slab_of(k, p) for k, p, _ in copies]
    assert len(set(slabs)) == len(slabs), "a slab holds two copies"
    for c in model.classes:
        free = sum(1 for s, p in enumerate(model.cls_of) if p == c.precision and model.state[s] == SlabState.FREE)
        assert ledger.free_slabs(c.precision) == free


slab_classes = (
    st.lists(st.tuples(st.integers(1, 50), st.integers(0, 3)), min_size=1, max_size=2)
    .filter(lambda xs: sum(n for _, n in xs) > 0)
    .map(lambda xs: [SlabClass(PRECISIONS[i], b, n) for i, (b, n) in enumerate(xs)])
)


def _ops(n_slabs: int) -> st.SearchStrategy:
    """Ops on copies take (key, precision) indices; ops on slabs take a raw slab id or
    ("busy", i), the i-th non-free slab at that moment (so load, pin, evict, unpin chains
    are common)."""
    copy = st.tuples(st.integers(0, len(KEYS) - 1), st.sampled_from([0, 0, 0, 1, 1, 1, 2]))
    busy = st.integers(0, 7).map(lambda i: ("busy", i))
    slab = st.one_of(busy, busy, st.integers(0, max(0, n_slabs - 1)))
    return st.lists(
        st.one_of(
            copy.map(lambda c: ("begin_load", *c)),
            copy.map(lambda c: ("evict", *c)),
            slab.map(lambda s: ("finish_load", s)),
            slab.map(lambda s: ("pin", s)),
            slab.map(lambda s: ("unpin", s)),
        ),
        min_size=20,
        max_size=60,
    )


def _resolve(op: tuple, model: Model) -> tuple:
    """A slab op on ("busy", i) becomes an op on a non-free slab (slab 0 if none is)."""
    if op[0] in ("begin_load", "evict") or not isinstance(op[1], tuple):
        return op
    busy = [s for s, state in enumerate(model.state) if state != SlabState.FREE]
    return (op[0], busy[op[1][1] % len(busy)] if busy else 0)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), classes=slab_classes, extra_bytes=st.integers(0, 20))
def test_random_ops_match_reference_and_keep_invariants(data, classes, extra_bytes) -> None:
    budget = max(1, sum(c.slab_bytes * c.count for c in classes) + extra_bytes)
    n_slabs = sum(c.count for c in classes)
    ops = data.draw(_ops(n_slabs))
    ledger, model = SlabLedger(classes, budget), Model(classes)
    results = []
    resolved = []
    for op in ops:
        op = _resolve(op, model)
        resolved.append(op)
        got, want = _apply(ledger, op), _apply_model(model, op)
        assert got == want, f"{op}: ledger {got!r}, reference {want!r}"
        if op[0] == "begin_load" and not isinstance(got, Refusal):
            assert model.pins[got] == 0, "handed out a slab that a kernel still reads"
        _check_invariants(ledger, model)
        results.append(got)
    again = SlabLedger(classes, budget)
    assert [_apply(again, op) for op in resolved] == results, "allocation is not deterministic"


def test_pinned_evicted_slab_waits_for_unpin() -> None:
    ledger = SlabLedger([SlabClass("bf16", 10, 1)], 10)
    a, b = ExpertKey(0, 0), ExpertKey(0, 1)
    slab = ledger.begin_load(a, "bf16")
    ledger.finish_load(slab)
    ledger.pin(slab)
    assert ledger.evict(a, "bf16") == slab
    assert ledger.begin_load(b, "bf16") == Refusal.NO_FREE_SLAB
    assert ledger.used_bytes == 10
    with pytest.raises(PoolError, match="only READY"):
        ledger.pin(slab)
    ledger.unpin(slab)
    assert ledger.used_bytes == 0
    assert ledger.begin_load(b, "bf16") == slab


def test_loading_slab_cannot_be_pinned_or_evicted() -> None:
    ledger = SlabLedger([SlabClass("int4", 3, 2)], 6)
    slab = ledger.begin_load(ExpertKey(1, 2), "int4")
    with pytest.raises(PoolError, match="LOADING"):
        ledger.pin(slab)
    assert ledger.evict(ExpertKey(1, 2), "int4") == Refusal.IN_FLIGHT


def test_slab_ids_are_checked() -> None:
    ledger = SlabLedger([SlabClass("int4", 3, 2)], 6)
    ledger.begin_load(ExpertKey(0, 0), "int4")
    ledger.begin_load(ExpertKey(0, 1), "int4")
    for bad in (Refusal.NO_FREE_SLAB, -1, 2):  # a Refusal is an int, and 1 is a real slab id
        with pytest.raises(PoolError, match="not a slab id"):
            ledger.finish_load(bad)
    assert ledger.state(ExpertKey(0, 1), "int4") == SlabState.LOADING


@settings(max_examples=100, deadline=None)
@given(classes=slab_classes, budget=st.integers(1, 300))
def test_plans_over_budget_raise(classes, budget) -> None:
    total = sum(c.slab_bytes * c.count for c in classes)
    if total > budget:
        with pytest.raises(PoolError, match="budget"):
            SlabLedger(classes, budget)
    else:
        ledger = SlabLedger(classes, budget)
        assert ledger.pool_bytes == total and ledger.used_bytes == 0


def test_bad_plans_raise() -> None:
    with pytest.raises(PoolError, match="twice"):
        SlabLedger([SlabClass("bf16", 1, 1), SlabClass("bf16", 1, 1)], 10)
    with pytest.raises(PoolError, match="budget_bytes"):
        SlabLedger([], 0)
    with pytest.raises(PoolError, match="count"):
        SlabClass("bf16", 10, -1)  # would shrink the plan's total below the real pool
    with pytest.raises(PoolError, match="slab_bytes"):
        SlabClass("bf16", 0, 3)
