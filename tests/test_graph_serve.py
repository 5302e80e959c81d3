"""The graph path's policy seam per pass: routing observed with the configured lag, actions through the
driver and the mover, records from the table each pass read (CPU, eager); per-layer pieces."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from moebits.core.model_spec import get_model_spec
from moebits.drive.records import summarize
from moebits.policies.base import build_policy
from moebits.policies.dynaexq import DynaExqConfig
from moebits.runtime import hf
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights
from moebits.runtime.graph_engine import GraphEngine, PassInput
from moebits.runtime.graph_serve import GraphMode, StepRunner
from moebits.runtime.host_store import HostStore
from moebits.runtime.residency import decode

pytest.importorskip("transformers")


SPEC = dataclasses.replace(get_model_spec("Qwen3-30B-A3B"), layers=2, experts=8, top_k=2, hidden=256,
                           expert_intermediate=128, vocab_size=256)


def setup(lag: int, seen: list | None = None, serving: list | None = None) -> GraphEngine:
    """dynaexq on the graph path, observing per pass (the WHOLE-graph seam, run eagerly on the CPU);
    ``seen`` collects (serving pass, layer, experts) of every observation."""
    model, weights = hf.build_random_model(SPEC, dtype=torch.bfloat16, full_hidden=2048, std=0.05)
    policy = build_policy(DynaExqConfig(warm_start=False, min_residency=0, hysteresis=1.0))
    if seen is not None and serving is not None:
        inner = policy.on_layer_step

        def spy(obs, res):
            seen.append((serving[0], obs.layer, obs.experts.tolist()))
            return inner(obs, res)

        policy.on_layer_step = spy  # type: ignore[method-assign]
    budget = SPEC.all_experts_bytes("int4") + 2 * SPEC.layers * SPEC.expert_bytes("bf16")
    store = HostStore(SPEC, pin=False, quant_device="cpu").fill_bf16(weights).require(["int4"])
    fw, shape = FastWeights.from_hf(model), AttnShape.from_hf_config(model.config)

    def make(pool, table):
        return FastModel(fw, SPEC, shape, pool, table, use_triton=False, max_seqs=1, max_len=16)

    return GraphEngine(SPEC, policy, budget, make, weights, store.row, route_lag=lag, per_pass=True, served=True)


def one_row(t: int) -> PassInput:
    return PassInput(0, 1 + t, torch.tensor([t * 7 % 256]), torch.zeros(1, dtype=torch.int32),
                     torch.tensor([t], dtype=torch.int32))


@pytest.mark.parametrize("lag", [1, 2])
def test_policy_sees_pass_t_before_pass_t_plus_lag(lag):
    seen: list[tuple[int, int, list[int]]] = []
    serving = [0]
    eng = setup(lag, seen, serving)
    routed, codes = [], []
    for t in range(6):
        serving[0] = t
        eng.run_pass(one_row(t))
        codes.append(eng.table.host.copy())                   # per pass, the table changes only at boundaries
        buf = eng.runner(1).buf
        routed.append([sorted(set(buf.ids[layer, 0].tolist())) for layer in range(2)])
    want = [(s, layer, routed[s - lag][layer]) for s in range(lag, 6) for layer in range(2)]
    assert seen == want
    assert eng.counts["promotions"] > 0                       # the policy acted through the driver and the mover
    result = eng.finish()
    assert result.layer_steps == 12 and len(result.served) == 12   # records of every pass, the last ones at finish
    for i, row in enumerate(result.served):                   # served = the table the pass read
        t, layer = divmod(i, 2)
        for e, _, p in row:
            assert decode(int(codes[t][layer, e]))[0] == p
    summary = summarize(result)
    assert summary["promotions"] == eng.counts["promotions"] and summary["observe"] == "per-pass"
    ledger = eng.ledger
    for key, p, _ in ledger.copies():                          # and the table serves what became READY
        if p == "bf16" and ledger.is_ready(key, "bf16"):
            assert eng.table.where(key.layer, key.expert)[0] == "bf16"


def test_per_layer_pieces_compute_the_whole_step():
    """The pieces the LAYER mode captures, run in order, give the eager step's logits."""
    fast = setup(1).model
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
