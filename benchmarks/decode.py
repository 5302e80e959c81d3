"""Graph-captured decode of a Qwen3-30B-A3B-shaped model (random weights) under expert policies.

The fast model (:mod:`runtime.fast_model`: Triton kernels, static KV cache, a device-side
residency table) serves every configuration; transformers' own model is the user baseline.
All configurations see the same teacher-forced random tokens (a ``--prompt``-token prompt,
then ``--decode`` steps), so KL divergences against ``bf16_resident`` compare like for like.

Configurations (``--configs``):

- ``bf16_resident`` / ``static_int4``: every expert resident in one precision (static_uniform);
- ``dynaexq`` (bf16 / int4) and ``dynaexq_int3`` (bf16 / int3): every expert at the low
  precision plus hot experts promoted to bf16 asynchronously (policy ``dynaexq``); the policy
  observes step t before step t + ``--lag`` is served, through one pinned copy per step;
  budgets: all-int4 bytes + ``--dyn-slots`` bf16 experts per layer (``dynaexq``), all-int4 bytes
  (``dynaexq_int3``: what int3 leaves free);
- ``lru_bf16``: bf16 demand-fetch cache (policy ``lru_offload``, STALL) in the all-int4 budget:
  graphs per layer, the host reads each layer's routing and waits for the copies;
- ``hf``: transformers' ``Qwen3MoeForCausalLM``, every expert bf16 on the device, eager, its
  own DynamicCache (``--hf-experts`` implementation).

Per configuration: TTFT (prefill of the prompt in ``--chunk``-row chunks), TPOT p50 over the
decode steps (CUDA events around boundary + replay), tokens/s, H2D GB per token, stall seconds,
KL vs bf16. ``static_int4`` is also timed with per-layer graphs and eager (launch overhead), and
at ``--batch`` sizes. ``--stress N`` runs N decode steps of random promotions and demotions with
every layer's MoE output checked against a float32 dequantize reference of the table's state.

    PYTHONPATH=... python benchmarks/decode_fast.py --out decode.json   # CUDA
    PYTHONPATH=... python benchmarks/decode_fast.py --small             # CPU smoke (eager, torch ops)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from typing import Any

import numpy as np
import torch
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec, get_model_spec
from moebits.core.slabs import SlabLedger
from moebits.policies.base import PolicyContext, build_policy
from moebits.policies.dynaexq import DynaExqConfig
from moebits.policies.lru_offload import LruOffloadConfig
from moebits.policies.static_uniform import StaticUniformConfig
from moebits.runtime import hf
from moebits.runtime.expert_mover import CudaStreams, ExpertMover, SyncStreams
from moebits.runtime.fast_model import AttnShape, FastModel, FastWeights, StepBuffers
from moebits.runtime.graph_serve import GraphMode, PolicyDriver, StepRunner, initial_loads
from moebits.runtime.host_store import HostStore
from moebits.runtime.pool import DevicePool
from moebits.runtime.residency import ResidencyTable, serve_reference
from moebits.runtime.route_observer import RouteObserver

CONFIGS = ("bf16_resident", "static_int4", "dynaexq", "dynaexq_int3", "lru_bf16", "hf")
SLACK_BYTES = 64 << 20  # alignment room beyond the policy's budget (the pool aligns slabs to 16 B)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48, help="MoE layers (of 48)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--chunk", type=int, default=32, help="prefill chunk rows")
    ap.add_argument("--decode", type=int, default=64, help="decode steps")
    ap.add_argument("--batch", type=int, nargs="*", default=[8, 32], help="extra batch sizes (static_int4, bf16)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--lag", type=int, default=1, help="observation lag d: step t is observed before t+d")
    ap.add_argument("--dyn-slots", type=int, default=16, help="bf16 slots per layer in dynaexq's budget")
    ap.add_argument("--hf-experts", default="grouped_mm", help="transformers experts implementation")
    ap.add_argument("--stress", type=int, default=0, help="decode steps of the promote/demote stress check")
    ap.add_argument("--grouped-from-pairs", type=int, default=0,
                    help="MoE calls with at least this many (token, expert) pairs use the grouped tensor-core kernels")
    ap.add_argument("--breakdown", action="store_true",
                    help="static_int4: time the whole-step graph with parts left out (experts, attention, layers)")
    ap.add_argument("--small", action="store_true", help="tiny CPU shape, eager torch path (smoke test)")
    ap.add_argument("--out", default=None, help="write results JSON here")
    return ap.parse_args(argv)


@dataclasses.dataclass
class Setup:
    """What every configuration shares: the model's non-expert weights, expert source, tokens."""

    spec: ModelSpec
    hf_model: Any
    weights: Any                 # layer -> (gate_up [E, 2I, H], down [E, H, I]) on the device
    fast_w: FastWeights
    shape: AttnShape
    tokens: torch.Tensor         # [P + N] (teacher forced)
    device: torch.device
    use_triton: bool
    store: HostStore | None = None


def build_setup(args: argparse.Namespace) -> Setup:
    device = torch.device("cpu" if args.small else "cuda")
    full = get_model_spec("Qwen3-30B-A3B")
    if args.small:
        spec = dataclasses.replace(full, layers=2, experts=16, top_k=4, hidden=256, expert_intermediate=128,
                                   vocab_size=1024)
        model, weights = hf.build_random_model(spec, device=device, dtype=torch.bfloat16, full_hidden=2048)
    else:
        spec = dataclasses.replace(full, layers=args.layers)
        model, weights = hf.build_random_model(spec, device=device, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, spec.vocab_size, (args.prompt + args.decode,), generator=gen)
    return Setup(spec, model, weights, FastWeights.from_hf(model), AttnShape.from_hf_config(model.config),
                 tokens, device, not args.small)


# ----------------------------------------------------------------------------- configurations
def policy_for(name: str, spec: ModelSpec, dyn_slots: int) -> tuple[Any, int]:
    int4_all = spec.all_experts_bytes("int4")
    return {
        "bf16_resident": (StaticUniformConfig(precision="bf16"), spec.all_experts_bytes("bf16")),
        "static_int4": (StaticUniformConfig(precision="int4"), int4_all),
        "dynaexq": (DynaExqConfig(warm_start=False), int4_all + dyn_slots * spec.layers * spec.expert_bytes("bf16")),
        "dynaexq_int3": (DynaExqConfig(low_precision="int3", warm_start=False), int4_all),
        "lru_bf16": (LruOffloadConfig(precision="bf16"), int4_all),
    }[name]


@dataclasses.dataclass
class Served:
    """A configuration ready to serve: model over its pool, policy driver."""

    model: FastModel
    driver: PolicyDriver
    budget: int


def serve_config(s: Setup, name: str, args: argparse.Namespace, rows_max: int) -> Served:
    cfg, budget = policy_for(name, s.spec, args.dyn_slots)
    policy = build_policy(cfg)
    ctx = PolicyContext(s.spec, budget, np.random.default_rng(0),
                        {p: s.spec.expert_bytes(p) for p in ("bf16", "fp8", "int8", "int4", "int3", "int2")})
    policy.prepare(ctx)
    ledger = SlabLedger(policy.slab_plan(), budget + SLACK_BYTES)
    pool = DevicePool(ledger, s.spec, s.device)
    table = ResidencyTable(s.spec.layers, s.spec.experts, s.device)
    moe_cfg = None
    if s.use_triton:
        from moebits.runtime.fused_moe import MoeKernelConfig

        moe_cfg = MoeKernelConfig(grouped_from_pairs=args.grouped_from_pairs)
    model = FastModel(s.fast_w, s.spec, s.shape, pool, table, s.use_triton, max_seqs=rows_max,
                      max_len=args.prompt + args.decode, moe_cfg=moe_cfg)
    initial_loads(model, policy.initial_loads(), s.weights)
    rows = (lambda key, p: s.store.row(key, p)) if s.store is not None else _no_rows  # noqa: E731
    streams = CudaStreams(s.device) if s.device.type == "cuda" else SyncStreams()
    mover = ExpertMover(pool, table, rows, streams)
    observer = RouteObserver(s.spec.layers, 1, s.spec.top_k, args.lag, s.device)
    return Served(model, PolicyDriver(policy, mover, observer), budget)


def _no_rows(key: ExpertKey, precision: str) -> torch.Tensor:
    raise RuntimeError("this configuration has no host store")


# ----------------------------------------------------------------------------- one sequence
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


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


def run_sequence(s: Setup, sv: Served, args: argparse.Namespace, mode: GraphMode) -> dict[str, Any]:
    """Prefill + decode one sequence (row 0, sequence 0); times, logits [N, V], copy stats."""
    m, drv, dev = sv.model, sv.driver, s.device
    p, n = args.prompt, args.decode
    pre = m.buffers(args.chunk)
    dec = m.buffers(1)
    stall = drv.stall
    runners = {r: StepRunner(m, b, mode if not (stall and mode is GraphMode.WHOLE) else GraphMode.LAYER)
               for r, b in ((args.chunk, pre), (1, dec))}
    for r in runners.values():
        _load_rows(r.buf, s.tokens[: r.buf.rows], list(range(r.buf.rows)), dev)
        r.capture()                      # warm-up runs once; caches are overwritten by the real run
    clock = Clock(dev)
    clock.mark()
    for c0 in range(0, p, args.chunk):   # chunked prefill (the last chunk padded onto position p-1)
        pos = [min(c0 + j, p - 1) for j in range(args.chunk)]
        _step(s, drv, runners[args.chunk], s.tokens[pos], pos, serving=-1)
    clock.mark()
    logits = torch.zeros(n, s.spec.vocab_size, dtype=torch.float32, device=dev)
    copy_steps = []
    for t in range(n):
        copy_steps.append(drv.mover.in_flight() > 0)
        _step(s, drv, runners[1], s.tokens[p + t : p + t + 1], [p + t], serving=t)
        logits[t] = dec.logits[0].float()
        clock.mark()
    times = clock.seconds()
    return {"ttft_s": times[0], "decode_s": times[1:], "logits": logits, "copy_steps": copy_steps}


def _load_rows(b: StepBuffers, tokens: torch.Tensor, pos: list[int], dev: torch.device) -> None:
    pin = dev.type == "cuda"
    t = tokens.to(torch.long)
    seq = torch.zeros(len(pos), dtype=torch.int32)
    ps = torch.tensor(pos, dtype=torch.int32)
    b.set_rows(*(x.pin_memory() if pin else x for x in (t, seq, ps)))


def _step(s: Setup, drv: PolicyDriver, runner: StepRunner, tokens: torch.Tensor, pos: list[int], serving: int) -> None:
    drv.before_step(serving) if serving >= 0 else drv.mover.boundary()
    _load_rows(runner.buf, tokens, pos, s.device)
    hook = drv.between(runner.buf, runner.buf.rows) if drv.stall else None
    runner.run(hook)
    if serving >= 0:
        drv.after_step(serving, runner.buf, 1)


def batch_tpot(s: Setup, sv: Served, rows: int, steps: int, pos0: int) -> float:
    """Median step time of decoding ``rows`` sequences at once (positions pos0.., whole-step graph)."""
    b = sv.model.buffers(rows)
    r = StepRunner(sv.model, b, GraphMode.WHOLE if s.device.type == "cuda" else GraphMode.EAGER)
    tok = s.tokens[:rows].to(torch.long) if rows <= s.tokens.numel() else torch.zeros(rows, dtype=torch.long)
    b.set_rows(tok, torch.arange(rows, dtype=torch.int32), torch.full((rows,), pos0, dtype=torch.int32))
    r.capture()
    clock = Clock(s.device)
    clock.mark()
    for t in range(steps):
        b.row_pos.fill_(pos0 + t)
        r.run()
        clock.mark()
    return float(np.median(clock.seconds()))


# ----------------------------------------------------------------------------- stress
def stress(s: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Random promotions/demotions (bf16 <-> int4) every step under a whole-step graph; every layer checked."""
    sv = serve_config(s, "dynaexq", args, 1)
    m, mover = sv.model, sv.driver.mover
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
    sv = serve_config(s, "static_int4", args, 1)
    m = sv.model
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
def row_of(name: str, res: dict[str, Any], s: Setup, extra: dict[str, Any]) -> dict[str, Any]:
    dec = np.asarray(res["decode_s"])
    tpot = float(np.median(dec))
    row = {"config": name, "tpot_ms_p50": tpot * 1e3, "tpot_ms_mean": float(dec.mean() * 1e3),
           "ttft_ms": res["ttft_s"] * 1e3, "tokens_per_s": 1.0 / tpot, "h2d_gb_per_token": 0.0, "stall_s": 0.0,
           "kl_mean": None, "device": torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    row.update(extra)
    return row


def run_ours(s: Setup, name: str, args: argparse.Namespace, lag: int, bw: dict[str, float]) -> tuple[dict, Any]:
    a = argparse.Namespace(**{**vars(args), "lag": lag})
    rows_max = max([1, args.chunk, *args.batch])
    sv = serve_config(s, name, a, rows_max)
    mover, drv = sv.driver.mover, sv.driver
    mode = GraphMode.WHOLE if s.device.type == "cuda" else GraphMode.EAGER
    h2d0 = mover.stats.h2d_bytes
    res = run_sequence(s, sv, a, mode)
    n = args.decode
    extra: dict[str, Any] = {"budget_gb": sv.budget / 1e9, "pool_gb": sv.model.moe.pool.nbytes / 1e9,
                             "h2d_gb_per_token": (mover.stats.h2d_bytes - h2d0) / 1e9 / (n + args.prompt),
                             "stall_s": drv.stall_s,   # host time serving STALL misses (sync + copies)
                             "host_wait_s": drv.observer.wait_s if drv.observer else 0.0,  # routing not yet copied "promotions": mover.stats.promotions,
                             "demotions": mover.stats.demotions, "lag": lag if not drv.stall else 0,
                             "graph": "per-layer" if drv.stall and mode is not GraphMode.EAGER else mode.value}
    dec, cs = np.asarray(res["decode_s"]), np.asarray(res["copy_steps"])
    if cs.any() and (~cs).any() and bw:
        copy_s = mover.stats.h2d_bytes / (bw["h2d_pinned_gbps"] * 1e9)
        exposed = max(0.0, float(np.median(dec[cs]) - np.median(dec[~cs]))) * int(cs.sum())
        extra.update(copy_steps=int(cs.sum()), copy_time_s=copy_s, promotion_hidden=1 - min(1.0, exposed / copy_s))
    if name == "static_int4" and s.device.type == "cuda":
        for m2 in (GraphMode.LAYER, GraphMode.EAGER):
            extra[f"tpot_ms_{m2.value}"] = float(np.median(run_sequence(s, sv, a, m2)["decode_s"]) * 1e3)
    if name in ("static_int4", "bf16_resident"):
        for rows in args.batch:
            t = batch_tpot(s, sv, rows, min(16, args.decode), args.prompt)
            extra[f"batch{rows}_step_ms"] = t * 1e3
            extra[f"batch{rows}_tokens_per_s"] = rows / t
    row = row_of(name if lag == args.lag or drv.stall or name in ("static_int4", "bf16_resident", "lru_bf16")
                 else f"{name}_lag{lag}", res, s, extra)
    logits = res["logits"]
    del sv, res
    return row, logits


def _write(path: str | None, obj: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def format_table(rows: list[dict[str, Any]], head: str) -> str:
    cols = [("config", "config", "{}"), ("tpot_ms_p50", "TPOT p50 ms", "{:.2f}"), ("ttft_ms", "TTFT ms", "{:.1f}"),
            ("tokens_per_s", "tok/s", "{:.0f}"), ("h2d_gb_per_token", "H2D GB/tok", "{:.3f}"),
            ("stall_s", "stall s", "{:.3f}"), ("promotions", "promotions", "{}"),
            ("promotion_hidden", "hidden", "{:.0%}"), ("kl_mean", "KL nats", "{:.2e}")]
    lines = [head, " | ".join(c[1] for c in cols)]
    for r in rows:
        lines.append(" | ".join("-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/decode_fast.py needs a CUDA GPU (or --small for the CPU smoke run)")
    t0 = time.perf_counter()
    s = build_setup(args)
    bw = measure_bandwidths(s.device)
    print(f"built {s.spec.layers} layers in {time.perf_counter() - t0:.0f} s; bandwidths {bw}", flush=True)
    rows, logits, out = [], {}, {"bandwidths": bw, "layers": s.spec.layers, "prompt": args.prompt,
                                 "decode": args.decode, "chunk": args.chunk}
    ours = [c for c in args.configs if c != "hf"]
    ours.sort(key=lambda c: c != "bf16_resident")        # the KL reference first
    if any(c.startswith(("dynaexq", "lru")) for c in ours) or args.stress:
        t1 = time.perf_counter()
        s.store = HostStore(s.spec, progress=False).fill_bf16(s.weights)
        print(f"host store bf16 {s.store.nbytes() / 1e9:.1f} GB pinned in {time.perf_counter() - t1:.0f} s", flush=True)
    if "hf" in args.configs:
        res = hf_baseline(s, args, min(args.decode, 16))
        rows.append(row_of(f"hf_{args.hf_experts}_eager", res, s, {"graph": "none (eager)"}))
        logits["hf"] = res["logits"]
        print(rows[-1], flush=True)
    for name in ours:
        for lag in ([args.lag, args.lag + 1] if name == "dynaexq" else [args.lag]):
            gc.collect()
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
            t1 = time.perf_counter()
            row, lg = run_ours(s, name, args, lag, bw)
            logits[row["config"]] = lg
            rows.append(row)
            print(f"{row['config']}: {json.dumps(row)} ({time.perf_counter() - t1:.0f} s)", flush=True)
            _write(args.out, {**out, "rows": rows})  # a run cut short keeps what it measured
    ref = logits.get("bf16_resident")
    for r in rows:
        key = "hf" if r["config"].startswith("hf_") else r["config"]
        if ref is not None and key in logits:
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
    head = (f"{dev} | torch {torch.__version__} | Qwen3-30B-A3B shape, random weights, {s.spec.layers} of 48 layers | "
            f"batch 1, prompt {args.prompt} (chunk {args.chunk}), decode {args.decode}, teacher-forced")
    print(format_table(rows, head))
    _write(args.out, out)


if __name__ == "__main__":
    main()
