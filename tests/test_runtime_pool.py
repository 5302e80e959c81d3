"""The device slab pool, the host store and promotion: layouts, invariants (hypothesis) and the
asynchronous-copy bookkeeping, on CPU (the same code path as on a GPU, run synchronously)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from moebits.core.keys import ExpertKey  # noqa: E402
from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.core.precision import ChannelMix, register_channel_mix  # noqa: E402
from moebits.core.slabs import PoolError, SlabClass, SlabLedger, SlabState  # noqa: E402
from moebits.runtime.host_store import HostStore, random_weights  # noqa: E402
from moebits.runtime.pool import DevicePool, slab_layout  # noqa: E402
from moebits.runtime.promote import Copy, Fences, Promoter  # noqa: E402
from moebits.runtime.quant import quantize_stack  # noqa: E402

SPEC = ModelSpec("pool", layers=2, experts=4, top_k=2, hidden=128, expert_intermediate=128)
PRECS = ("bf16", "fp8", "int8", "int4", "int3", "int2")


@pytest.fixture(scope="module")
def store() -> HostStore:
    return HostStore(SPEC, pin=False).fill_bf16(random_weights(SPEC, seed=1)).require(PRECS)


@pytest.mark.parametrize("precision", PRECS)
def test_layout_bytes_equal_the_registry(precision: str) -> None:
    lay = slab_layout(precision, 2048, 768)
    assert lay.nbytes == ModelSpec("q", 1, 1, 1, 2048, 768).expert_bytes(precision)
    ends = sorted((f.offset, f.offset + f.nbytes) for f in lay.fields)
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:], strict=False))
    assert all(f.offset % f.dtype.itemsize == 0 for f in lay.fields)


@pytest.mark.parametrize("precision", PRECS)
def test_host_rows_round_trip_the_quantized_weights(store: HostStore, precision: str) -> None:
    gu_w, dn_w = random_weights(SPEC, seed=1)(1)
    want_gu = quantize_stack(gu_w.to(torch.bfloat16).float(), precision)
    gu, dn = store.layer_stacks(precision, 1)
    assert torch.equal(gu.dequantize(), want_gu.dequantize())
    assert dn.shape == (SPEC.experts, SPEC.hidden, SPEC.expert_intermediate)


def test_pool_rejects_plans_that_do_not_fit() -> None:
    b = SPEC.expert_bytes("bf16")
    with pytest.raises(PoolError, match="budget"):
        SlabLedger([SlabClass("bf16", b, 3)], 2 * b)
    with pytest.raises(PoolError, match="takes"):
        DevicePool(SlabLedger([SlabClass("bf16", b - 2, 1)], b), SPEC, "cpu")
    mix = ChannelMix("int4", "bf16", 0.25, 0.5)  # a channel mix packs into its planned bytes (runtime.channelmix)
    planned = mix.expert_bytes(SPEC.expert_bytes("int4"), SPEC.expert_bytes("bf16"))
    name = register_channel_mix(mix)
    lay = slab_layout(name, SPEC.hidden, SPEC.expert_intermediate)
    assert planned <= lay.nbytes <= planned + 3
    assert DevicePool(SlabLedger([SlabClass(name, planned, 2)], 4 * planned), SPEC, "cpu").slabs == 2
    with pytest.raises(PoolError, match="takes"):
        DevicePool(SlabLedger([SlabClass(name, planned - 8, 1)], planned), SPEC, "cpu")


plans = st.lists(st.tuples(st.sampled_from(PRECS), st.integers(0, 3)), min_size=1, max_size=4,
                 unique_by=lambda t: t[0])


@settings(max_examples=25, deadline=None)
@given(plan=plans, slack=st.integers(0, 4096), seed=st.integers(0, 2**16),
       staging=st.tuples(st.sampled_from(PRECS), st.integers(0, 3)))
def test_pool_invariants(plan: list[tuple[str, int]], slack: int, seed: int, staging: tuple[str, int]) -> None:
    """Slabs and staging slots (spare slots of their class, bytes on top of the plan's budget) lie inside the
    one buffer, never overlap, keep their contents, and the class stacks see each at its slot."""
    classes = [SlabClass(p, SPEC.expert_bytes(p), n) for p, n in plan]
    budget = sum(c.slab_bytes * c.count for c in classes) + slack + 1
    pool = DevicePool(SlabLedger(classes, budget), SPEC, "cpu", staging=staging)
    S = staging[1]
    assert pool.buffer.numel() <= budget + S * SPEC.expert_bytes(staging[0])     # one buffer, within budget
    views = [pool.slab_bytes(s) for s in range(pool.slabs)] + [pool.staging_bytes(i) for i in range(S)]
    where = [(staging[0], pool.staging_slot(i)) for i in range(S)]
    spans = sorted((v.data_ptr() - pool.buffer.data_ptr(), v.data_ptr() - pool.buffer.data_ptr() + v.numel())
                   for v in views)
    assert all(0 <= a < b <= pool.buffer.numel() for a, b in spans)              # every slot inside the buffer
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:], strict=False))     # views never overlap
    gen = torch.Generator().manual_seed(seed)
    blobs = [torch.randint(0, 256, (v.numel(),), dtype=torch.uint8, generator=gen) for v in views]
    for v, blob in zip(views, blobs, strict=True):
        v.copy_(blob)
    for v, blob in zip(views, blobs, strict=True):                              # contents survive other writes
        assert torch.equal(v, blob)
    for s in range(pool.slabs):
        precision, slot = pool.slot(s)
        own, stacked = pool.slab_stacks(s), pool.stacks[precision]
        for a, b in zip(own, stacked, strict=True):                              # class stacks see the slab
            for name, t in vars(a).items():
                if isinstance(t, torch.Tensor):
                    assert torch.equal(t[0].view(torch.uint8), getattr(b, name)[slot].view(torch.uint8))
    for i, (precision, slot) in enumerate(where):                                # ... and every staging slot
        fields = [t[slot] for stack in pool.stacks[precision] for t in vars(stack).values() if isinstance(t, torch.Tensor)]
        start = pool.staging_bytes(i).data_ptr()
        assert min(f.data_ptr() for f in fields) == start
        assert max(f.data_ptr() + f.numel() * f.element_size() for f in fields) == start + pool.staging_bytes(i).numel()
        assert slot >= pool.region[precision].count                             # after the ledger's slabs


@settings(max_examples=20, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["load", "evict", "pin", "poll"]), st.integers(0, 7),
                              st.sampled_from(["bf16", "int4"])), max_size=40))
def test_ready_slabs_hold_their_expert(store: HostStore, ops: list[tuple[str, int, str]]) -> None:
    """Random loads / evictions / pins: a READY slab always holds exactly its expert's host row."""
    classes = [SlabClass("bf16", SPEC.expert_bytes("bf16"), 2), SlabClass("int4", SPEC.expert_bytes("int4"), 3)]
    ledger = SlabLedger(classes, 10**7)
    pool = DevicePool(ledger, SPEC, "cpu")
    promoter, fences = Promoter(pool, store, ledger), Fences(ledger, pool.device)
    for op, flat, p in ops:
        key = ExpertKey(flat // SPEC.experts, flat % SPEC.experts)
        if op == "load":
            slab = ledger.begin_load(key, p)
            if isinstance(slab, int) and not hasattr(slab, "name"):
                promoter.submit(key, p, slab)
                assert ledger.state(key, p) is SlabState.LOADING                  # READY only at a poll
        elif op == "evict":
            ledger.evict(key, p)
        elif op == "pin" and ledger.is_ready(key, p):
            slab = ledger.slab_of(key, p)
            fences.pin([slab])
            fences.close([slab])
        else:
            promoter.poll()
        for k, prec, state in ledger.copies():
            if state is SlabState.READY:
                assert torch.equal(pool.slab_bytes(ledger.slab_of(k, prec)), store.row(k, prec))
        assert ledger.used_bytes <= pool.nbytes


class FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_copies_turn_ready_in_fifo_order_when_their_events_complete(store: HostStore) -> None:
    ledger = SlabLedger([SlabClass("int4", SPEC.expert_bytes("int4"), 3)], 10**7)
    promoter = Promoter(DevicePool(ledger, SPEC, "cpu"), store, ledger)
    keys = [ExpertKey(0, e) for e in range(3)]
    events = [FakeEvent() for _ in keys]
    for i, (k, ev) in enumerate(zip(keys, events, strict=True)):
        slab = ledger.begin_load(k, "int4")
        promoter.pending.append(Copy(i, slab, k, "int4", 1, ev))                  # type: ignore[arg-type]
        promoter.by_key[(k, "int4")] = promoter.pending[-1]
    events[1].done = True
    assert promoter.poll() == 0 and ledger.is_loading(keys[1], "int4")          # head still in flight
    events[0].done = True
    assert promoter.poll() == 2 and ledger.is_ready(keys[1], "int4")
    assert promoter.wait(promoter.in_flight(keys[2], "int4")) >= 0.0             # type: ignore[arg-type]
    assert ledger.is_ready(keys[2], "int4") and not promoter.pending


def test_a_pinned_slab_drains_until_its_kernels_finish() -> None:
    ledger = SlabLedger([SlabClass("int4", SPEC.expert_bytes("int4"), 1)], 10**7)
    key = ExpertKey(0, 0)
    slab = ledger.begin_load(key, "int4")
    ledger.finish_load(slab)
    fences = Fences(ledger, torch.device("cpu"))
    fences.cuda = True  # fence with a fake event instead of completing at once
    ev = FakeEvent()
    fences.pin([slab])
    fences.open.append((ev, [slab]))                                             # type: ignore[arg-type]
    assert ledger.evict(key, "int4") == slab
    assert ledger.free_slabs("int4") == 0                                        # DRAINING: no new copy may land
    fences.poll()
    assert ledger.free_slabs("int4") == 0
    ev.done = True
    fences.poll()
    assert ledger.free_slabs("int4") == 1 and not fences.open
