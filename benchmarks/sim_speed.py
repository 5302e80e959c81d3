"""Simulator speed: simulated layer steps per second of replay CPU time (one process, one core).

Replays a Qwen3-30B-A3B-shaped trace (48 MoE layers x 128 experts, top-8; by default the
embedded traces/data/default.parquet, else a synthetic one) on the h100_pcie5 profile at batch
1 and 16, the policy in the loop:

- ``lru_offload`` with a cache per layer and bypass (its preset: scope LAYER, 2 staging slots;
  bf16, 24 GB: a policy call, copies and a stall at every miss);
- ``lru_offload/global``: one pool, no staging (the previous semantics);
- ``dynaexq`` (its preset, 24 GB: int4 floor, bf16 hot copies, the general two-class path);
- ``static_uniform`` (all experts int4: the vectorized static path).

Reports layer steps per second of the replay itself (set-up timed apart), per wall and per
CPU second (a loaded machine inflates wall time), best of ``--repeat``, the policy actions
carried out and the replay's CPU time per action, the load average, and this machine's bare
SimPy rate (an empty process yielding one timeout per step: the engine yields one per layer
step, so this is the ceiling of any replay). ``--previous TREE`` runs the same cases in a
subprocess on another version of the code (a namespace tree laid out by ``.ci/nstree``, e.g.
of the previous commit), in the same run, so before/after figures share the machine and its
load; cases that version cannot configure are skipped. Targets (issue 9): >= 100,000 layer
steps per CPU second for lru_offload (per layer) and dynaexq at batch 1, >= 20,000 at batch 16.

    python -P benchmarks/sim_speed.py                 # the default trace, batch 1 and 16
    python -P benchmarks/sim_speed.py --previous /tmp/old/build/ns --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import simpy
import yaml
from moebits.core.hardware import HardwareProfile
from moebits.core.model_spec import get_model_spec
from moebits.policies.base import build_policy, policy_configs
from moebits.sim.engine import Engine
from moebits.traces.format import Trace, read_trace
from moebits.traces.replay import build_view

try:  # workloads moved from sim/ to traces/ (issue 8); --previous may run a tree from before
    from moebits.traces.workload import default_trace_path
    from moebits.traces.zipf import synth_trace
except ImportError:
    from moebits.sim.synth import synth_trace  # type: ignore[no-redef]
    from moebits.sim.workload import default_trace_path  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
CASES = (
    ("lru_offload", "lru_offload", {"precision": "bf16"}),
    ("lru_offload/global", "lru_offload", {"precision": "bf16", "scope": "GLOBAL", "staging_experts": 0}),
    ("dynaexq", "dynaexq", {}),
    ("static_uniform", "static_uniform", {"precision": "int4"}),
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def simpy_rate(n: int = 200_000) -> tuple[float, float]:
    """Empty SimPy timeouts per wall and per CPU second on this machine (the floor of any SimPy model)."""
    env = simpy.Environment()

    def tick(env: simpy.Environment):
        for _ in range(n):
            yield env.timeout(1.0)

    env.process(tick(env))
    t0, c0 = time.perf_counter(), time.process_time()
    env.run()
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def load_trace(path: str | None, seqs: int) -> tuple[Trace, str]:
    if path:
        return read_trace(path), path
    default = default_trace_path()
    if default.exists():
        return read_trace(default), str(default.relative_to(default.parents[2]))
    spec = get_model_spec("Qwen3-30B-A3B")
    return synth_trace(
        spec, np.random.default_rng(0), seqs=seqs, prompt_tokens=32, decode_tokens=128
    ), "sim.synth"


def hardware(name: str) -> HardwareProfile:
    body = yaml.safe_load((ROOT / "conf" / "hardware" / f"{name}.yaml").read_text())
    body.pop("defaults", None)
    return HardwareProfile.from_dict(body)


def policy_config(name: str, knobs: dict) -> object | None:
    """The policy's config with ``knobs`` (enum fields by member name), or None when this
    version of the code has no such field."""
    cfg_type = policy_configs()[name]
    fields = getattr(cfg_type, "__dataclass_fields__", {})
    if any(k not in fields for k in knobs):
        return None
    cfg = cfg_type()
    for k, v in knobs.items():
        current = getattr(cfg, k)
        setattr(cfg, k, type(current)[v] if hasattr(type(current), "__members__") else v)
    return cfg


def measure(trace: Trace, batch: int, cfg: object, budget_gb: float, hw: HardwareProfile,
            repeat: int) -> dict[str, float]:
    """Layer steps, best replay wall and CPU seconds, set-up seconds and actions of one case."""
    view = build_view(trace, batch)
    out = {"steps": view.layer_steps, "wall": float("inf"), "cpu": float("inf"), "setup": 0.0, "actions": 0}
    for _ in range(repeat):
        t0 = time.perf_counter()
        engine = Engine(view, trace.spec, hw, build_policy(cfg), int(budget_gb * 1e9))
        out["setup"] = time.perf_counter() - t0
        c0 = time.process_time()
        wall = engine.run().wall_s
        out["cpu"] = min(out["cpu"], time.process_time() - c0)
        out["wall"] = min(out["wall"], wall)
        out["actions"] = sum(engine.counts.values())  # with bypasses (streamed experts), where counted
    return out


def run_cases(args: argparse.Namespace) -> list[dict]:
    trace, _ = load_trace(args.trace, args.seqs)
    hw = hardware(args.hardware)
    rows = []
    for batch in args.batch:
        for label, name, knobs in CASES:
            cfg = policy_config(name, knobs)
            if cfg is None:
                continue
            rows.append({"case": label, "batch": batch, **measure(trace, batch, cfg, args.budget_gb, hw, args.repeat)})
    return rows


def previous_rows(args: argparse.Namespace) -> list[dict]:
    """The same cases on the code in ``args.previous`` (a subprocess, JSON on stdout)."""
    cmd = [sys.executable, "-P", __file__, "--json", "--batch", *map(str, args.batch), "--repeat", str(args.repeat),
           "--budget-gb", str(args.budget_gb), "--hardware", args.hardware, "--seqs", str(args.seqs)]
    if args.trace:
        cmd += ["--trace", args.trace]
    env = {**os.environ, "PYTHONPATH": str(args.previous)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd="/")
    return json.loads(done.stdout)


def print_rows(title: str, rows: list[dict]) -> None:
    print(title)
    print(f"{'case':<20}{'batch':>6}{'layer steps':>13}{'actions':>10}{'replay s':>10}{'steps/s':>10}"
          f"{'CPU s':>8}{'steps/CPU s':>13}{'CPU us/action':>15}{'set-up s':>10}")
    for m in rows:
        per_action = f"{m['cpu'] / m['actions'] * 1e6:.2f}" if m["actions"] else "-"
        print(f"{m['case']:<20}{m['batch']:>6}{m['steps']:>13,}{m['actions']:>10,}{m['wall']:>10.3f}"
              f"{m['steps'] / m['wall']:>10,.0f}{m['cpu']:>8.3f}{m['steps'] / m['cpu']:>13,.0f}{per_action:>15}"
              f"{m['setup']:>10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", help="a moebits trace (default: traces/data/default.parquet, else synthetic)")
    ap.add_argument("--seqs", type=int, default=16, help="sequences of the synthetic fallback trace")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    ap.add_argument("--budget-gb", type=float, default=24.0, help="expert budget (default 24)")
    ap.add_argument("--hardware", default="h100_pcie5", help="conf/hardware preset (default h100_pcie5)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case, best kept (default 2)")
    ap.add_argument("--previous", type=Path, help="namespace tree of another code version to run alongside")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON only (used by --previous)")
    args = ap.parse_args()
    if args.json:
        print(json.dumps(run_cases(args)))
        return
    trace, source = load_trace(args.trace, args.seqs)
    print(f"trace: {source} ({trace.spec.name}, {trace.num_seqs} sequences, {trace.rows:,} rows)")
    wall_rate, cpu_rate = simpy_rate()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"machine: {cpu_model()}, nproc {os.cpu_count()}, load average {load}, python {platform.python_version()}, "
        f"bare SimPy {wall_rate:,.0f} timeouts/s ({cpu_rate:,.0f} per CPU s)"
    )
    if args.previous:
        print_rows(f"previous version ({args.previous}):", previous_rows(args))
    print_rows("this version:", run_cases(args))


if __name__ == "__main__":
    main()
