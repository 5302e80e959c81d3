"""Golden summary of a seeded run: a 4-layer, 16-expert top-2 model, a synthetic trace
(seed 7) at batch 2, a test-only LRU cache of 24 int4 experts, the round-number machine.
A change to any of these numbers is a change in the simulator's behaviour: explain it."""

from __future__ import annotations

import numpy as np
import pytest
from moebits.core.model_spec import ModelSpec
from moebits.drive.records import summarize
from moebits.sim.engine import Engine
from moebits.traces.replay import build_view
from moebits.traces.zipf import synth_trace
from sim_testkit import TinyLru, round_hw

GOLDEN = {
    "activations": {"host": 0, "int4": 408},
    "d2h_bytes": 0,
    "demotions": 72,
    "h2d_bytes": 1302528,
    "h2d_weight_bytes": 1302528,
    "hbm_peak_bytes": 325632,
    "host_wait_s": 0.0,
    "layer_steps": 104,
    "passes": 26,
    "prefetches": 0,
    "promotions": 96,
    "quality_proxy": 0.09948675724155583,
    "refusals": 0,
    "sim_time_s": 0.12970000000041798,
    "stall_s": 0.026500000000000162,
    "tokens_per_s": 361.26442548814276,
    "tpot_ms_mean": 4.152083333345625,
    "tpot_ms_p50": 4.276041666683043,
    "tpot_ms_p99": 5.253229166683049,
    "ttft_ms": 15.025000000061492,
    "ttft_ms_p99": 19.419687500081526,
}


def test_golden_summary() -> None:
    spec = ModelSpec("golden", layers=4, experts=16, top_k=2, hidden=64, expert_intermediate=128, vocab_size=16)
    trace = synth_trace(spec, np.random.default_rng(7), seqs=3, prompt_tokens=5, decode_tokens=12, skew=1.2,
                        reuse=0.4)
    engine = Engine(build_view(trace, 2), spec, round_hw(), TinyLru("int4", slabs=24),
                    24 * spec.expert_bytes("int4") + 1000, seed=7)
    summary = summarize(engine.run())
    assert summary["activations"] == GOLDEN["activations"]
    flat = {k: v for k, v in GOLDEN.items() if k != "activations"}
    assert {k: summary[k] for k in flat} == pytest.approx(flat, rel=1e-12)
