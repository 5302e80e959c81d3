"""Benchmark the mixed-precision MoE layer on a Qwen3-30B-A3B-shaped layer.

128 experts, top-8, hidden 2048, expert intermediate 768, at 1, 16 and 128 tokens:
transformers' own ``grouped_mm`` experts (bf16), this runtime's bf16 grouped path, each
quantized precision alone, and a mixed assignment (16 bf16, 16 fp8, 32 int8, 32 int4, 16 int3,
16 int2 experts, drawn at random) and an integer-only mix (32 int8, 64 int4, 16 int3, 16 int2). Every forward draws its routing from ``--rotations``
pre-made random routings, so consecutive forwards touch other experts and the 50 MB L2 cannot
hold the weights between them. Times are the median over ``--reps`` of CUDA-event timings,
eager and replayed from one CUDA graph holding all rotations. The floor is the bytes of the
active experts' weights (registry bytes, scales included) over 3.35 TB/s.

    PYTHONPATH=. python benchmarks/moe_layer.py [--tokens 1 16 128] [--out results.json]

Without CUDA it runs a small smoke shape on the CPU (``--small`` forces that shape).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from moebits.core.model_spec import get_model_spec
from moebits.runtime.moe_layer import MixedPrecisionMoE, build_mixed_experts, reference_moe

HBM_BYTES_PER_S = 3.35e12
LAUNCH_S = 20e-6
PRECISIONS = ("bf16", "fp8", "int8", "int4", "int3", "int2")
MIX = {"bf16": 16, "fp8": 16, "int8": 32, "int4": 32, "int3": 16, "int2": 16}
MIX_INT = {"int8": 32, "int4": 64, "int3": 16, "int2": 16}  # integer classes only: Triton launches
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128], help="token counts T")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions (median reported)")
    ap.add_argument("--rotations", type=int, default=16, help="distinct routings cycled per repetition")
    ap.add_argument("--check-tokens", type=int, default=16, help="T of the accuracy check")
    ap.add_argument("--no-graphs", action="store_true", help="skip CUDA-graph timings")
    ap.add_argument("--small", action="store_true", help="a small shape (16 experts, 256/128) for smoke runs")
    ap.add_argument("--impls", nargs="+", default=None, help="only these implementations (e.g. int4 mixed)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the accuracy check")
    ap.add_argument("--grouped-all", action="store_true",
                    help="also time every fused layer with the grouped (tensor-core) kernels for all token counts")
    ap.add_argument("--old-impls", nargs="*", default=None,
                    help="only these per-class implementations beside the fused ones (e.g. hf bf16 int4 mixed)")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the fused one-launch kernels (runtime/fused_moe.py) for every precision")
    ap.add_argument("--fused-configs", nargs="*", default=["16,32,4,1", "32,64,4,1", "16,32,4,0"],
                    help="extra int4 launch shapes 'bn_up,bn_down,warps,flat' (flat 0: one reduction per group)")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    return ap.parse_args(argv)


def _shape(small: bool) -> tuple[int, int, int, int]:
    """(experts, top_k, hidden, intermediate)."""
    if small:
        return 16, 4, 256, 128
    s = get_model_spec("Qwen3-30B-A3B")
    return s.experts, s.top_k, s.hidden, s.expert_intermediate


def _routings(n: int, tokens: int, experts: int, k: int, hidden: int, device, gen: torch.Generator):
    out = []
    for _ in range(n):
        x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
        ids = torch.rand(tokens, experts, generator=gen).topk(k, dim=1).indices.to(device)
        w = torch.softmax(torch.randn(tokens, k, generator=gen), -1).to(device)
        out.append((x, ids, w))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_eager(fn: Forward, routings, reps: int, device: torch.device) -> float:
    """Median µs per forward, Python launch overhead included."""
    for r in routings:
        fn(*r)
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for r in routings:
                fn(*r)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(routings))
        else:
            t0 = time.perf_counter()
            for r in routings:
                fn(*r)
            times.append((time.perf_counter() - t0) * 1e6 / len(routings))
    return statistics.median(times)


def time_graph(fn: Forward, routings, reps: int) -> float:
    """Median µs per forward replayed from one CUDA graph holding every rotation."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for r in routings:
            fn(*r)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in routings:
            fn(*r)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(routings))
    del graph
    return statistics.median(times)


def floor_us(routings, expert_bytes: torch.Tensor) -> float:
    """Mean over routings of the active experts' weight bytes over HBM bandwidth, in µs."""
    per = [float(expert_bytes[torch.unique(ids.cpu())].sum()) for _, ids, _ in routings]
    return statistics.mean(per) / HBM_BYTES_PER_S * 1e6


def hf_experts(gate_up: torch.Tensor, down: torch.Tensor, k: int) -> tuple[Forward | None, str]:
    """transformers' Qwen3MoeExperts with experts_implementation="grouped_mm", sharing the weights."""
    try:
        import transformers
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError as exc:
        return None, f"transformers unavailable: {exc}"
    e, n2, h = gate_up.shape
    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=n2 // 2, num_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    mod.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return (lambda x, ids, w: mod(x, ids, w.to(x.dtype))), f"transformers {transformers.__version__}"


def build_layers(gate_up, down, gen_seed: int, wanted=None) -> dict[str, tuple[MixedPrecisionMoE, list[str]]]:
    """One layer per precision (all experts in it) and the mixed ones; value: (layer, precision of e)."""
    experts = gate_up.shape[0]
    out = {}
    for p in (p for p in PRECISIONS if wanted is None or p in wanted):
        precs = [p] * experts
        out[p] = (MixedPrecisionMoE(*build_mixed_experts(gate_up, down, precs)), precs)
    for name, counts in (("mixed", MIX), ("mixed-int", MIX_INT)):
        mix = [p for p, n in counts.items() for _ in range(n * experts // 128)]
        mix += ["int4"] * (experts - len(mix))
        random.Random(gen_seed).shuffle(mix)
        out[name] = (MixedPrecisionMoE(*build_mixed_experts(gate_up, down, mix)), mix)
    return {k: v for k, v in out.items() if wanted is None or k in wanted}


def accuracy(layer: MixedPrecisionMoE, routing, gate_up, down) -> tuple[float, float]:
    """Relative error vs the served (dequantized) weights and vs the bf16 weights, fp32 references."""
    x, ids, w = routing
    out = layer(x, ids, w).float()
    gq, dq = layer.dequantized_experts(torch.float32)
    served = reference_moe(x.float(), ids, w.float(), gq, dq)
    del gq, dq
    exact = reference_moe(x.float(), ids, w.float(), gate_up.float(), down.float())
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return rel(out, served), rel(out, exact)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    experts, k, hidden, inter = _shape(small)
    gen = torch.Generator().manual_seed(0)
    gate_up = (0.02 * torch.randn(experts, 2 * inter, hidden, generator=gen)).to(device, torch.bfloat16)
    down = (0.02 * torch.randn(experts, hidden, inter, generator=gen)).to(device, torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    unpack = os.environ.get("MOEBITS_TRITON_UNPACK", "join")
    print(f"device: {name}; torch {torch.__version__}; shape E={experts} k={k} H={hidden} I={inter}; "
          f"triton unpack: {unpack}")
    layers = build_layers(gate_up, down, gen_seed=1, wanted=args.impls)
    spec_bytes = {p: _expert_bytes(p, hidden, inter) for p in PRECISIONS}
    impls: dict[str, tuple[Forward, torch.Tensor]] = {}
    hf, hf_note = hf_experts(gate_up, down, k)
    print(f"hf baseline: {hf_note}")
    bf16_bytes = torch.full((experts,), float(spec_bytes["bf16"]))
    if hf is not None and (args.impls is None or "hf" in args.impls):
        impls["hf grouped_mm"] = (hf, bf16_bytes)
    for key, (layer, precs) in layers.items():
        impls[key] = (layer.forward, torch.tensor([float(spec_bytes[p]) for p in precs]))
        if key in ("int4", "mixed-int") and device.type == "cuda":  # the split-K ablation
            for mode, label in (("0", "nosplit"), ("force", "split")):
                impls[f"{key} {label}"] = (_with_env(layer.forward, MOEBITS_TRITON_SPLITK=mode), impls[key][1])
    if args.fused and device.type == "cuda":
        hbm = measured_hbm_bytes_per_s(device)
        print(f"measured HBM copy bandwidth: {hbm / 1e12:.2f} TB/s (floors below use it)")
        globals()["HBM_BYTES_PER_S"] = hbm
        fused, fused_err = fused_impls(gate_up, down, k, layers, spec_bytes, args.fused_configs, gen,
                                       args.grouped_all)
        impls.update(fused)
        for label, err in fused_err.items():
            print(f"  accuracy {label}: rel. error vs float32 dequantize reference of the table {err:.2e}")
    if args.old_impls is not None:
        keep = set(args.old_impls) | ({"hf grouped_mm"} if "hf" in args.old_impls else set())
        impls = {k: v for k, v in impls.items() if k.startswith("fused") or k in keep}
    rows = [] if args.no_accuracy else _accuracy_rows(layers, args.check_tokens, experts, k, hidden, device,
                                                       gen, gate_up, down)
    rows += _timing_rows(impls, args, experts, k, hidden, device, gen)
    _print_tables(rows, name)
    from moebits.runtime.grouped import triton_kernels

    tk = triton_kernels()
    if tk is not None and device.type == "cuda":
        print("autotuned Triton configs:", json.dumps(tk.tuned_configs(), indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)


def measured_hbm_bytes_per_s(device: torch.device) -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (median of 5)."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.numel() / statistics.median(times)


def fused_impls(gate_up, down, k, layers, spec_bytes, configs, gen, grouped_all=False) -> tuple[dict, dict]:
    """The fused kernels over one slab pool per assignment: ``fused <name>`` for every precision and mix."""
    import dataclasses

    from moebits.core.slabs import SlabClass, SlabLedger
    from moebits.runtime.fused_moe import MoeKernelConfig
    from moebits.runtime.fused_ops import MoeOps
    from moebits.runtime.pool import DevicePool, slab_layout
    from moebits.runtime.residency import ResidencyTable, load_layer, serve_reference

    experts, n2, hidden = gate_up.shape
    inter = n2 // 2
    spec = dataclasses.replace(get_model_spec("Qwen3-30B-A3B"), layers=1, experts=experts, top_k=k, hidden=hidden,
                               expert_intermediate=inter)
    impls, errs = {}, {}
    router = (0.02 * torch.randn(experts, hidden, generator=gen)).to(gate_up.device, torch.bfloat16)
    for key, (_, precs) in layers.items():
        classes = [SlabClass(p, slab_layout(p, hidden, inter).nbytes, precs.count(p)) for p in dict.fromkeys(precs)]
        ledger = SlabLedger(classes, sum(c.slab_bytes * c.count for c in classes) + (1 << 20))
        pool = DevicePool(ledger, spec, gate_up.device)
        table = ResidencyTable(1, experts, gate_up.device)
        for p in dict.fromkeys(precs):
            load_layer(pool, table, 0, gate_up, down, p, [e for e, q in enumerate(precs) if q == p])
        table.flush()
        shapes = [None] + ([_kernel_config(MoeKernelConfig, c) for c in configs] if key == "int4" else [])
        if key != "int4" and grouped_all:
            shapes.append(MoeKernelConfig(grouped_from_pairs=1))
        ebytes = torch.tensor([float(spec_bytes[p]) for p in precs])
        for cfg in shapes:
            ops = MoeOps(pool, True, cfg)
            label = f"fused {key}" + ("" if cfg is None else
                                      f" [{cfg.bn_up},{cfg.bn_down},{cfg.warps},{int(cfg.flat)},{cfg.grouped_from_pairs}]")
            impls[label] = (_fused_forward(ops, table), ebytes)
        if key == "int4":
            impls[f"fused {key} +router"] = (_fused_forward(MoeOps(pool, True), table, router), ebytes)
        x = torch.randn(16, hidden, generator=gen).to(gate_up.device, torch.bfloat16)
        ids = torch.rand(16, experts, generator=gen).topk(k, dim=1).indices.to(gate_up.device, torch.int32)
        w = torch.softmax(torch.randn(16, k, generator=gen), -1).to(gate_up.device)
        ref = serve_reference(x, ids, w, table.codes[0], pool)
        errs[f"fused {key}"] = float((impls[f"fused {key}"][0](x, ids, w) - ref).norm() / ref.norm())
        gops = MoeOps(pool, True, MoeKernelConfig(grouped_from_pairs=1))
        errs[f"fused {key} grouped"] = float((_fused_forward(gops, table)(x, ids, w) - ref).norm() / ref.norm())
    return impls, errs


def _kernel_config(cls, text: str):
    """'bn_up,bn_down,warps[,flat[,grouped_from_pairs]]' -> a MoeKernelConfig."""
    v = [int(t) for t in text.split(",")]
    return cls(v[0], v[1], v[2], bool(v[3]) if len(v) > 3 else True, v[4] if len(v) > 4 else 0)


def _fused_forward(ops, table, router=None) -> Forward:
    """``(x, ids, w) -> [T, H]`` float32 through the fused kernels; with ``router``, routing from x too."""

    def run(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t, k = ids.shape
        if router is not None:
            ids = torch.empty(t, k, dtype=torch.int32, device=x.device)
            w = torch.empty(t, k, dtype=torch.float32, device=x.device)
            ops.route(x @ router.T, ids, w, True)
        out = torch.empty(t, x.shape[1], dtype=torch.float32, device=x.device)
        h = torch.empty(t * k, ops.pd.intermediate, dtype=torch.float32, device=x.device)
        ops.experts(x, ids.to(torch.int32), w.float(), table.codes[0], out, h, True)
        return out

    return run


def _with_env(fn: Forward, **env: str) -> Forward:
    """``fn`` run with environment knobs set (the Triton launcher reads them at call time)."""

    def run(*args: torch.Tensor) -> torch.Tensor:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn(*args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return run


def _expert_bytes(precision: str, hidden: int, inter: int) -> int:
    from moebits.core.precision import get_precision

    p = get_precision(precision)
    return p.matrix_bytes(2 * inter, hidden) + p.matrix_bytes(hidden, inter)


def _accuracy_rows(layers, tokens, experts, k, hidden, device, gen, gate_up, down) -> list[dict]:
    routing = _routings(1, tokens, experts, k, hidden, device, gen)[0]
    rows = []
    for key, (layer, _) in layers.items():
        try:
            served, exact = accuracy(layer, routing, gate_up, down)
        except Exception as exc:  # noqa: BLE001 - a broken path is a result to report, not a stop
            print(f"  accuracy {key}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            served = exact = float("nan")
        rows.append(
            {"kind": "accuracy", "impl": key, "tokens": tokens, "err_served": served, "err_bf16": exact}
        )
    return rows


def _timing_rows(impls, args, experts, k, hidden, device, gen) -> list[dict]:
    rows = []
    for tokens in args.tokens:
        routings = _routings(args.rotations, tokens, experts, k, hidden, device, gen)
        routings32 = [(x, i.to(torch.int32), w) for x, i, w in routings]   # the fused kernels take int32 ids
        for key, (fn, ebytes) in impls.items():
            rot = routings32 if key.startswith("fused") else routings
            row = {
                "kind": "time",
                "impl": key,
                "tokens": tokens,
                "floor_us": floor_us(rot, ebytes),
                "eager_us": float("nan"),
                "graph_us": None,
            }
            try:
                row["eager_us"] = time_eager(fn, rot, args.reps, device)
                if device.type == "cuda" and not args.no_graphs:
                    row["graph_us"] = time_graph(fn, rot, args.reps)
            except Exception as exc:  # noqa: BLE001 - report, keep going
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"  T={tokens} {key}: FAILED {row['error']}", flush=True)
            rows.append(row)
            print(
                f"  T={tokens:4d} {key:17s} eager {row['eager_us']:9.1f} us  graph {row['graph_us']}",
                flush=True,
            )
    return rows


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _print_tables(rows: list[dict], device_name: str) -> None:
    print(f"\naccuracy on {device_name} (relative Frobenius error of the layer output)")
    print(f"{'impl':17s} {'T':>4s} {'vs served weights':>18s} {'vs bf16 weights':>16s}")
    for r in (r for r in rows if r["kind"] == "accuracy"):
        print(f"{r['impl']:17s} {r['tokens']:4d} {r['err_served']:18.2e} {r['err_bf16']:16.3f}")
    times = [r for r in rows if r["kind"] == "time"]
    base = {r["tokens"]: r for r in times if r["impl"] == "bf16"}
    hf = {r["tokens"]: r for r in times if r["impl"] == "hf grouped_mm"}
    ratio = lambda a, b: a / b if a and b and a == a and b == b else None  # noqa: E731 - None/NaN-safe
    print(f"\ntimes on {device_name}: µs per MoE layer forward (median), floor = active weight bytes / 3.35 TB/s")
    print(f"{'T':>4s} {'impl':17s} {'eager':>8s} {'graph':>8s} {'floor':>7s} {'graph/floor':>11s} "
          f"{'graph/(floor+20)':>16s} {'x bf16 eager':>12s} {'x bf16 graph':>12s} {'x hf graph':>10s}")
    for r in times:
        b, h, g = base.get(r["tokens"], {}), hf.get(r["tokens"], {}), r["graph_us"]
        print(f"{r['tokens']:4d} {r['impl']:17s} {r['eager_us']:8.1f} {_fmt(g):>8s} {r['floor_us']:7.1f} "
              f"{_fmt(ratio(g, r['floor_us'])):>11s} {_fmt(ratio(g, r['floor_us'] + LAUNCH_S * 1e6)):>16s} "
              f"{_fmt(ratio(b.get('eager_us'), r['eager_us'])):>12s} {_fmt(ratio(b.get('graph_us'), g)):>12s} "
              f"{_fmt(ratio(h.get('graph_us'), g)):>10s}")

if __name__ == "__main__":
    main()
