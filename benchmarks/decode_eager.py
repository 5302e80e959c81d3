"""Decode TPOT of a Qwen3-30B-A3B-shaped model (random weights) under an expert budget.

The transformers model (``Qwen3MoeForCausalLM``, eager attention, batch 1) runs with moebits
experts installed (:mod:`runtime.hf`); the expert budget equals the bytes of every expert at
int4 (``budget=all_int4``). Configurations:

- ``bf16_resident``: every expert bf16 in the slab pool (its own, larger budget: all-bf16 bytes);
- ``static_int4``: every expert int4 (``static_uniform``), Triton int4 kernels;
- ``lru_bf16``: a bf16 expert cache with demand fetch over PCIe (``lru_offload``, STALL);
- ``dynaexq``: the default preset (bf16 / int4): at this budget every slab holds an int4 copy and
  no bf16 one fits, so it serves like ``static_int4`` but with the policy in the loop (its cost);
- ``dynaexq_int3``: every expert int3 plus hot experts promoted to bf16 asynchronously in the
  bytes int3 leaves free (``dynaexq``, ``low_precision: int3``);
- ``hf_grouped_mm``: transformers' own experts, all bf16 on the device, ``grouped_mm``.

Each configuration generates greedily from ``--seqs`` random prompts, one at a time, ``--decode``
tokens each; the first sequence is a warm-up (Triton autotuning, caches), TPOT is the median
decode-pass latency (CUDA events) of the others. Routing (``--routing``): ``trace`` (default)
takes each layer step's experts from the embedded default trace (Qwen3-30B-A3B-shaped, fitted to
real traces' statistics; 32-token prompts) while the model's router still runs and, for dynamic
policies, is read back to the host as in a live run; ``model`` uses the random router itself (a
random-weight model fed its own greedy tokens tends to repeat them, so its routing repeats too).
KL is the mean KL divergence of next-token distributions from the exact bf16 model's (with the
same routing). ``promote GB/s`` times 64 bf16 expert
promotions back to back on the copy stream against one large pinned copy (the link's peak).

    PYTHONPATH=. python benchmarks/decode.py --engine eager [--layers N] [--decode 32] [--out results.json]

``--layers 0`` (default) takes as many of the 48 layers as fit the GPU (bf16 resident) and host
memory (pinned bf16 + int4 copies). No CUDA graphs: every layer is eager Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import get_model_spec
from moebits.core.slabs import SlabClass, SlabLedger
from moebits.drive.records import pass_table
from moebits.policies.base import build_policy
from moebits.policies.dynaexq import DynaExqConfig
from moebits.policies.lru_offload import LruOffloadConfig
from moebits.policies.static_uniform import StaticUniformConfig
from moebits.runtime import hf
from moebits.runtime.engine import RuntimeEngine
from moebits.runtime.host_store import HostStore
from moebits.runtime.pool import DevicePool
from moebits.runtime.promote import Promoter

from moebits import traces

CONFIGS = ("bf16_resident", "static_int4", "lru_bf16", "dynaexq", "dynaexq_int3", "hf_grouped_mm")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=0, help="MoE layers (0: as many as fit)")
    ap.add_argument("--seqs", type=int, default=3, help="sequences per configuration (the first is a warm-up)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (trace routing: the trace's, 32)")
    ap.add_argument("--routing", choices=["trace", "model"], default="trace", help="where routing comes from")
    ap.add_argument("--decode", type=int, default=32, help="decode tokens per sequence")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--no-kl", action="store_true", help="skip the KL divergence against the bf16 model")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap.parse_args(argv)


def layers_that_fit(spec: Any, want_bf16_resident: bool) -> int:
    """MoE layers whose experts fit: bf16 resident on the GPU, and pinned bf16 + int4 on the host."""
    per_gpu = spec.experts * spec.expert_bytes("bf16") * (1 if want_bf16_resident else 0.3)
    free_gpu, _ = torch.cuda.mem_get_info()
    host = _mem_available_bytes()
    per_host = spec.experts * sum(spec.expert_bytes(p) for p in ("bf16", "int4", "int3"))
    gpu_layers = int((free_gpu - 8e9) // per_gpu)
    host_layers = int(host * 0.7 // per_host)
    return max(1, min(spec.layers, gpu_layers, host_layers))


def _mem_available_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def promotion_gbps(spec: Any, store: HostStore, n: int = 64) -> tuple[float, float]:
    """(GB/s of ``n`` bf16 promotions back to back on the copy stream, GB/s of one large pinned copy)."""
    b = spec.expert_bytes("bf16")
    ledger = SlabLedger([SlabClass("bf16", b, n)], n * b)
    pool = DevicePool(ledger, spec, "cuda")
    promoter = Promoter(pool, store, ledger)
    keys = [ExpertKey(i // spec.experts % spec.layers, i % spec.experts) for i in range(n)]
    for _ in range(2):  # warm-up, then timed
        slabs = [ledger.begin_load(k, "bf16") for k in keys]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k, s in zip(keys, slabs, strict=True):
            promoter.submit(k, "bf16", s)
        promoter.drain()
        dt = time.perf_counter() - t0
        for k in keys:
            ledger.evict(k, "bf16")
    big = store.rows["bf16"][: min(n, store.rows["bf16"].shape[0])].view(-1)
    dst = torch.empty_like(big, device="cuda")
    dst.copy_(big, non_blocking=True)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    dst.copy_(big, non_blocking=True)
    torch.cuda.synchronize()
    peak = big.numel() / (time.perf_counter() - t1) / 1e9
    del pool, dst
    return n * b / dt / 1e9, peak


def policy_for(name: str, spec: Any) -> tuple[Any, int]:
    int4_all = spec.all_experts_bytes("int4")
    return {
        "bf16_resident": (StaticUniformConfig(precision="bf16"), spec.all_experts_bytes("bf16")),
        "static_int4": (StaticUniformConfig(precision="int4"), int4_all),
        "lru_bf16": (LruOffloadConfig(precision="bf16"), int4_all),
        "dynaexq": (DynaExqConfig(), int4_all),
        "dynaexq_int3": (DynaExqConfig(low_precision="int3"), int4_all),
    }[name]


def run_generation(model: Any, runtime: hf.HFRuntime | None, engine: RuntimeEngine | None, args: argparse.Namespace,
                   prompts: np.ndarray) -> tuple[list[float], list[float], float]:
    """Generate every prompt; (decode-pass latencies of the timed sequences in s, KL values, wall s)."""
    lat, kls = [], []
    t0 = time.perf_counter()
    for s in range(prompts.shape[0]):
        ids = torch.from_numpy(prompts[s : s + 1]).cuda()
        marks = []
        if engine is None:
            fed, cache, logits = [ids], None, []
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
            out, cache = hf.forward_logits(model, ids, None)
            logits.append(out[:, -1].float())
            for _ in range(args.decode):
                nxt = logits[-1].argmax(-1, keepdim=True)
                fed.append(nxt)
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append(ev)
                out, cache = hf.forward_logits(model, nxt, cache)
                logits.append(out[:, -1].float())
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
            torch.cuda.synchronize()
            if s > 0:
                lat += [a.elapsed_time(b) / 1e3 for a, b in zip(marks[1:-1], marks[2:], strict=False)]
            continue
        gen = hf.generate(model, engine, ids, args.decode, batch=s)
        if s > 0 and runtime is not None and not args.no_kl:
            kls += hf.kl_divergence(hf.reference_logits(model, runtime, gen), gen.logits).flatten().tolist()
    wall = time.perf_counter() - t0
    if engine is not None:
        df = pass_table(engine.finish())
        dec = df[(df["phase"] == "decode") & (df["batch"] > 0)]
        lat = dec["latency_s"].tolist()
    return lat, kls, wall


def bench_engine(name: str, model: Any, spec: Any, store: HostStore, args: argparse.Namespace,
                 prompts: np.ndarray, routing: hf.TraceRouting | None) -> dict[str, Any]:
    cfg, budget = policy_for(name, spec)
    engine = RuntimeEngine(spec, build_policy(cfg), budget, store, device="cuda")
    runtime = hf.HFRuntime(spec, store, engine, "cuda", routing=routing)
    hf.install(model, runtime)
    engine.warmup([1, args.prompt])
    engine.start()
    lat, kls, wall = run_generation(model, runtime, engine, args, prompts)
    snap = dict(zip(("h2d", "d2h", "w", "promotions", "prefetches", "demotions", "refusals", "used", "peak"),
                    engine.snapshot(), strict=True))
    tokens = (prompts.shape[0]) * (args.decode + 1)
    row = _row(name, lat, kls, wall, budget)
    row.update(h2d_gb_per_token=snap["h2d"] / 1e9 / tokens, promotions=snap["promotions"],
               stall_s=float(sum(engine.rec.stall_s)), pool_gb=engine.pool.nbytes / 1e9,
               static_no_sync=engine.defer_routing)
    hf.uninstall(model)
    del engine, runtime
    return row


def bench_hf(model: Any, spec: Any, store: HostStore, args: argparse.Namespace, prompts: np.ndarray) -> dict[str, Any]:
    """transformers' own experts, all bf16 on the device, grouped_mm (its own router's routing)."""
    lay, e = store.layouts["bf16"], spec.experts
    for layer, m in enumerate(hf.experts_modules(model)):
        raw = store.rows["bf16"][layer * e : (layer + 1) * e].cuda()                 # one contiguous copy
        gu, dn = lay.stacks(raw.view(-1), 0, e, lay.nbytes)
        m.gate_up_proj = torch.nn.Parameter(gu.weight.contiguous(), requires_grad=False)  # type: ignore[union-attr]
        m.down_proj = torch.nn.Parameter(dn.weight.contiguous(), requires_grad=False)  # type: ignore[union-attr]
        del raw
    hf.set_experts_implementation(model, "grouped_mm")
    lat, kls, wall = run_generation(model, None, None, args, prompts)
    return _row("hf_grouped_mm", lat, kls, wall, spec.all_experts_bytes("bf16"))


def _row(name: str, lat: list[float], kls: list[float], wall: float, budget: int) -> dict[str, Any]:
    a = np.asarray(lat)
    return {"config": name, "tpot_ms_p50": float(np.median(a) * 1e3) if a.size else None,
            "tpot_ms_mean": float(a.mean() * 1e3) if a.size else None,
            "tokens_per_s": float(1 / np.median(a)) if a.size else None, "kl_mean": float(np.mean(kls)) if kls else None,
            "budget_gb": budget / 1e9, "wall_s": wall}


def format_table(rows: list[dict[str, Any]], head: str) -> str:
    cols = [("config", "config", "{}"), ("tpot_ms_p50", "TPOT p50 ms", "{:.2f}"), ("tpot_ms_mean", "mean ms", "{:.2f}"),
            ("tokens_per_s", "tok/s", "{:.1f}"), ("budget_gb", "budget GB", "{:.2f}"),
            ("h2d_gb_per_token", "H2D GB/tok", "{:.3f}"), ("promotions", "promotions", "{}"),
            ("stall_s", "stall s", "{:.3f}"), ("kl_mean", "KL nats", "{:.2e}")]
    lines = [head, " | ".join(c[1] for c in cols)]
    for r in rows:
        lines.append(" | ".join("-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/decode.py --engine eager needs a CUDA GPU")
    full = get_model_spec("Qwen3-30B-A3B")
    layers = args.layers or layers_that_fit(full, "bf16_resident" in args.configs or "hf_grouped_mm" in args.configs)
    spec = dataclasses.replace(full, layers=layers)
    t0 = time.perf_counter()
    model, weights = hf.build_random_model(spec, device="cuda", dtype=torch.bfloat16, seed=0)
    store = HostStore(spec, progress=True).fill_bf16(weights).require(["int4"])
    print(f"built {layers} layers, host store {store.nbytes() / 1e9:.1f} GB pinned in {time.perf_counter() - t0:.0f} s",
          flush=True)
    prom, peak = promotion_gbps(spec, store)
    prompts = hf.random_prompts(args.seqs, args.prompt, spec.vocab_size, np.random.default_rng(0))
    routing = None
    if args.routing == "trace":
        from moebits.runtime.runner import trace_subset
        from moebits.traces.format import read_trace
        from moebits.traces.replay import build_view

        trace = read_trace(Path(traces.__file__).resolve().parent / "data" / "default.parquet")
        routing = hf.TraceRouting(build_view(trace_subset(trace, args.seqs, layers), 1), spec.top_k)
    rows = []
    for name in args.configs:
        gc.collect()
        torch.cuda.empty_cache()
        t1 = time.perf_counter()
        row = bench_hf(model, spec, store, args, prompts) if name == "hf_grouped_mm" else \
            bench_engine(name, model, spec, store, args, prompts, routing)
        rows.append(row)
        print(f"{name}: {row} ({time.perf_counter() - t1:.0f} s)", flush=True)
        if args.out:  # after every configuration: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"layers": layers, "promote_gbps": prom, "pinned_peak_gbps": peak, "rows": rows}, f, indent=2)
    head = (f"{torch.cuda.get_device_name()} | Qwen3-30B-A3B shape, random weights, {layers} of 48 MoE layers | "
            f"batch 1, prompt {args.prompt}, decode {args.decode}, {args.seqs - 1} timed seqs, {args.routing} routing | "
            f"eager, no CUDA graphs\n"
            f"promotion copies {prom:.1f} GB/s vs pinned peak {peak:.1f} GB/s ({prom / peak:.0%})")
    print(format_table(rows, head))


if __name__ == "__main__":
    main()
