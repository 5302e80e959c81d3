"""Calibration: measure this machine and write a :class:`core.hardware.HardwareProfile` YAML.

``moebits runtime calibrate [--runtime graph|eager] [--quick] [--name NAME | --out FILE]``
(the same as ``python -m moebits.runtime.calibrate``): writes ``conf/hardware/NAME.yaml``, which
``moebits sim hardware=NAME`` uses directly; its ``calibration`` field says on which GPU, driver,
torch, date and runtime path it was measured.

``--runtime graph`` (the default on a GPU) measures the kernels the graph-captured runtime
replays (:mod:`runtime.calibrate_graph`: the fused experts read through the residency table, the
attention block, the per-step fixed part) and writes ``fused_moe``, ``non_moe_table`` and
``step_overhead_s``. ``--runtime eager`` measures the eager runtime as below. Both measure the
PCIe curves, HBM, peak and host the same way, and on a GPU the copy/compute interference
(recorded in ``calibration``; the simulator assumes copies fully hidden).

Eager runtime, measured on the current device (the GPU when there is one, else the CPU, with small sizes):

- ``h2d`` / ``d2h``: pinned copies of 64 KiB .. 256 MiB (CPU: memcpy of 4 KiB .. 4 MiB); the
  latency is the intercept of a least-squares line through (bytes, seconds), and the bandwidth
  at each size is ``bytes / (seconds - latency)``, so ``LinkCurve.time_s`` reproduces the points;
- ``launch_s``: one tiny kernel launched from eager Python;
- ``kernel_tables``: the mixed-precision layer (:class:`runtime.moe_layer.MixedPrecisionMoE`) at
  the model's expert shape, per precision and tokens per expert ``m``: the slope of one grouped
  call's time from 1 to ``n`` experts with ``m`` tokens each (GPU: device time of CUDA-graph
  replays, ``n`` = 64; CPU: wall clock, ``n = top_k``); ``expert_launch_ops``: the host time of
  one eager grouped call (what eager decoding pays per layer) in units of ``launch_s``;
- ``non_moe_launches``: a random-weight transformers decoder of the model's shape whose experts
  return zeros, one decode token: the time per layer in units of ``launch_s``;
- ``hbm_gbps``: bf16 expert bytes over the per-expert bf16 time at one token (streaming read);
  ``peak_tflops``: a large bf16 matmul; host: an fp32 matmul and a large memcpy on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moebits.core.hardware import HardwareProfile, KernelTable, LinkCurve
from moebits.core.model_spec import MODEL_PRESETS, ModelSpec
from moebits.runtime.calibrate_graph import calibrate_graph
from moebits.runtime.moe_layer import MixedPrecisionMoE, build_mixed_experts
from moebits.runtime.pass_designs import DesignPlan, fit_tables, run_designs

CONF_HW = Path(__file__).resolve().parents[1] / "conf" / "hardware"


def timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """``time(fn, reps)``: median seconds of one call (CUDA events on a GPU, wall clock on CPU)."""
    def run(fn: Callable[[], Any], reps: int) -> float:
        fn()  # warm-up (compiles, autotunes)
        out = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return float(np.median(out))
    return run


def link_curve(sizes: list[int], seconds: list[float]) -> LinkCurve:
    """Latency = least-squares intercept (>= 0); bandwidth per size reproduces each point."""
    s, t = np.asarray(sizes, float), np.asarray(seconds, float)
    slope, intercept = np.polyfit(s, t, 1)
    lat = float(max(0.0, min(intercept, t.min() * 0.9)))
    gbps = [float(x / max(y - lat, 1e-12) / 1e9) for x, y in zip(s, t, strict=True)]
    return LinkCurve(latency_s=lat, sizes_bytes=[float(x) for x in s], gbps=gbps)


def measure_link(device: torch.device, sizes: list[int], reps: int, to_device: bool) -> LinkCurve:
    """Host<->device copies (pinned host memory); on CPU, plain memcpy between two buffers."""
    time_fn = timer(device)
    cuda = device.type == "cuda"
    host = torch.empty(max(sizes), dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(max(sizes), dtype=torch.uint8, device=device)
    secs = []
    for n in sizes:
        src, dst = (host[:n], dev[:n]) if to_device else (dev[:n], host[:n])
        secs.append(time_fn(functools.partial(dst.copy_, src, non_blocking=cuda), reps))
    return link_curve(sizes, secs)


def measure_launch(device: torch.device, reps: int = 200) -> float:
    """Seconds per tiny op launched back to back from eager Python."""
    x = torch.zeros(1, device=device)
    time_fn = timer(device)

    def burst() -> None:
        for _ in range(reps):
            x.add_(1)

    return time_fn(burst, 5) / reps


def graph_time(fn: Callable[[], Any], reps: int) -> float:
    """Median GPU seconds of ``fn`` replayed from a CUDA graph (no launch overhead); eager if it cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up off the capture (autotuning, allocations)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return timer(torch.device("cuda"))(fn, reps)
    return timer(torch.device("cuda"))(graph.replay, reps)


def wall_time(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Wall seconds per call of ``fn`` issued back to back (the host's cost when launch-bound)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps


def measure_kernels(spec: ModelSpec, precisions: list[str], tokens: list[int], device: torch.device,
                    launch_s: float, reps: int) -> tuple[list[KernelTable], float]:
    """Per-expert seconds per (precision, tokens per expert) and the launch ops of a grouped launch.

    On a GPU the per-expert time is the slope between 1 and ``n`` experts of CUDA-graph replays
    (device time; eager timing would measure the host's launches), and the launch ops are the
    eager host time of one grouped call of ``top_k`` experts at one token, less its device work.
    On CPU both come from wall-clock times of 1 and ``top_k`` experts."""
    cuda = device.type == "cuda"
    n = min(spec.experts, 64) if cuda else min(spec.top_k, spec.experts)
    gen = torch.Generator().manual_seed(0)
    e, h, i = max(n, 2), spec.hidden, spec.expert_intermediate
    gu = (0.02 * torch.randn(e, 2 * i, h, generator=gen)).to(device)
    dn = (0.02 * torch.randn(e, h, i, generator=gen)).to(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    time_fn = timer(device)
    tables, intercepts = [], []
    for p in precisions:
        layer = MixedPrecisionMoE(*build_mixed_experts(gu, dn, [p] * e))

        def call(m: int, count: int, lay: MixedPrecisionMoE = layer) -> Callable[[], Any]:
            x = torch.randn(m, h, generator=gen).to(device, dtype)
            ids = torch.arange(count, device=device).repeat(m, 1)                   # [m, count]
            w = torch.full((m, count), 1.0 / count, device=device)
            return lambda: lay(x, ids, w)

        per = []
        for m in tokens:
            t_of = {c: (graph_time(call(m, c), reps) if cuda else time_fn(call(m, c), reps)) for c in (1, n)}
            slope = max((t_of[n] - t_of[1]) / max(n - 1, 1), 0.0)
            per.append(slope)
            if not cuda:
                intercepts.append(max(t_of[1] - slope, 0.0))
        if cuda:
            k = min(spec.top_k, e)
            intercepts.append(max(wall_time(call(1, k), reps, device) - k * per[0], 0.0))
        tables.append(KernelTable(p, h, i, tokens=[float(m) for m in tokens], seconds=per))
    ops = float(np.median(intercepts)) / max(launch_s, 1e-9)
    return tables, ops


def measure_non_moe(spec: ModelSpec, device: torch.device, launch_s: float, reps: int) -> float:
    """Non-MoE launches per layer: one decode token through a decoder whose experts return zeros."""
    from moebits.runtime import hf
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("moebits_null", lambda module, x, ids, w: torch.zeros_like(x))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = dataclasses.replace(spec, layers=min(spec.layers, 2))  # the time per layer is what is measured
    model, _ = hf.build_random_model(spec, device=device, dtype=dtype)
    hf.set_experts_implementation(model, "moebits_null")
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        t = timer(device)(lambda: model(input_ids=ids, use_cache=False), reps)
    return t / spec.layers / max(launch_s, 1e-9)


def measure_peak_tflops(device: torch.device, n: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = timer(device)(lambda: a @ a, 5)
    return 2 * n**3 / t / 1e12


def measure_host(n: int, nbytes: int) -> tuple[float, float]:
    """(host GFLOP/s of an fp32 matmul, host memcpy GB/s)."""
    cpu = torch.device("cpu")
    a = torch.randn(n, n)
    flops = 2 * n**3 / timer(cpu)(lambda: a @ a, 3) / 1e9
    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    gbps = nbytes / timer(cpu)(lambda: dst.copy_(src), 3) / 1e9
    return flops, gbps


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


PRECISIONS = ("bf16", "fp8", "int8", "int4", "int3", "int2")


@dataclasses.dataclass
class CalibrateOptions:
    """What to measure: the runtime path, precisions, tokens per expert, rows, context, repetitions."""

    runtime: str = "graph"
    small: bool = False
    precisions: tuple[str, ...] = PRECISIONS
    tokens: tuple[int, ...] = (1, 16, 128)
    rows: tuple[int, ...] = (1, 16, 128)
    context: int = 512
    reps: int = 20
    designs: DesignPlan | None = None   # whole-pass designs of the graph path (None: DesignPlan())


SMALL_DESIGNS = DesignPlan(layers=(1, 2), rows=(1, 2), contexts=(8,), prefill=(4,), designs=3, reps=2)  # CPU smoke


def calibrate(spec: ModelSpec, device: torch.device, opt: CalibrateOptions | None = None,
              log: Callable[[str], None] = print) -> HardwareProfile:
    """Measure ``device`` for the runtime path ``opt.runtime`` (see the module docstring)."""
    opt = opt or CalibrateOptions()
    cuda = device.type == "cuda"
    sizes = [2**k for k in ((12, 14, 16, 18, 20, 22) if opt.small else (16, 18, 20, 22, 24, 26, 28))]
    h2d = measure_link(device, sizes, opt.reps, to_device=True)
    d2h = measure_link(device, sizes, opt.reps, to_device=False)
    log(f"h2d latency {h2d.latency_s * 1e6:.1f} us, {h2d.gbps[-1]:.1f} GB/s at {sizes[-1] >> 20} MiB; "
        f"d2h {d2h.gbps[-1]:.1f} GB/s")
    launch = measure_launch(device)
    log(f"eager launch {launch * 1e6:.1f} us")
    precisions = tuple(p for p in opt.precisions if cuda or p != "fp8")  # no fp8 matmul on CPU
    peak = measure_peak_tflops(device, 256 if opt.small else 8192)
    host_gflops, host_gbps = measure_host(256 if opt.small else 2048, 2**22 if opt.small else 2**28)
    total = torch.cuda.get_device_properties(device).total_memory if cuda else _host_ram_bytes()
    meta = provenance(device, opt.runtime)
    if cuda:
        meta.update(measure_interference(device, opt.small))
        log(f"copy/compute interference: {meta}")
    common = dict(name=f"calibrated_{device_slug(device)}", hbm_capacity_gb=_sig(total / 1e9 * 0.98), h2d=h2d,
                  d2h=d2h, peak_tflops={"bf16": _sig(peak)}, host_gflops=_sig(host_gflops),
                  host_gbps=_sig(host_gbps), calibration=meta,
                  source=f"moebits runtime calibrate --runtime {opt.runtime} on {device_slug(device)} "
                         f"(model shape {spec.name}: {spec.hidden}x{spec.expert_intermediate})")
    if opt.runtime == "graph":
        return _graph_profile(spec, device, precisions, opt, h2d, d2h, common, log)
    tables, ops = measure_kernels(spec, list(precisions), list(opt.tokens), device, launch, opt.reps)
    non_moe = measure_non_moe(spec, device, launch, max(3, opt.reps // 4))
    return HardwareProfile(hbm_gbps=_sig(_hbm_from(spec, tables, device)), launch_s=launch,
                           expert_launch_ops=max(1, round(ops)), non_moe_launches=max(1, round(non_moe)),
                           kernel_tables=tables, host_overhead_s=launch, **common)  # type: ignore[arg-type]


def _graph_profile(spec: ModelSpec, device: torch.device, precisions: tuple[str, ...], opt: CalibrateOptions,
                   h2d: LinkCurve, d2h: LinkCurve, common: dict[str, Any], log: Callable[[str], None]) -> HardwareProfile:
    cuda = device.type == "cuda"
    reps = opt.reps

    def time_fn(fn: Callable[[], Any]) -> float:
        return graph_time(fn, reps) if cuda else timer(device)(fn, reps)

    def copy_s(nbytes: int, to_device: bool) -> float:
        return (h2d if to_device else d2h).time_s(nbytes)

    g = calibrate_graph(spec, device, list(precisions), list(opt.tokens), list(opt.rows), opt.context,
                        time_fn, copy_s, log)
    common["calibration"].update({k: f"{v:.4g}" for k, v in g.parts_s.items()})
    rows = run_designs(spec, list(precisions), opt.designs or DesignPlan(), device, log=log)
    tables = fit_tables(rows, list(precisions), spec)
    for t in tables:
        log(f"graph pass table ({'prefill' if t.prefill else 'decode'}): rows {t.rows}, fit {t.fit}")
    return HardwareProfile(hbm_gbps=_sig(_hbm_from(spec, g.tables, device)), launch_s=g.launch_s,
                           expert_launch_ops=2, non_moe_launches=0, kernel_tables=g.tables,
                           host_overhead_s=20e-6, non_moe_table=g.non_moe, fused_moe=True,
                           step_overhead_s=g.step_overhead_s, graph_tables=tables, **common)


def _hbm_from(spec: ModelSpec, tables: list[KernelTable], device: torch.device) -> float:
    """Streaming read: bf16 expert bytes over its per-expert time at one token (else a d2d copy)."""
    bf16 = next((t for t in tables if t.precision == "bf16"), None)
    if bf16 and bf16.seconds[0] > 0:
        return spec.expert_bytes("bf16") / bf16.seconds[0] / 1e9
    return measure_d2d_gbps(device)


def measure_d2d_gbps(device: torch.device, nbytes: int = 2**26) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / timer(device)(lambda: b.copy_(a), 5) / 1e9


def measure_interference(device: torch.device, small: bool) -> dict[str, str]:
    """A pinned host->device copy on a side stream during a loop of bf16 GEMMs: the share of the
    copy hidden and the GEMMs' slowdown (strings, for the profile's ``calibration`` record)."""
    n, nbytes = (1024, 2**24) if small else (4096, 2**28)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)
    t = timer(device)
    copy_s = t(lambda: dev.copy_(host, non_blocking=True), 3)
    reps = max(1, int(copy_s / max(t(lambda: a @ a, 3), 1e-9)))

    def gemms() -> None:
        for _ in range(reps):
            a @ a

    alone = t(gemms, 3)

    def both() -> None:
        with torch.cuda.stream(side):
            dev.copy_(host, non_blocking=True)
        gemms()
        torch.cuda.current_stream().wait_stream(side)

    together = t(both, 3)
    hidden = 1.0 - max(together - alone, 0.0) / copy_s
    return {"copy_hidden_fraction": f"{min(max(hidden, 0.0), 1.0):.3f}",
            "gemm_slowdown_fraction": f"{max(together / alone - 1.0, 0.0):.3f}"}


def provenance(device: torch.device, runtime: str) -> dict[str, str]:
    """GPU, driver, torch, date and runtime path of a calibration."""
    driver = "none"
    if device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown"
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "driver": driver,
            "torch": str(torch.__version__), "cuda": str(torch.version.cuda), "runtime": runtime,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ")}


def _sig(x: float) -> float:
    """Four significant digits, never below 1e-6 (profiles need positive rates)."""
    return max(float(f"{x:.4g}"), 1e-6)


def _host_ram_bytes() -> int:
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def write_profile(hw: HardwareProfile, path: Path) -> Path:
    """The profile as a ``conf/hardware/`` preset (composes as ``hardware=<stem>``)."""
    import yaml

    body = hw.to_dict()
    body = {k: (_rounded(v) if isinstance(v, float) else v) for k, v in body.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# {hw.source}\ndefaults:\n  - base_hardware\n  - _self_\n\n" + yaml.safe_dump(body, sort_keys=False)
    path.write_text(text)
    return path


def _rounded(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def read_profile(path: Path) -> HardwareProfile:
    import yaml

    body = yaml.safe_load(path.read_text())
    body.pop("defaults", None)
    return HardwareProfile.from_dict(body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="moebits runtime calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_30b_a3b", help="ModelSpec preset (file stem) whose shapes to time")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--runtime", default="auto", choices=("auto", "graph", "eager"),
                    help="runtime path to calibrate (auto: graph on a GPU, eager on a CPU)")
    ap.add_argument("--small", action="store_true", help="small sizes and a small model (CPU smoke runs); default on CPU")
    ap.add_argument("--quick", action="store_true", help="fewer points (tokens 1,16; rows 1,16; 5 reps): about a minute on a GPU")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated precisions to time")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per point (median)")
    ap.add_argument("--name", default=None, help="profile name: writes conf/hardware/NAME.yaml")
    ap.add_argument("--out", default=None, help="output YAML path (overrides --name; the stem is the profile name)")
    args = ap.parse_args(argv)
    stems = {n.lower().replace(".", "").replace("-", "_"): s for n, s in MODEL_PRESETS.items()}
    if args.model not in stems:
        raise SystemExit(f"error: unknown --model {args.model!r}; known: {', '.join(sorted(stems))}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    spec = stems[args.model]
    small = args.small or device.type == "cpu"
    if small:
        spec = ModelSpec(spec.name, layers=2, experts=16, top_k=4, hidden=256, expert_intermediate=128,
                         attention_params=4 * 256 * 256, vocab_size=1024)
    runtime = args.runtime if args.runtime != "auto" else ("graph" if device.type == "cuda" else "eager")
    opt = CalibrateOptions(runtime=runtime, small=small, precisions=tuple(args.precisions.split(",")),
                           reps=5 if args.quick else args.reps)
    if args.quick:
        opt = dataclasses.replace(opt, tokens=(1, 16), rows=(1, 16))
    if small:
        opt = dataclasses.replace(opt, context=32, designs=SMALL_DESIGNS)
    elif args.quick:
        opt = dataclasses.replace(opt, designs=DesignPlan(rows=(1, 16), contexts=(32, 700), prefill=(32,), designs=4))
    bad = sorted(set(opt.precisions) - set(PRECISIONS))
    if bad:
        raise SystemExit(f"error: unknown precision(s) {bad}; known: {', '.join(PRECISIONS)}")
    hw = calibrate(spec, device, opt)
    out = Path(args.out) if args.out else CONF_HW / f"{args.name or hw.name}.yaml"
    hw = dataclasses.replace(hw, name=out.stem)  # hydra presets are named after their file
    print(f"wrote {write_profile(hw, out)}")
    if opt.runtime == "graph":
        print(f"next: the host side (per pass, per copy, per policy observation), measured on synthetic runs:\n"
              f"  moebits analysis calibrate-host --hardware {out} --out {out}")


if __name__ == "__main__":
    main()
