"""The graph-capturable fast decoder against transformers' own Qwen3-MoE on the same weights."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from moebits.core.model_spec import get_model_spec
from moebits.core.slabs import SlabClass, SlabLedger
from moebits.runtime import hf
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights
from moebits.runtime.fused_ops import triton_module
from moebits.runtime.pool import DevicePool, slab_layout
from moebits.runtime.residency import ResidencyTable, load_layer

pytest.importorskip("transformers")


def tiny_spec():
    return dataclasses.replace(get_model_spec("Qwen3-30B-A3B"), layers=2, experts=8, top_k=2, hidden=256,
                               expert_intermediate=128, vocab_size=512)


def build(device: str, use_triton: bool, precision: str = "bf16", seed: int = 0):
    """(HF model with its experts, fast model over a pool holding every expert in ``precision``)."""
    spec = tiny_spec()
    model, weights = hf.build_random_model(spec, device=device, dtype=torch.bfloat16, seed=seed,
                                           full_hidden=2048, std=0.05)
    lay = slab_layout(precision, spec.hidden, spec.expert_intermediate)
    n = spec.layers * spec.experts
    pool = DevicePool(SlabLedger([SlabClass(precision, lay.nbytes, n)], n * lay.nbytes + (1 << 20)), spec, device)
    table = ResidencyTable(spec.layers, spec.experts, device)
    for layer, m in enumerate(hf.experts_modules(model)):
        gu, dn = weights(layer)
        m.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
        m.down_proj = torch.nn.Parameter(dn, requires_grad=False)
        load_layer(pool, table, layer, gu, dn, precision)
    table.flush()
    hf.set_experts_implementation(model, "eager")
    fast = FastModel(FastWeights.from_hf(model), spec, AttnShape.from_hf_config(model.config), pool, table, use_triton,
                     max_seqs=2, max_len=32)
    return model, fast


def run_fast(fast: FastModel, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ``prompt`` tokens in one chunk, then decode the rest one at a time: logits [P+n, V] (last of each)."""
    dev = fast.device
    out = []
    b = fast.buffers(prompt)
    b.set_rows(tokens[:prompt], torch.zeros(prompt, dtype=torch.int32), torch.arange(prompt, dtype=torch.int32))
    fast.step(b)
    out.append(b.logits.float().clone())
    d = fast.buffers(1)
    for p in range(prompt, tokens.numel()):
        d.set_rows(tokens[p : p + 1], torch.zeros(1, dtype=torch.int32), torch.tensor([p], dtype=torch.int32))
        fast.step(d)
        out.append(d.logits.float().clone())
    return torch.cat(out).to(dev)


def _compare(device: str, use_triton: bool) -> None:
    model, fast = build(device, use_triton)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 512, (9,), generator=gen).to(device)
    with torch.no_grad():
        ref = model(input_ids=tokens[None]).logits[0].float()
    got = run_fast(fast, tokens, prompt=5)
    err = (got - ref).norm() / ref.norm()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert err < 0.05 and kl < 1e-3, (float(err), float(kl))


def test_fast_model_matches_transformers_cpu():
    _compare("cpu", use_triton=False)


def test_fast_model_batched_rows_are_independent():
    """Two sequences decoded in one step give each its own single-sequence logits."""
    _, fast = build("cpu", False)
    a, c = torch.tensor([5, 7, 9, 11]), torch.tensor([100, 3, 42, 8])
    la, lc = run_fast(fast, a, 3), run_fast(fast, c, 3)
    b = fast.buffers(2)
    for p in range(4):  # both sequences token by token, batched (seq 0 and seq 1 caches)
        b.set_rows(torch.stack([a[p], c[p]]), torch.tensor([0, 1], dtype=torch.int32),
                   torch.tensor([p, p], dtype=torch.int32))
        fast.step(b)
    torch.testing.assert_close(b.logits.float()[0], la[-1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b.logits.float()[1], lc[-1], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(triton_module("fused_moe") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1")
def test_fast_model_triton_interpreter():
    _compare("cpu", use_triton=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_model_cuda():
    _compare("cuda", use_triton=True)
