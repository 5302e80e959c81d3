"""Fingerprints of simulator results: hash ``summary.json`` and ``steps.parquet`` of many runs.

A refactor that must not change behaviour is checked by running this before and after on the
same machine and comparing (``--compare BEFORE.json``): every registered policy (from the
registry) x every miss rule x two budgets x three workloads (the embedded default trace, a real
Mixtral-8x7B trace imported from ``../shared/traces/real`` with ``moebits traces import``, and a
synthetic workload at batch 4). Per run it records the SHA-256 of ``steps.parquet`` (the file's
bytes) and of ``summary.json`` without the wall-clock keys (``wall_s``, ``layer_steps_per_s``);
a run that fails records the hash of its one-line error. Exit status 1 when ``--compare`` finds
a difference.

    python benchmarks/result_hashes.py -o /tmp/before.json
    python benchmarks/result_hashes.py -o /tmp/after.json --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from moebits.core.config import one_line
from moebits.policies.base import policy_configs
from moebits.sim.app import CONF_DIR, run_config
from moebits.sim.config import RunConfig, register_configs
from omegaconf import OmegaConf
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "traces" / "real" / "mixtral8x7b_speculative-moe" / "gsm8k_2_routing.jsonl"
WALL_KEYS = ("wall_s", "layer_steps_per_s", "setup_s")
MISS_RULES = ("STALL", "SERVE_LOWER", "HOST")
BUDGETS = ("budget=all_int4", "budget=bf16_25pct")


def workloads(tmp: Path, real: Path) -> dict[str, list[str]]:
    """Workload name -> hydra overrides (the real trace only where ../shared has it)."""
    out = {"default": ["workload.max_seqs=2"],
           "synth_b4": ["workload=synth", "workload.batch=4", "workload.seqs=4", "workload.decode_tokens=16",
                        "model=olmoe_1b_7b"]}
    if real.exists():
        path = tmp / "mixtral.parquet"
        subprocess.run([sys.executable, "-m", "moebits.traces", "import", str(real), "-o", str(path)],
                       check=True, capture_output=True)
        out["mixtral"] = ["model=trace", "workload=file", f"workload.path={path}"]
    return out


def cases(tmp: Path, real: Path) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every run: policy x miss rule x budget x workload."""
    out = []
    for wname, wover in workloads(tmp, real).items():
        for budget in BUDGETS:
            for policy in sorted(policy_configs()):
                for rule in MISS_RULES:
                    over = [f"policy={policy}", f"policy.miss_rule={rule}", budget, *wover,
                            "progress=false", "figure=false"]
                    out.append((f"{wname}/{budget.split('=')[1]}/{policy}/{rule}", over))
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_case(overrides: list[str], out_dir: Path) -> dict[str, str]:
    """Compose, run and hash one configuration (the temporary folder's name hashed as ``TMP``,
    the checkout's as ``ROOT``, so that two checkouts compare)."""
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
        assert isinstance(cfg, RunConfig)
        summary = run_config(cfg, out_dir)
    except Exception as exc:  # noqa: BLE001 - a failing configuration is a result too
        return {"error": digest(one_line(exc).encode()), "message": one_line(exc)[:200]}
    text = (out_dir / "summary.json").read_text().replace(str(out_dir.parent), "TMP").replace(str(ROOT), "ROOT")
    kept = {k: v for k, v in json.loads(text).items() if k not in WALL_KEYS}
    return {"summary": digest(json.dumps(kept, sort_keys=True).encode()),
            "steps": digest((out_dir / "steps.parquet").read_bytes()),
            "layer_steps": str(summary.get("layer_steps"))}


def compare(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    diffs = [f"{k}: {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
    return diffs + [f"{k}: missing now" for k in before if k not in now]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("-o", "--output", type=Path, required=True, help="JSON file of hashes to write")
    ap.add_argument("--compare", type=Path, help="a JSON file of an earlier run: list every difference")
    ap.add_argument("--real", type=Path, default=REAL, help="the real trace to import (default: %(default)s)")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    args = ap.parse_args()
    register_configs()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        todo = [c for c in cases(Path(tmp), args.real) if args.only in c[0]]
        for i, (name, over) in enumerate(tqdm(todo, desc="runs", unit="run")):
            results[name] = run_case(over, Path(tmp) / f"run{i}")
    args.output.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    failed = sum("error" in r for r in results.values())
    print(f"{len(results)} runs ({failed} ended in an error, hashed too) -> {args.output}")
    if args.compare:
        diffs = compare(results, json.loads(args.compare.read_text()))
        print("\n".join(diffs) if diffs else f"identical to {args.compare}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
