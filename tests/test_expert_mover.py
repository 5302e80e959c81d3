"""Ordering of copies, table writes and slab fences under captured graphs (CPU, scripted streams)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import get_model_spec
from moebits.core.slabs import SlabClass, SlabLedger
from moebits.runtime.expert_mover import ExpertMover, SyncStreams
from moebits.runtime.pool import DevicePool, slab_layout
from moebits.runtime.residency import ResidencyTable, encode
from moebits.runtime.route_observer import RouteObserver, routing_of

E = 4


class Ev:
    def __init__(self, name: str) -> None:
        self.name, self.fired = name, False


class ScriptedStreams:
    """Copies and fences as a log; the test fires events by hand."""

    def __init__(self, log: list) -> None:
        self.log, self.n = log, 0

    def copy(self, dst, src, after):
        self.n += 1
        ev = Ev(f"copy{self.n}")
        self.log.append(("copy", ev.name, None if after is None else after.name))
        return ev

    def fence(self):
        self.n += 1
        ev = Ev(f"fence{self.n}")
        self.log.append(("fence", ev.name))
        return ev

    def done(self, ev):
        return ev is None or ev.fired


class LoggedTable(ResidencyTable):
    def __init__(self, log: list) -> None:
        super().__init__(1, E, "cpu")
        self.log = log

    def flush(self):
        idx = super().flush()
        if idx:
            self.log.append(("flush", sorted(idx)))
        return idx


def setup(log: list, streams):
    spec = dataclasses.replace(get_model_spec("Qwen3-30B-A3B"), layers=1, experts=E, top_k=2, hidden=256,
                               expert_intermediate=128)
    sizes = {p: slab_layout(p, 256, 128).nbytes for p in ("bf16", "int4")}
    ledger = SlabLedger([SlabClass("bf16", sizes["bf16"], 1), SlabClass("int4", sizes["int4"], E)], 1 << 24)
    pool = DevicePool(ledger, spec, "cpu")
    table = LoggedTable(log)
    for e in range(E):
        slab = ledger.begin_load(ExpertKey(0, e), "int4")
        ledger.finish_load(slab)
        table.stage(0, e, *pool.slot(slab))
    table.flush()
    log.clear()
    rows = lambda key, p: torch.full((sizes[p],), key.expert + 1, dtype=torch.uint8)  # noqa: E731
    return pool, table, ExpertMover(pool, table, rows, streams)


def test_table_points_at_a_copy_only_after_it_completed():
    log: list = []
    streams = ScriptedStreams(log)
    pool, table, mover = setup(log, streams)
    assert mover.promote(ExpertKey(0, 1), "bf16") is None
    assert log == []                                   # nothing issued before the boundary
    mover.boundary()
    assert log == [("copy", "copy1", None)]            # issued, table untouched
    assert int(table.codes[0, 1]) == encode("int4", 1)
    mover.boundary()                                   # copy not done yet: still int4
    assert int(table.codes[0, 1]) == encode("int4", 1)
    mover._flying[0].event.fired = True
    assert mover.boundary() == [ExpertKey(0, 1)]
    assert int(table.codes[0, 1]) == encode("bf16", 0) and log[-1] == ("flush", [1])


def test_freed_slab_is_rewritten_only_after_the_fence_of_its_table_write():
    log: list = []
    streams = ScriptedStreams(log)
    pool, table, mover = setup(log, streams)
    mover.promote(ExpertKey(0, 1), "bf16")
    mover.boundary()
    mover._flying[0].event.fired = True
    mover.boundary()
    log.clear()
    # demote expert 1 and promote expert 2 into the same (only) bf16 slab, in one boundary
    assert mover.demote(ExpertKey(0, 1), "bf16") is None
    assert mover.promote(ExpertKey(0, 2), "bf16") is None
    assert int(table.codes[0, 1]) == encode("bf16", 0)  # device table unchanged until the boundary
    mover.boundary()
    assert log == [("flush", [1]), ("fence", "fence2"), ("copy", "copy3", "fence2")]
    assert int(table.codes[0, 1]) == encode("int4", 1) and int(table.codes[0, 2]) == encode("int4", 2)


def test_in_flight_copy_cannot_be_demoted_and_sync_streams_apply_at_next_boundary():
    log: list = []
    pool, table, mover = setup(log, SyncStreams())
    mover.promote(ExpertKey(0, 3), "bf16")
    assert mover.demote(ExpertKey(0, 3), "bf16") is not None       # LOADING: refused
    mover.boundary()                                                # copied at once, applied next time
    assert int(table.codes[0, 3]) == encode("int4", 3)
    mover.boundary()
    assert int(table.codes[0, 3]) == encode("bf16", 0)
    assert bool((pool.slab_bytes(pool.ledger.slab_of(ExpertKey(0, 3), "bf16")) == 4).all())
    assert mover.stats.h2d_bytes == pool.slab_bytes(0).numel()


def test_route_observer_lag():
    obs = RouteObserver(layers=2, rows=1, top_k=2, lag=2, device=torch.device("cpu"))
    for step in range(4):
        ids = torch.full((2, 1, 2), step, dtype=torch.int32)
        ids[:, :, 1] += 10
        obs.record(step, ids, torch.full((2, 1, 2), 0.5), 1)
        seen = [r.step for r in obs.due(step + 1)]           # serving step + 1 sees steps <= step - 1
        assert seen == ([] if step == 0 else [step - 1])
    assert [r.step for r in obs.flush()] == [3]
    with pytest.raises(ValueError):
        RouteObserver(1, 1, 1, lag=0, device=torch.device("cpu"))


def test_routing_of():
    experts, tokens, gate = routing_of(torch.tensor([[3, 1], [1, 2]]), torch.tensor([[0.5, 0.5], [0.25, 0.75]]), 4)
    assert experts.tolist() == [1, 2, 3] and tokens.tolist() == [2, 1, 1]
    assert gate.tolist() == [0.75, 0.75, 0.5]
