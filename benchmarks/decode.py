"""Decode benchmark: graph-captured decode of a Qwen3-30B-A3B-shaped model (random weights) under policies.

The fast model (:mod:`runtime.fast_model`: Triton kernels, static KV cache, a device residency
table) serves every configuration through :class:`runtime.graph_engine.GraphEngine`, i.e. the
policy runs through the one driver (:mod:`drive`) and each configuration yields the drive step
table and summary; transformers' own model is the user baseline. ``--engine eager`` runs the
earlier eager runtime benchmark instead (``benchmarks/decode_eager.py``, its own options).

Routing (``--trace``): by default each layer's top-k ids and gates are forced from the embedded
default trace (Qwen3-30B-A3B-shaped, fitted to real traces' statistics; its prompts set the
prompt length), replayed through the fast model's routing buffers after the router ran (the
router's cost stays); ``--trace PATH`` replays another trace of the same expert count and top-k,
``--trace none`` keeps the random model's own router (far more repetitive than real routing).
Tokens are teacher-forced random tokens, the same for every configuration, so KL divergences
against ``bf16_resident`` compare like for like (the transformers baseline keeps its own router:
its KL is reported only with ``--trace none``).

Configurations (``--configs``):

- ``bf16_resident`` / ``static_int4``: every expert resident in one precision (static_uniform);
- ``dynaexq`` (bf16 / int4) and ``dynaexq_int3`` (bf16 / int3), each at every ``--lags`` d: the
  policy observes pass t's routing before pass t + d (one pinned copy per pass, whole-step
  graph, actions at pass boundaries); budgets: all-int4 bytes + ``--dyn-slots`` bf16 experts per
  layer (``dynaexq``), all-int4 bytes (``dynaexq_int3``: what int3 leaves free);
- ``lru_bf16``: bf16 demand-fetch cache per layer (lru_offload, STALL, no staging slab) in the all-int4 budget: graphs per
  layer, the host reads each layer's routing and waits for the copies (lag 0: the seam's rule);
- ``hf``: transformers' ``Qwen3MoeForCausalLM``, every expert bf16 on the device, eager.

Per configuration (from the drive summary): TTFT (prefill in ``--chunk``-row chunks), TPOT p50,
tokens/s, H2D GB per token, stall seconds, KL vs bf16, promotions; ``static_int4`` also at each
``--batch`` size > 1 (whole-step graph, trace decode rows). ``--stress N`` runs N decode steps of
random promotions and demotions with every layer's MoE output checked against a float32
dequantize reference of the table's state.

    PYTHONPATH=... python benchmarks/decode.py --out decode.json   # CUDA
    PYTHONPATH=... python benchmarks/decode.py --smoke             # CPU smoke (tiny shape, eager, torch ops)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec, get_model_spec
from moebits.core.routing import LayerSteps
from moebits.drive.records import summarize
from moebits.policies.base import build_policy
from moebits.policies.dynaexq import DynaExqConfig
from moebits.policies.lru_offload import LruOffloadConfig
from moebits.policies.static_uniform import StaticUniformConfig
from moebits.runtime import hf
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights, StepBuffers
from moebits.runtime.graph_engine import GraphEngine, PassInput
from moebits.runtime.graph_serve import GraphMode, StepRunner
from moebits.runtime.host_store import HostStore
from moebits.runtime.replay import pass_routing
from moebits.runtime.residency import serve_reference
from moebits.traces.format import read_trace
from moebits.traces.replay import build_view
from moebits.traces.workload import default_trace_path, first_layers, first_seqs

CONFIGS = ("bf16_resident", "static_int4", "dynaexq", "dynaexq_int3", "lru_bf16", "hf")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["graph", "eager"], default="graph",
                    help="graph: this benchmark; eager: benchmarks/decode_eager.py with the remaining options")
    ap.add_argument("--layers", type=int, default=48, help="MoE layers (of 48)")
    ap.add_argument("--trace", default="default",
                    help="routing to replay: 'default' (embedded trace), a trace file, or 'none' (the model's router)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (with a trace: the trace's prompt length)")
    ap.add_argument("--chunk", type=int, default=32, help="prefill chunk rows")
    ap.add_argument("--lru-chunk", type=int, default=4,
                    help="prefill chunk rows of lru_bf16 (a chunk's distinct experts must fit its per-layer cache)")
    ap.add_argument("--decode", type=int, default=64, help="decode steps")
    ap.add_argument("--batch", type=int, nargs="*", default=[8, 32], help="extra batch sizes (static_int4)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--lags", type=int, nargs="+", default=[1, 2],
                    help="dynaexq observation lags d in passes: pass t is observed before pass t+d")
    ap.add_argument("--dyn-slots", type=int, default=16, help="bf16 slots per layer in dynaexq's budget")
    ap.add_argument("--hf-experts", default="grouped_mm", help="transformers experts implementation")
    ap.add_argument("--stress", type=int, default=0, help="decode steps of the promote/demote stress check")
    ap.add_argument("--grouped-from-pairs", type=int, default=0,
                    help="MoE calls with at least this many (token, expert) pairs use the grouped tensor-core kernels")
    ap.add_argument("--breakdown", action="store_true",
                    help="static_int4: time the whole-step graph with parts left out (experts, attention, layers)")
    ap.add_argument("--smoke", "--small", dest="small", action="store_true",
                    help="tiny CPU shape, eager torch path (checks the whole script runs)")
    ap.add_argument("--out", default=None, help="write results JSON here")
    return ap.parse_args(argv)


@dataclasses.dataclass
class Setup:
    """What every configuration shares: the model's non-expert weights, expert source, tokens, routing."""

    spec: ModelSpec
    hf_model: Any
    weights: Any                 # layer -> (gate_up [E, 2I, H], down [E, H, I]) on the device
    fast_w: FastWeights
    shape: AttnShape
    tokens: torch.Tensor         # [P + N] (teacher forced)
    device: torch.device
    use_triton: bool
    prompt: int
    trace: Any = None            # the trace replayed (cut to the model's layers), or None
    store: HostStore | None = None


def build_setup(args: argparse.Namespace) -> Setup:
    device = torch.device("cpu" if args.small else "cuda")
    full = get_model_spec("Qwen3-30B-A3B")
    if args.small:
        spec = dataclasses.replace(full, layers=2, hidden=256, expert_intermediate=128, vocab_size=1024)
        model, weights = hf.build_random_model(spec, device=device, dtype=torch.bfloat16, full_hidden=2048)
    else:
        spec = dataclasses.replace(full, layers=args.layers)
        model, weights = hf.build_random_model(spec, device=device, dtype=torch.bfloat16)
    trace, prompt = load_trace(args.trace, spec), args.prompt
    if trace is not None:
        view = build_view(first_seqs(trace, 1), 1)
        prompt = int(view.ls_tokens[0])
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, spec.vocab_size, (prompt + args.decode,), generator=gen)
    return Setup(spec, model, weights, FastWeights.from_hf(model), AttnShape.from_hf_config(model.config),
                 tokens, device, not args.small, prompt, trace)


def load_trace(arg: str, spec: ModelSpec) -> Any:
    """The trace to replay, cut to ``spec``'s layers (None for the model's own router)."""
    if arg == "none":
        return None
    path = default_trace_path() if arg == "default" else Path(arg)
    if not path.exists():
        raise SystemExit(f"error: trace {path} not found")
    t = read_trace(path)
    if (t.spec.experts, t.spec.top_k) != (spec.experts, spec.top_k) or t.spec.layers < spec.layers:
        raise SystemExit(f"error: trace {path} routes {t.spec.layers} layers x {t.spec.experts} experts top-"
                         f"{t.spec.top_k}; the model has {spec.layers} x {spec.experts} top-{spec.top_k}")
    return first_layers(t, spec.layers)


# ----------------------------------------------------------------------------- routing from the trace
def decode_routing(view: LayerSteps, layers: int, top_k: int, rows: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` decode passes' routing ``[L, rows, k]`` from ``view``'s decode passes of ``rows`` rows, cyclically."""
    starts = [i for i in range(0, view.layer_steps, layers) if view.ls_pass[i] > 0 and view.ls_tokens[i] == rows]
    if not starts:
        raise SystemExit(f"error: the trace has no decode pass of {rows} rows")
    return [pass_routing(view, starts[t % len(starts)], layers, top_k) for t in range(n)]


def prefill_routing(view: LayerSteps, layers: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    return pass_routing(view, 0, layers, top_k)


# ----------------------------------------------------------------------------- configurations
def policy_for(name: str, spec: ModelSpec, dyn_slots: int) -> tuple[Any, int]:
    int4_all = spec.all_experts_bytes("int4")
    return {
        "bf16_resident": (StaticUniformConfig(precision="bf16"), spec.all_experts_bytes("bf16")),
        "static_int4": (StaticUniformConfig(precision="int4"), int4_all),
        "dynaexq": (DynaExqConfig(warm_start=False), int4_all + dyn_slots * spec.layers * spec.expert_bytes("bf16")),
        "dynaexq_int3": (DynaExqConfig(low_precision="int3", warm_start=False), int4_all),
        "lru_bf16": (LruOffloadConfig(precision="bf16", staging_experts=0), int4_all),  # a cache per layer
    }[name]


def engine_for(s: Setup, name: str, args: argparse.Namespace, lag: int, rows: int) -> GraphEngine:
    """The graph engine of configuration ``name`` (pool, table, model, mover, driver; initial loads placed)."""
    cfg, budget = policy_for(name, s.spec, args.dyn_slots)
    moe_cfg = None
    if s.use_triton:
        from moebits.runtime.fused_moe import MoeKernelConfig

        moe_cfg = MoeKernelConfig(grouped_from_pairs=args.grouped_from_pairs)

    def make(pool: Any, table: Any) -> FastModel:
        return FastModel(s.fast_w, s.spec, s.shape, pool, table, s.use_triton, max_seqs=rows,
                         max_len=s.prompt + args.decode, moe_cfg=moe_cfg)

    store_rows = s.store.row if s.store is not None else _no_rows
    mode = GraphMode.WHOLE if s.device.type == "cuda" else GraphMode.EAGER
    return GraphEngine(s.spec, build_policy(cfg), budget, make, s.weights, store_rows, device=s.device, mode=mode,
                       route_lag=lag, replay=s.trace is not None, max_rows=rows, per_pass=True)


def _no_rows(key: ExpertKey, precision: str) -> torch.Tensor:
    raise RuntimeError("this configuration has no host store")


class Clock:
    """CUDA events on a GPU, perf_counter elsewhere: ``mark()`` then ``seconds()`` between marks."""

    def __init__(self, dev: torch.device) -> None:
        self.cuda, self.marks = dev.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def _load_rows(b: StepBuffers, tokens: torch.Tensor, pos: list[int], dev: torch.device) -> None:
    pin = dev.type == "cuda"
    t = tokens.to(torch.long)
    seq = torch.zeros(len(pos), dtype=torch.int32)
    ps = torch.tensor(pos, dtype=torch.int32)
    b.set_rows(*(x.pin_memory() if pin else x for x in (t, seq, ps)))



# ----------------------------------------------------------------------------- one sequence
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _h(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A step input on the host, pinned on a GPU machine: the engine copies it without a stream sync."""
    return x.pin_memory() if dev.type == "cuda" else x


def _t(x: np.ndarray | None, dev: torch.device) -> torch.Tensor | None:
    return None if x is None else _h(torch.from_numpy(np.ascontiguousarray(x)), dev)


def run_sequence(s: Setup, eng: GraphEngine, args: argparse.Namespace,
                 chunk: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Prefill (in ``chunk``-row chunks) + decode one sequence (row 0, sequence 0) through ``eng``;
    its summary and logits [N, V]."""
    dev, p, n, L, k = s.device, s.prompt, args.decode, s.spec.layers, s.spec.top_k
    pre_r = dec_r = None
    if s.trace is not None:
        view = build_view(first_seqs(s.trace, 1), 1)
        pre_r = prefill_routing(view, L, k)
        dec_r = decode_routing(build_view(s.trace, 1), L, k, 1, n)
    chunk = min(chunk, p)
    for rows in (chunk, 1):
        eng.runner(rows)                 # capture (warm-up runs) before the clock starts
    eng.start()
    for c0 in range(0, p, chunk):        # chunked prefill (the last chunk padded onto position p-1)
        pos = [min(c0 + j, p - 1) for j in range(chunk)]
        ids, w = (pre_r[0][:, pos], pre_r[1][:, pos]) if pre_r is not None else (None, None)
        eng.run_pass(PassInput(0, 0, _h(s.tokens[pos], dev), _h(torch.zeros(chunk, dtype=torch.int32), dev),
                               _h(torch.tensor(pos, dtype=torch.int32), dev), _t(ids, dev), _t(w, dev),
                               ends_pass=c0 + chunk >= p))
    logits = torch.zeros(n, s.spec.vocab_size, dtype=torch.float32, device=dev)
    for t in range(n):
        ids, w = dec_r[t] if dec_r is not None else (None, None)
        out = eng.run_pass(PassInput(0, 1 + t, _h(s.tokens[p + t : p + t + 1], dev),
                                     _h(torch.zeros(1, dtype=torch.int32), dev),
                                     _h(torch.tensor([p + t], dtype=torch.int32), dev), _t(ids, dev), _t(w, dev)))
        logits[t] = out[0].float()
    return summarize(eng.finish()), logits


def batch_tpot(s: Setup, name: str, args: argparse.Namespace, rows: int, steps: int) -> dict[str, Any]:
    """Decode ``rows`` sequences at once for ``steps`` passes (whole-step graph, trace decode rows)."""
    eng = engine_for(s, name, args, lag=1, rows=rows)
    dev, L, k = s.device, s.spec.layers, s.spec.top_k
    routing = decode_routing(build_view(s.trace, rows), L, k, rows, steps) if s.trace is not None else None
    tok = torch.randint(0, s.spec.vocab_size, (rows,), generator=torch.Generator().manual_seed(rows))
    eng.runner(rows)
    eng.start()
    for t in range(steps):
        ids, w = routing[t] if routing is not None else (None, None)
        eng.run_pass(PassInput(0, 1 + t, _h(tok, dev), _h(torch.arange(rows, dtype=torch.int32), dev),
                               _h(torch.full((rows,), s.prompt + t, dtype=torch.int32), dev), _t(ids, dev),
                               _t(w, dev)))
    summ = summarize(eng.finish())
    return {f"batch{rows}_step_ms": summ["tpot_ms_p50"], f"batch{rows}_tokens_per_s": summ["tokens_per_s"]}


# ----------------------------------------------------------------------------- stress
def stress(s: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Random promotions/demotions (bf16 <-> int4) every step under a whole-step graph; every layer checked."""
    eng = engine_for(s, "dynaexq", args, lag=1, rows=1)
    m, mover = eng.model, eng.mover
    m.forced = False  # the model's own routing: every expert the random router picks is checked
    b = m.buffers(1)
    trace = {k: torch.zeros(s.spec.layers, 1, s.spec.hidden, device=s.device) for k in ("x", "r0", "r1")}
    inner = m.experts

    def traced(i: int, buf: StepBuffers) -> None:
        trace["x"][i].copy_(buf.xn)
        trace["r0"][i].copy_(buf.r)
        inner(i, buf)
        trace["r1"][i].copy_(buf.r)

    m.experts = traced  # type: ignore[method-assign]
    runner = StepRunner(m, b, GraphMode.WHOLE if s.device.type == "cuda" else GraphMode.EAGER)
    _load_rows(b, s.tokens[:1], [0], s.device)
    runner.capture()
    rng = np.random.default_rng(1)
    worst, checked, moved = 0.0, 0, 0
    for t in range(args.stress):
        for _ in range(8):
            key = ExpertKey(int(rng.integers(s.spec.layers)), int(rng.integers(s.spec.experts)))
            if m.moe.pool.ledger.is_ready(key, "bf16"):
                moved += mover.demote(key, "bf16") is None
            else:
                moved += mover.promote(key, "bf16") is None
        mover.boundary()
        _load_rows(b, s.tokens[t : t + 1], [t], s.device)
        runner.run()
        _sync(s.device)
        for i in range(s.spec.layers):
            ref = serve_reference(trace["x"][i].to(torch.bfloat16), b.ids[i], b.weights[i], m.table.codes[i],
                                  m.moe.pool)
            got = trace["r1"][i] - trace["r0"][i]
            worst = max(worst, float((got - ref).norm() / ref.norm()))
            checked += 1
    m.experts = inner  # type: ignore[method-assign]
    bf16_now = sum(1 for k, p, _ in m.moe.pool.ledger.copies() if p == "bf16")
    return {"steps": args.stress, "layer_checks": checked, "worst_rel_err": worst, "actions": moved,
            "bf16_copies_at_end": bf16_now, "passed": worst < 2e-3}


def breakdown(s: Setup, args: argparse.Namespace) -> dict[str, float]:
    """Median whole-step time (ms) of static_int4 with parts of the step replaced by nothing."""
    m = engine_for(s, "static_int4", args, lag=1, rows=1).model
    m.forced = False
    noop = lambda *a, **k: None  # noqa: E731
    parts = {"full": {}, "no_experts": {"experts": noop}, "no_attention_kernel": {"attention": noop},
             "no_moe_block": {"experts": noop, "route": noop, "router_mm": True},
             "embed_head_only": {"attend_route": noop, "experts": noop}}
    out = {}
    for name, patch in parts.items():
        saved = {}
        for attr, fn in patch.items():
            if attr == "router_mm":
                continue
            owner = m if attr in ("experts", "attend_route") else (m.attn if attr == "attention" else m.moe)
            saved[(owner, attr)] = getattr(owner, attr)
            setattr(owner, attr, fn)
        b = m.buffers(1)
        _load_rows(b, s.tokens[:1], [args.prompt], s.device)
        r = StepRunner(m, b, GraphMode.WHOLE if s.device.type == "cuda" else GraphMode.EAGER)
        r.capture()
        clock = Clock(s.device)
        clock.mark()
        for _ in range(20):
            r.run()
            clock.mark()
        out[name] = float(np.median(clock.seconds()) * 1e3)
        for (owner, attr), fn in saved.items():
            setattr(owner, attr, fn)
        del r, b
    return out


# ----------------------------------------------------------------------------- baselines and ceilings
def hf_baseline(s: Setup, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """transformers' own model, every expert bf16 on the device, eager, teacher-forced like ours."""
    mods = hf.experts_modules(s.hf_model)
    for layer, m in enumerate(mods):
        gu, dn = s.weights(layer)
        m.gate_up_proj = torch.nn.Parameter(gu.to(torch.bfloat16), requires_grad=False)
        m.down_proj = torch.nn.Parameter(dn.to(torch.bfloat16), requires_grad=False)
    hf.set_experts_implementation(s.hf_model, args.hf_experts)
    p, dev = args.prompt, s.device
    clock = Clock(dev)
    clock.mark()
    out, cache = hf.forward_logits(s.hf_model, s.tokens[None, :p].to(dev), None)
    clock.mark()
    logits = torch.zeros(steps, s.spec.vocab_size, device=dev)
    for t in range(steps):
        out, cache = hf.forward_logits(s.hf_model, s.tokens[None, p + t : p + t + 1].to(dev), cache)
        logits[t] = out[0, -1].float()
        clock.mark()
    times = clock.seconds()
    for m in mods:  # give the memory back
        for name in ("gate_up_proj", "down_proj"):
            setattr(m, name, torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16, device=dev), requires_grad=False))
    del cache
    return {"ttft_s": times[0], "decode_s": times[1:], "logits": logits, "copy_steps": [False] * steps}


def measure_bandwidths(dev: torch.device) -> dict[str, float]:
    """HBM device-to-device copy (read + write bytes / s) and pinned host-to-device copy, GB/s."""
    if dev.type != "cuda":
        return {}
    a = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    h = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    out = {}
    for name, dst, src, nbytes in (("hbm_gbps", b, a, 2 * a.numel()), ("h2d_pinned_gbps", d, h, h.numel())):
        dst.copy_(src, non_blocking=True)
        clock = Clock(dev)
        clock.mark()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        clock.mark()
        out[name] = 5 * nbytes / clock.seconds()[0] / 1e9
    return out


def kl_mean(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean over steps of KL(p_ref || p_got) of next-token distributions, nats."""
    n = min(ref.shape[0], got.shape[0])
    lr, lg = ref[:n].log_softmax(-1), got[:n].log_softmax(-1)
    return float((lr.exp() * (lr - lg)).sum(-1).mean())



# ----------------------------------------------------------------------------- rows
KEEP = ("tpot_ms_p50", "tpot_ms_p99", "ttft_ms", "tokens_per_s", "stall_s", "promotions", "demotions", "refusals",
        "prefetches", "h2d_bytes", "hbm_peak_bytes", "activations", "graph", "observe", "route_wait_s")


def row_of(name: str, summary: dict[str, Any], s: Setup, tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One JSON row: the decode fields of issue 10 plus the drive summary's counters."""
    row: dict[str, Any] = {"config": name, **{k: summary.get(k) for k in KEEP},
                           "h2d_gb_per_token": summary.get("h2d_bytes", 0) / 1e9 / max(tokens, 1), "kl_mean": None,
                           "device": torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu",
                           "torch": torch.__version__}
    row.update(extra)
    return row


def run_ours(s: Setup, name: str, args: argparse.Namespace, lag: int) -> tuple[dict, Any]:
    chunk = args.lru_chunk if name == "lru_bf16" else args.chunk
    eng = engine_for(s, name, args, lag, rows=max(1, min(chunk, s.prompt)))
    budget = policy_for(name, s.spec, args.dyn_slots)[1]
    summary, logits = run_sequence(s, eng, args, chunk)
    dyn = name.startswith("dynaexq")
    extra: dict[str, Any] = {"pool_gb": eng.pool.nbytes / 1e9, "lag": lag if dyn else 0, "budget_gb": budget / 1e9,
                             "trace": args.trace, "prefill_chunk": min(chunk, s.prompt)}
    del eng
    if name == "static_int4":
        for rows in [b for b in args.batch if b > 1]:
            gc.collect()
            extra.update(batch_tpot(s, name, args, rows, min(16, args.decode)))
    row = row_of(f"{name}_lag{lag}" if dyn else name, summary, s, s.prompt + args.decode, extra)
    return row, logits


def hf_row(s: Setup, args: argparse.Namespace) -> tuple[dict, Any]:
    res = hf_baseline(s, args, min(args.decode, 16))
    dec = np.asarray(res["decode_s"])
    summary = {"tpot_ms_p50": float(np.median(dec)) * 1e3, "ttft_ms": res["ttft_s"] * 1e3,
               "tokens_per_s": 1.0 / float(np.median(dec)), "stall_s": 0.0, "graph": "none (eager)"}
    return row_of(f"hf_{args.hf_experts}_eager", summary, s, 0, {"routing": "own router"}), res["logits"]


def _write(path: str | None, obj: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def format_table(rows: list[dict[str, Any]], head: str) -> str:
    cols = [("config", "config", "{}"), ("tpot_ms_p50", "TPOT p50 ms", "{:.2f}"), ("ttft_ms", "TTFT ms", "{:.1f}"),
            ("tokens_per_s", "tok/s", "{:.0f}"), ("h2d_gb_per_token", "H2D GB/tok", "{:.3f}"),
            ("stall_s", "stall s", "{:.3f}"), ("promotions", "promotions", "{}"),
            ("route_wait_s", "route wait s", "{:.3f}"), ("kl_mean", "KL nats", "{:.2e}")]
    lines = [head, " | ".join(c[1] for c in cols)]
    for r in rows:
        lines.append(" | ".join("-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols))
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    if "--engine=eager" in given or any(a == "--engine" and b == "eager" for a, b in zip(given, given[1:], strict=False)):
        rest = [a for i, a in enumerate(given) if not a.startswith("--engine") and not (a == "eager" and i
                and given[i - 1] == "--engine")]
        sys.argv = [str(Path(__file__).with_name("decode_eager.py")), *rest]
        runpy.run_path(sys.argv[0], run_name="__main__")   # the eager runtime benchmark, its own options
        return
    args = _parse(argv)
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/decode.py needs a CUDA GPU (or --smoke for the CPU smoke run)")
    t0 = time.perf_counter()
    s = build_setup(args)
    bw = measure_bandwidths(s.device)
    print(f"built {s.spec.layers} layers in {time.perf_counter() - t0:.0f} s; bandwidths {bw}; "
          f"routing {args.trace}", flush=True)
    rows, logits = [], {}
    out: dict[str, Any] = {"bandwidths": bw, "layers": s.spec.layers, "prompt": s.prompt, "decode": args.decode,
                           "chunk": args.chunk, "trace": args.trace, "torch": torch.__version__}
    ours = [c for c in args.configs if c != "hf"]
    ours.sort(key=lambda c: c != "bf16_resident")        # the KL reference first
    if any(c.startswith(("dynaexq", "lru")) for c in ours) or args.stress:
        t1 = time.perf_counter()
        s.store = HostStore(s.spec, progress=False).fill_bf16(s.weights)
        print(f"host store bf16 {s.store.nbytes() / 1e9:.1f} GB pinned in {time.perf_counter() - t1:.0f} s", flush=True)
    if "hf" in args.configs:
        row, lg = hf_row(s, args)
        rows.append(row)
        logits["hf"] = lg
        print(row, flush=True)
    for name in ours:
        for lag in (args.lags if name.startswith("dynaexq") else [1]):
            gc.collect()
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
            t1 = time.perf_counter()
            row, lg = run_ours(s, name, args, lag)
            logits[row["config"]] = lg
            rows.append(row)
            print(f"{row['config']}: {json.dumps(row)} ({time.perf_counter() - t1:.0f} s)", flush=True)
            _write(args.out, {**out, "rows": rows})  # a run cut short keeps what it measured
    ref = logits.get("bf16_resident")
    for r in rows:
        hf_like = r["config"].startswith("hf_")
        key = "hf" if hf_like else r["config"]
        if ref is not None and key in logits and not (hf_like and s.trace is not None):
            r["kl_mean"] = kl_mean(ref, logits[key])
    out["rows"] = rows
    if args.breakdown:
        out["breakdown_ms"] = breakdown(s, args)
        print("breakdown (ms per step):", out["breakdown_ms"], flush=True)
        _write(args.out, out)
    if args.stress:
        gc.collect()
        out["stress"] = stress(s, args)
        print("stress:", out["stress"], flush=True)
    dev = rows[0]["device"] if rows else "?"
    out["device"] = dev
    head = (f"{dev} | torch {torch.__version__} | Qwen3-30B-A3B shape, random weights, {s.spec.layers} of 48 layers | "
            f"batch 1, prompt {s.prompt} (chunk {args.chunk}), decode {args.decode}, routing {args.trace}")
    print(format_table(rows, head))
    _write(args.out, out)


if __name__ == "__main__":
    main()
