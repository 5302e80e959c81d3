"""Grouped mixed-precision expert compute: the routing plan and each class's grouped launch.

CPU tests run everywhere; the ``gpu`` ones need CUDA and Triton and check the fused kernels
against float64 references on fresh random inputs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from moebits.runtime.grouped import (  # noqa: E402
    ClassLayout,
    _grouped_linear,
    build_plan,
    build_plan_torch,
    fp8_grouped_supported,
    plan_rows,
    run_class,
    triton_kernels,
)
from moebits.runtime.moe_layer import reference_moe  # noqa: E402
from moebits.runtime.quant import quantize_stack  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not CUDA or triton_kernels() is None, reason="needs CUDA and triton")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _routing(seed: int, tokens: int, experts: int, k: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=g).topk(k, dim=1).indices
    w = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    return ids.to(device), w.to(device)


def _layout_and_groups(slots: tuple[int, ...], experts: int, seed: int, device="cpu"):
    """A layout and a random one-to-one expert -> group map over its slots."""
    layout = ClassLayout(tuple(f"c{i}" for i in range(len(slots))), slots)
    g = torch.Generator().manual_seed(seed)
    groups = torch.randperm(layout.groups, generator=g)[:experts].to(torch.int32)
    bases = torch.tensor(layout.bases, dtype=torch.int32)
    return layout, groups.to(device), bases.to(device)


@pytest.mark.parametrize(("tokens", "block_m"), [(1, 16), (7, 16), (40, 16), (13, 1), (64, 4)])
def test_plan_invariants(tokens: int, block_m: int) -> None:
    experts, k = 12, 4
    layout, groups, bases = _layout_and_groups((5, 4, 6), experts, tokens)
    ids, _ = _routing(tokens, tokens, experts, k)
    plan = build_plan_torch(ids, groups, bases, layout, block_m)
    s = tokens * k
    assert plan.rows == plan_rows(s, layout.groups, block_m) and plan.rows % block_m == 0
    real = plan.pair_pad[plan.pair_pad < s]
    assert sorted(real.tolist()) == list(range(s))                      # every pair exactly once
    pair_group = groups[ids.reshape(-1)].long()
    for b, grp in enumerate(plan.block_group.tolist()):
        rows = plan.pair_pad[b * block_m : (b + 1) * block_m]
        rows = rows[rows < s].long()
        if grp < 0:
            assert rows.numel() == 0
        else:
            assert torch.all(pair_group[rows] == grp)                 # a block holds one group
    counts = torch.bincount(pair_group, minlength=layout.groups)
    padded = (counts + block_m - 1) // block_m * block_m
    assert torch.equal(plan.group_pad_end.long(), padded.cumsum(0))
    class_rows = [int(padded[a:b].sum()) for a, b in zip(layout.bases, layout.bases[1:], strict=False)]
    assert torch.equal(torch.diff(plan.class_block).long() * block_m, torch.tensor(class_rows))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_matches_loop(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(20, 32, generator=g, dtype=dtype), torch.randn(4, 24, 32, generator=g, dtype=dtype)
    offs = torch.tensor([5, 5, 12, 17], dtype=torch.int32)
    out = _grouped_linear(a, w, offs)
    ref = torch.cat([a[0:5] @ w[0].T, a[5:12] @ w[2].T, a[12:17] @ w[3].T])
    torch.testing.assert_close(out[:17], ref, rtol=1e-5, atol=1e-5)


def _one_class_problem(precision: str, tokens: int, seed: int, device="cpu", experts=6, hidden=256, inter=128):
    """Weights for ``experts`` experts in one class (slot = expert), routing, float64 reference."""
    g = torch.Generator().manual_seed(seed)
    gu = (0.05 * torch.randn(experts, 2 * inter, hidden, generator=g)).to(device)
    dn = (0.05 * torch.randn(experts, hidden, inter, generator=g)).to(device)
    stacks = quantize_stack(gu, precision), quantize_stack(dn, precision)
    x = torch.randn(tokens, hidden, generator=g).to(device)
    ids, w = _routing(seed, tokens, experts, 3, device)
    ref = reference_moe(x.double(), ids, w.double(), stacks[0].dequantize(dtype=torch.float64),
                        stacks[1].dequantize(dtype=torch.float64))
    return stacks, x, ids, w, ref


def _run_one_class(stacks, x, ids, w, block_m: int, use_triton: bool) -> torch.Tensor:
    experts = stacks[0].shape[0]
    layout = ClassLayout(("only",), (experts,))
    groups = torch.arange(experts, dtype=torch.int32, device=x.device)
    bases = torch.tensor(layout.bases, dtype=torch.int32, device=x.device)
    plan = build_plan(ids, groups, bases, layout, block_m, use_triton)
    t, k = ids.shape
    w_ext = torch.cat([w.reshape(-1).float(), w.new_zeros(1, dtype=torch.float32)])
    # poisoned where every row is overwritten; zero where Triton's split-K adds into it
    y_pair = torch.full((t * k + 1, x.shape[1]), 0.0 if use_triton else float("nan"), device=x.device)
    h_buf = torch.full((plan.rows, stacks[1].shape[2]), float("nan"), dtype=x.dtype, device=x.device)
    run_class(x, plan, layout, 0, stacks[0], stacks[1], w_ext, y_pair, h_buf, use_triton)
    assert not torch.isnan(y_pair[: t * k]).any(), "a pair row was never written"
    return y_pair[: t * k].view(t, k, -1).sum(1)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("precision", ["bf16", "fp8", "int8", "int4", "int3", "int2"])
def test_cpu_class_path_matches_reference(precision: str) -> None:
    stacks, x, ids, w, ref = _one_class_problem(precision, tokens=9, seed=1)
    assert _rel(_run_one_class(stacks, x, ids, w, block_m=1, use_triton=False), ref) < 1e-5


# ----------------------------------------------------------------------------- GPU
@gpu
@needs_triton
@pytest.mark.parametrize("tokens", [1, 16, 128])
def test_triton_plan_matches_torch_plan(tokens: int) -> None:
    experts, k = 64, 8
    layout, groups, bases = _layout_and_groups((40, 30, 20), experts, tokens, "cuda")
    ids, _ = _routing(tokens, tokens, experts, k, "cuda")
    ref = build_plan_torch(ids, groups, bases, layout, 16)
    out = build_plan(ids, groups, bases, layout, 16, use_triton=True)
    for name in ("block_group", "group_pad_end", "class_block"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    # pairs inside one group may come in any order (atomics): compare each group's rows as sets
    ends = ref.group_pad_end.tolist()
    for start, end in zip([0, *ends], ends, strict=False):
        assert torch.equal(out.pair_pad[start:end].sort().values, ref.pair_pad[start:end].sort().values)
    assert torch.all(out.pair_pad[ends[-1]:] == tokens * k)


@gpu
@needs_triton
@pytest.mark.parametrize("precision", ["int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_triton_int_class_matches_reference(precision: str, tokens: int) -> None:
    # H=1024, I=512: split-K runs for 1 token (3 pairs < 8), not for 5 or 64 tokens
    stacks, x, ids, w, ref = _one_class_problem(precision, tokens, seed=tokens, device="cuda",
                                                hidden=1024, inter=512)
    out = _run_one_class(stacks, x.to(torch.bfloat16), ids, w, block_m=16, use_triton=True)
    assert _rel(out, ref) < 1e-2  # bf16 activations


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 40])
def test_dense_grouped_mm_class_matches_reference(tokens: int) -> None:
    stacks, x, ids, w, ref = _one_class_problem("bf16", tokens, seed=3, device="cuda")
    out = _run_one_class(stacks, x.to(torch.bfloat16), ids, w, block_m=16, use_triton=False)
    assert _rel(out, ref) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 40])
def test_fp8_scaled_grouped_mm_class_matches_reference(tokens: int) -> None:
    if not fp8_grouped_supported(torch.device("cuda")):
        pytest.skip("torch._scaled_grouped_mm needs sm_90")
    stacks, x, ids, w, ref = _one_class_problem("fp8", tokens, seed=4, device="cuda")
    out = _run_one_class(stacks, x.to(torch.bfloat16), ids, w, block_m=16, use_triton=False)
    assert _rel(out, ref) < 0.08  # activations quantized to fp8 row-wise as well
