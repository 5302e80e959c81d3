"""The fused MoE kernels (one launch for every precision) against a float32 dequantize reference.

Triton runs on CUDA (tests marked ``gpu``) or, where triton is installed, under its CPU
interpreter (``TRITON_INTERPRET=1``, small shapes); the torch reference path always runs.
"""

from __future__ import annotations

import os

import pytest
import torch
from moebits.core.keys import ExpertKey
from moebits.core.precision import ChannelMix, get_channel_mix, get_precision, register_channel_mix
from moebits.core.slabs import SlabClass, SlabLedger
from moebits.runtime import residency
from moebits.runtime.channelmix import quantize_mix, stack_tensors
from moebits.runtime.fused_ops import MoeOps, triton_module
from moebits.runtime.pool import DevicePool, slab_layout
from moebits.runtime.residency import (
    DESC_FIELDS,
    MIX_CLASS,
    PoolDescriptor,
    ResidencyTable,
    serve_reference,
    write_expert,
)

PRECISIONS = ("bf16", "fp8", "int8", "int4", "int3", "int2")
HID, INTER, EXPERTS, TOPK = 256, 128, 12, 4
# channel mixes (DynaMo): dynamo's default, a bf16-high one with more kept rows per tile, an fp8-high one (row scales)
MIXES = [register_channel_mix(ChannelMix(lo, hi, fraction=f, significance_share=0.5))
         for lo, hi, f in (("int2", "int8", 0.1), ("int3", "bf16", 0.3), ("int4", "fp8", 0.2))]


def _pool(device: str, per_class: int, precisions: tuple[str, ...] = PRECISIONS) -> DevicePool:
    lays = {p: slab_layout(p, HID, INTER) for p in precisions}
    classes = [SlabClass(p, lays[p].nbytes, per_class) for p in precisions]
    ledger = SlabLedger(classes, sum(c.slab_bytes * c.count for c in classes) + 1 << 20)
    return DevicePool(ledger, _spec(), device)


def _spec():
    import dataclasses

    from moebits.core.model_spec import get_model_spec

    return dataclasses.replace(get_model_spec("Qwen3-30B-A3B"), layers=1, experts=EXPERTS, hidden=HID,
                               expert_intermediate=INTER)


def _mixed(device: str, gen: torch.Generator, precisions: list[str]) -> tuple[DevicePool, ResidencyTable]:
    """Every expert in ``precisions[e]``, random weights, table filled."""
    pool = _pool(device, EXPERTS, tuple(dict.fromkeys([*PRECISIONS, *precisions])))
    table = ResidencyTable(1, EXPERTS, device)
    for e, p in enumerate(precisions):
        slab = pool.ledger.begin_load(ExpertKey(0, e), p)
        pool.ledger.finish_load(slab)
        gu = torch.randn(2 * INTER, HID, generator=gen) * 0.05
        dn = torch.randn(HID, INTER, generator=gen) * 0.05
        write_expert(pool, slab, gu.to(device), dn.to(device))
        table.stage(0, e, *pool.slot(slab))
    table.flush()
    return pool, table


def _inputs(t: int, device: str, gen: torch.Generator):
    x = torch.randn(t, HID, generator=gen).to(device, torch.bfloat16)
    logits = torch.randn(t, EXPERTS, generator=gen).to(device)
    return x, logits


def _run(ops: MoeOps, x, logits, table, zero_out: bool):
    t = x.shape[0]
    ids = torch.empty(t, TOPK, dtype=torch.int32, device=x.device)
    w = torch.empty(t, TOPK, dtype=torch.float32, device=x.device)
    ops.route(logits, ids, w, normalize=True)
    out = torch.full((t, HID), float("nan") if zero_out else 1.0, device=x.device)
    h = torch.full((t * TOPK, INTER), float("nan"), device=x.device)
    ops.experts(x, ids, w, table.codes[0], out, h, zero_out)
    return ids, w, out


def _check(device: str, use_triton: bool, t: int, seed: int, cfg=None, tol: float = 2e-3, mix: str | None = None,
           only_mix: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    classes = PRECISIONS if mix is None else (mix,) if only_mix else (*PRECISIONS, mix, mix)   # a mix: 1/4 of experts
    precisions = [classes[(e + seed) % len(classes)] for e in range(EXPERTS)]
    pool, table = _mixed(device, gen, precisions)
    x, logits = _inputs(t, device, gen)
    ops = MoeOps(pool, use_triton, cfg)
    for zero_out in (True, False):
        ids, w, out = _run(ops, x, logits, table, zero_out)
        ref_ids, ref_w = residency.route_reference(logits, TOPK, True)
        assert torch.equal(ids.cpu(), ref_ids.cpu())
        torch.testing.assert_close(w.cpu(), ref_w.cpu(), rtol=1e-5, atol=1e-6)
        ref = serve_reference(x, ref_ids, ref_w, table.codes[0], pool).cpu() + (0.0 if zero_out else 1.0)
        err = (out.cpu() - ref).norm() / ref.norm()
        assert torch.isfinite(out).all() and err < tol, (zero_out, float(err))


def test_reference_path_matches_float64_loop():
    """The torch path (CPU) equals a per-expert float64 loop over the dequantized slabs."""
    _check("cpu", use_triton=False, t=3, seed=1)
    gen = torch.Generator().manual_seed(5)
    pool, table = _mixed("cpu", gen, ["int4"] * EXPERTS)
    x, logits = _inputs(2, "cpu", gen)
    ids, w = residency.route_reference(logits, TOPK, True)
    got = serve_reference(x, ids, w, table.codes[0], pool)
    out = torch.zeros(2, HID, dtype=torch.float64)
    for ti in range(2):
        for j in range(TOPK):
            gu, dn = (m.double() for m in residency.expert_weights(pool, "int4", int(table.host[0, ids[ti, j]]) >> 3))
            a = gu @ x[ti].double()
            out[ti] += w[ti, j].double() * (dn @ (torch.nn.functional.silu(a[:INTER]) * a[INTER:]))
    torch.testing.assert_close(got.double(), out, rtol=1e-4, atol=1e-5)


def _bytes_at(pool: DevicePool, off: int, t: torch.Tensor) -> torch.Tensor:
    return pool.buffer[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)


@pytest.mark.parametrize("mix", MIXES)
def test_mix_slabs_hold_the_channel_mix_and_the_descriptor_finds_its_fields(mix):
    """A channel-mix slab written by ``write_expert`` holds the mix quantized directly (kept rows as
    :func:`quantize_mix` picks them for the high format's row bytes), and the pool descriptor's mix row
    (class MIX_CLASS) points at its low copy, its high rows and their row ids, 16-byte aligned."""
    gen = torch.Generator().manual_seed(3)
    pool, _ = _mixed("cpu", gen, [mix] * EXPERTS)
    pd = PoolDescriptor.of(pool)
    cm = get_channel_mix(mix)
    assert pd.mix == mix and min(pd.kept) > 0 and all(k % 8 == 0 for k in pd.kept)
    desc, r = pd.desc[MIX_CLASS].tolist(), pool.region[mix]
    assert all(v % 16 == 0 for v in desc)
    w = {"gate_up": torch.randn(2 * INTER, HID, generator=gen) * 0.05, "down": torch.randn(HID, INTER, generator=gen) * 0.05}
    slab = pool.ledger.slab_of(ExpertKey(0, 5), mix)
    write_expert(pool, slab, w["gate_up"], w["down"])
    slot = pool.slot(slab)[1]
    for proj, stack in zip(("gate_up", "down"), pool.stacks[mix], strict=True):
        ref = quantize_mix(w[proj][None], cm, get_precision(cm.high).matrix_bytes(1, w[proj].shape[1]))
        torch.testing.assert_close(stack.dequantize(torch.tensor([slot]))[0], ref.dequantize()[0])
        base = r.base + slot * r.stride
        got = {k: v[slot] for k, v in stack_tensors(stack).items()}
        assert torch.equal(_bytes_at(pool, base + desc[DESC_FIELDS.index(f"{proj}.rows")], got["rows"]), ref.rows[0])
        hw = got.get("high.qweight", got.get("high.weight"))
        assert torch.equal(_bytes_at(pool, base + desc[DESC_FIELDS.index(f"{proj}.hw")], hw).view(torch.uint8),
                           hw.view(torch.uint8))
        lw = got.get("low.qweight", got.get("low.weight"))
        assert torch.equal(_bytes_at(pool, base + desc[DESC_FIELDS.index(f"{proj}.w")], lw).view(torch.uint8),
                           lw.view(torch.uint8))


@pytest.mark.parametrize("mix", MIXES)
def test_reference_path_serves_a_mix_pool(mix):
    """The torch path with channel-mix experts beside every plain class (what the Triton tests compare with)."""
    _check("cpu", use_triton=False, t=3, seed=2, mix=mix)


def test_table_codes_roundtrip():
    for p in PRECISIONS:
        assert residency.decode(residency.encode(p, 37)) == (p, 37)
    t = ResidencyTable(2, 3, "cpu")
    t.stage(1, 2, "int3", 5)
    assert t.pending() == 1 and int(t.codes[1, 2]) == -1   # nothing lands before the flush
    assert t.flush() == [5]
    assert t.where(1, 2) == ("int3", 5) and int(t.codes[1, 2]) == residency.encode("int3", 5)
    with pytest.raises(KeyError):
        t.where(0, 0)


@pytest.mark.skipif(triton_module("fused_moe") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("flat", [True, False])
def test_triton_interpreter_all_classes_one_launch(t, flat):
    from moebits.runtime.fused_moe import MoeKernelConfig

    _check("cpu", use_triton=True, t=t, seed=t, cfg=MoeKernelConfig(flat=flat))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 5, 33])
def test_triton_cuda_all_classes(t):
    from moebits.runtime.fused_moe import MoeKernelConfig

    for seed in range(3):
        _check("cuda", use_triton=True, t=t, seed=seed + 10 * t)
    _check("cuda", use_triton=True, t=t, seed=99, cfg=MoeKernelConfig(flat=False))
    _check("cuda", use_triton=True, t=t, seed=98, cfg=MoeKernelConfig(grouped_from_pairs=1), tol=5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("t", [1, 5, 33])
def test_triton_cuda_channel_mix_class(t, mix):
    """A pool's channel mix served by the fused kernels (decode GEMV, both integer variants, grouped tiles)."""
    from moebits.runtime.fused_moe import MoeKernelConfig

    _check("cuda", use_triton=True, t=t, seed=t, mix=mix)
    _check("cuda", use_triton=True, t=t, seed=t + 1, mix=mix, only_mix=True)
    if mix == MIXES[0]:   # dynamo's mix: the per-group GEMV too (each variant is one more compile of both kernels)
        _check("cuda", use_triton=True, t=t, seed=t + 2, cfg=MoeKernelConfig(flat=False), mix=mix)
    _check("cuda", use_triton=True, t=t, seed=t + 3, cfg=MoeKernelConfig(grouped_from_pairs=1), tol=5e-3, mix=mix)
    _check("cuda", use_triton=True, t=t, seed=t + 4, cfg=MoeKernelConfig(grouped_from_pairs=1), tol=5e-3, mix=mix,
           only_mix=True)


@pytest.mark.skipif(triton_module("fused_moe") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("mix", MIXES)
def test_triton_interpreter_channel_mix_class(mix):
    from moebits.runtime.fused_moe import MoeKernelConfig

    _check("cpu", use_triton=True, t=2, seed=4, mix=mix, only_mix=True)
    _check("cpu", use_triton=True, t=5, seed=5, cfg=MoeKernelConfig(grouped_from_pairs=1), tol=5e-3, mix=mix)


@pytest.mark.skipif(triton_module("fused_moe") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1")
def test_triton_interpreter_grouped_all_classes():
    from moebits.runtime.fused_moe import MoeKernelConfig

    _check("cpu", use_triton=True, t=5, seed=7, cfg=MoeKernelConfig(grouped_from_pairs=1), tol=5e-3)
