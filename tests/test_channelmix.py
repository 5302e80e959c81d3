"""DynaMo's channel-mix copies in the runtime (:mod:`runtime.channelmix`) against references
built apart from it: plain dequantization of the low copy with the kept rows replaced by the
high copy's, the packed host/slab bytes, and a whole MoE layer against a float64 loop."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from moebits.core.keys import ExpertKey  # noqa: E402
from moebits.core.model_spec import ModelSpec  # noqa: E402
from moebits.core.precision import ChannelMix, get_precision, register_channel_mix  # noqa: E402
from moebits.runtime.channelmix import MixStack, kept_rows, quantize_mix  # noqa: E402
from moebits.runtime.host_store import HostStore  # noqa: E402
from moebits.runtime.moe_layer import ExpertHandle, ExpertPool, MixedPrecisionMoE, reference_moe  # noqa: E402
from moebits.runtime.quant import quantize_stack  # noqa: E402

E, H, I = 4, 128, 128
MIX = ChannelMix("int2", "int8", fraction=0.25, significance_share=0.5)
NAME = register_channel_mix(MIX)


def weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gu = 0.05 * torch.randn(E, 2 * I, H, generator=g)
    gu[:, :7] *= 8  # a few outlier channels: the ones a mix should keep at high precision
    return gu, 0.05 * torch.randn(E, H, I, generator=g)


def high_row_bytes(k: int) -> int:
    return get_precision("int8").matrix_bytes(1, k)  # one output channel: codes, scales and zeros


def test_dequantize_is_low_with_the_kept_rows_at_high() -> None:
    gu, _ = weights(0)
    mix = quantize_mix(gu, MIX, high_row_bytes(H))
    low = quantize_stack(gu, "int2").dequantize()                          # reference, built apart
    err = (low - gu).square().sum(-1)                                      # [E, N]
    n = kept_rows(MIX, 2 * I, high_row_bytes(H))
    want_rows = torch.topk(err, n, dim=1).indices.sort(dim=1).values
    assert n > 0 and torch.equal(mix.rows.long(), want_rows)
    ref = low.clone()
    for e in range(E):
        ref[e, want_rows[e]] = quantize_stack(gu[e, want_rows[e]][None], "int8").dequantize()[0]
    assert torch.equal(mix.dequantize(), ref)
    assert set(range(7)) <= set(mix.rows[0].tolist())  # the outlier channels are kept
    assert (mix.dequantize() - gu).norm() < 0.7 * (low - gu).norm()


def test_packed_copy_round_trips_and_fits_the_planned_bytes() -> None:
    spec = ModelSpec("mix", layers=1, experts=E, top_k=2, hidden=H, expert_intermediate=I, vocab_size=16)
    gu, dn = weights(1)
    store = HostStore(spec, pin=False).fill_bf16(lambda layer: (gu, dn)).require([NAME])
    planned = MIX.expert_bytes(spec.expert_bytes("int2"), spec.expert_bytes("int8"))
    assert planned <= store.layouts[NAME].nbytes <= planned + 3
    g_stack, d_stack = store.layer_stacks(NAME, 0)
    assert isinstance(g_stack, MixStack) and isinstance(d_stack, MixStack)
    bf_gu = gu.bfloat16().float()  # the store quantizes from its bf16 copy
    direct = quantize_mix(bf_gu, MIX, high_row_bytes(H))
    assert torch.equal(g_stack.dequantize(), direct.dequantize())
    assert store.row(ExpertKey(0, 1), NAME).numel() == store.layouts[NAME].nbytes


@pytest.mark.parametrize("tokens", [1, 5])
def test_mixed_layer_with_a_channel_mix_pool_matches_a_float64_loop(tokens: int) -> None:
    torch.set_num_threads(1)
    gu, dn = weights(2)
    pools = {NAME: ExpertPool(quantize_mix(gu, MIX, high_row_bytes(H)), quantize_mix(dn, MIX, high_row_bytes(I))),
             "bf16": ExpertPool(quantize_stack(gu, "bf16"), quantize_stack(dn, "bf16"))}
    handles = [ExpertHandle(NAME if e % 2 else "bf16", e) for e in range(E)]
    layer = MixedPrecisionMoE(pools, handles)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.rand(tokens, E, generator=g).topk(2, dim=1).indices
    w = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    gq = torch.stack([(pools[h.precision].gate_up.dequantize(torch.tensor([h.slot]), torch.float64))[0] for h in handles])
    dq = torch.stack([(pools[h.precision].down.dequantize(torch.tensor([h.slot]), torch.float64))[0] for h in handles])
    ref = reference_moe(x.double(), ids, w.double(), gq, dq)
    assert float((layer(x, ids, w).double() - ref).norm() / ref.norm()) < 1e-5
