"""The profile fields a graph-captured runtime's calibration writes (absent: timing unchanged):
``non_moe_table``, ``fused_moe`` and ``step_overhead_s``, on tiny scenarios with exact times."""

from __future__ import annotations

import numpy as np
import pytest
from moebits.core.hardware import HardwareProfile, NonMoeTable
from moebits.sim.engine import Engine, EngineOptions
from moebits.sim.kernels import KernelModel
from moebits.traces.replay import build_view
from sim_testkit import TINY, TinyStatic, make_trace, round_hw

# one sequence, prompt 1 + 1 decode token, two layers: layer 0 -> expert 0, layer 1 -> expert 1
SEQS = [[[[0], [1]], [[0], [1]]]]


def ends(hw: HardwareProfile, precisions: list[str], fast: bool = True) -> list[float]:
    view = build_view(make_trace(TINY, SEQS), 1)
    eng = Engine(view, TINY, hw, TinyStatic(precisions), 10**6, options=EngineOptions(fast=fast))
    return [round(t * 1e6, 6) for t in eng.run().end_s.tolist()]


@pytest.mark.parametrize("fast", [True, False])
def test_round_profile_is_unchanged(fast: bool) -> None:
    # non-MoE 500 us, launch 100 us, int4 expert 100 us: 700 us per layer step
    assert ends(round_hw(), ["int4"], fast) == [700.0, 1400.0, 2100.0, 2800.0]


@pytest.mark.parametrize("fast", [True, False])
def test_step_overhead_is_charged_once_per_pass(fast: bool) -> None:
    assert ends(round_hw(step_overhead_s=50e-6), ["int4"], fast) == [750.0, 1450.0, 2200.0, 2900.0]


@pytest.mark.parametrize("fast", [True, False])
def test_non_moe_table_replaces_launches_and_roofline(fast: bool) -> None:
    hw = round_hw(non_moe_table=NonMoeTable([1.0, 4.0], [30e-6, 60e-6]))
    assert ends(hw, ["int4"], fast) == [230.0, 460.0, 690.0, 920.0]   # 30 + 100 launch + 100 expert


def test_fused_moe_pays_one_launch_for_every_class() -> None:
    km = KernelModel(round_hw(fused_moe=True), TINY, ["bf16", "int4"])
    per_class = KernelModel(round_hw(), TINY, ["bf16", "int4"])
    two = [km.group_s(0, 1, 1) + km.group_s(1, 1, 1), per_class.group_s(0, 1, 1) + per_class.group_s(1, 1, 1)]
    assert [round(t * 1e6, 6) for t in two] == [300.0, 500.0]            # 200 + 100 vs + 2 launches
    assert km.non_moe_s(np.array([1]))[0] == pytest.approx(600e-6)       # 500 non-MoE + the one launch


def test_graph_fields_round_trip_through_the_yaml_schema() -> None:
    hw = round_hw(non_moe_table=NonMoeTable([1.0], [1e-5], context=64), fused_moe=True, step_overhead_s=1e-4,
                  calibration={"gpu": "x", "runtime": "graph"})
    back = HardwareProfile.from_dict(hw.to_dict())
    assert back == hw
    with pytest.raises(ValueError, match="non-MoE table"):
        HardwareProfile.from_dict({**hw.to_dict(), "non_moe_table": {"tokens": [2.0, 1.0], "seconds": [0, 0]}})
    with pytest.raises(ValueError, match="step_overhead_s"):
        round_hw(step_overhead_s=-1.0)
