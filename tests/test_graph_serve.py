"""The policy driver: routing observed with the configured lag, actions through the mover (CPU, eager)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from moebits.core.model_spec import get_model_spec
from moebits.core.slabs import SlabLedger
from moebits.policies.base import PolicyContext, build_policy
from moebits.policies.dynaexq import DynaExqConfig
from moebits.runtime import hf
from moebits.runtime.expert_mover import ExpertMover, SyncStreams
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights
from moebits.runtime.graph_serve import GraphMode, PolicyDriver, StepRunner, initial_loads
from moebits.runtime.host_store import HostStore
from moebits.runtime.pool import DevicePool
from moebits.runtime.residency import ResidencyTable
from moebits.runtime.route_observer import RouteObserver

pytest.importorskip("transformers")


def setup(lag: int):
    spec = dataclasses.replace(get_model_spec("Qwen3-30B-A3B"), layers=2, experts=8, top_k=2, hidden=256,
                               expert_intermediate=128, vocab_size=256)
    model, weights = hf.build_random_model(spec, dtype=torch.bfloat16, full_hidden=2048, std=0.05)
    policy = build_policy(DynaExqConfig(warm_start=False, min_residency=0, hysteresis=1.0))
    budget = spec.all_experts_bytes("int4") + 2 * spec.layers * spec.expert_bytes("bf16")
    policy.prepare(PolicyContext(spec, budget, np.random.default_rng(0),
                                 {p: spec.expert_bytes(p) for p in ("bf16", "int4")}))
    pool = DevicePool(SlabLedger(policy.slab_plan(), budget + (1 << 20)), spec, "cpu")
    table = ResidencyTable(spec.layers, spec.experts, "cpu")
    fast = FastModel(FastWeights.from_hf(model), spec, AttnShape.from_hf_config(model.config), pool, table,
                     use_triton=False, max_seqs=1, max_len=16)
    initial_loads(fast, policy.initial_loads(), weights)
    store = HostStore(spec, pin=False, quant_device="cpu").fill_bf16(weights)
    mover = ExpertMover(pool, table, store.row, SyncStreams())
    return fast, policy, PolicyDriver(policy, mover, RouteObserver(spec.layers, 1, spec.top_k, lag, torch.device("cpu")))


@pytest.mark.parametrize("lag", [1, 2])
def test_policy_sees_step_t_before_step_t_plus_lag(lag):
    fast, policy, drv = setup(lag)
    seen: list[tuple[int, int, list[int]]] = []
    serving = [0]
    inner = policy.on_layer_step

    def spy(obs, res):
        seen.append((serving[0], obs.layer, obs.experts.tolist()))
        return inner(obs, res)

    policy.on_layer_step = spy  # type: ignore[method-assign]
    buf = fast.buffers(1)
    runner = StepRunner(fast, buf, GraphMode.EAGER)
    routed = []
    for t in range(6):
        serving[0] = t
        drv.before_step(t)
        buf.set_rows(torch.tensor([t * 7 % 256]), torch.zeros(1, dtype=torch.int32), torch.tensor([t], dtype=torch.int32))
        runner.run()
        drv.after_step(t, buf, 1)
        routed.append([sorted(set(buf.ids[layer, 0].tolist())) for layer in range(2)])
    want = [(s, layer, routed[s - lag][layer]) for s in range(lag, 6) for layer in range(2)]
    assert seen == want
    assert drv.mover.stats.promotions > 0                      # the policy acted through the mover
    ready = [k for k, p, st in fast.moe.pool.ledger.copies() if p == "bf16"]
    for key in ready:                                          # and the table serves what became READY
        if fast.moe.pool.ledger.is_ready(key, "bf16"):
            assert fast.table.where(key.layer, key.expert)[0] == "bf16"


def test_per_layer_pieces_compute_the_whole_step():
    """The pieces the LAYER mode captures, run in order, give the eager step's logits."""
    fast, _, _ = setup(1)
    buf = fast.buffers(1)
    buf.set_rows(torch.tensor([3]), torch.zeros(1, dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    StepRunner(fast, buf, GraphMode.EAGER).run()
    want = buf.logits.clone()
    runner = StepRunner(fast, buf, GraphMode.EAGER)
    runner.mode = GraphMode.LAYER
    pieces = runner._pieces()
    assert len(pieces) == fast.spec.layers + 1
    buf.logits.zero_()
    for p in pieces:
        p()
    torch.testing.assert_close(buf.logits, want)
