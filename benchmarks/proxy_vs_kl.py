"""Does the quality proxy rank policies as measured KL does? (DESIGN.md: checked, not assumed.)

Runs ``moebits runtime`` (GENERATE, CPU, a small random-weight model: 2 MoE layers, sizes x
``--scale``) under several static policies that serve clearly different precision mixes of the
same model (same seed, same prompts): ``static_uniform`` at int8 / int4 / int3 / int2 (budget
``all_<p>``) and ``mxmoe`` at the all-int8 / all-int4 / all-int3 budgets. For each run it reads
from ``summary.json`` the runtime's ``quality_proxy`` (gate-weighted quantization error per
token-layer, :mod:`core.quality`, synthetic sensitivity table seeded by the run's seed) and the
measured ``kl_mean`` (mean KL divergence of next-token distributions vs the bf16 model, nats),
prints a table and the Spearman rank correlation between the two.

    python benchmarks/proxy_vs_kl.py [--seqs 2] [--decode 8] [--scale 0.0625] [--out results.json]

Random weights are not a trained model: the KL values are tiny and only their order means much.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
CASES: tuple[tuple[str, str, str], ...] = (
    # (label, policy overrides, budget preset)
    ("static_uniform int8", "policy=static_uniform policy.precision=int8", "all_int8"),
    ("static_uniform int4", "policy=static_uniform policy.precision=int4", "all_int4"),
    ("static_uniform int3", "policy=static_uniform policy.precision=int3", "all_int3"),
    ("static_uniform int2", "policy=static_uniform policy.precision=int2", "all_int2"),
    ("mxmoe @ all_int8", "policy=mxmoe", "all_int8"),
    ("mxmoe @ all_int4", "policy=mxmoe", "all_int4"),
    ("mxmoe @ all_int3", "policy=mxmoe", "all_int3"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=2, help="random prompts per run (default 2)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--decode", type=int, default=8, help="decode tokens per prompt (default 8)")
    p.add_argument("--scale", type=float, default=0.0625, help="hidden/expert size factor (default 1/16)")
    p.add_argument("--seed", type=int, default=0, help="model, prompts and sensitivity-table seed")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def run_case(policy: str, budget: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """One ``moebits runtime`` run on CPU; its summary.json as a dict."""
    cmd = [sys.executable, "-m", "moebits.runtime", *policy.split(), f"budget={budget}", "runtime.device=cpu",
           f"runtime.scale={args.scale}", f"workload.seqs={args.seqs}", f"workload.prompt_tokens={args.prompt}",
           f"workload.decode_tokens={args.decode}", f"seed={args.seed}", "progress=false", "resume=false",
           f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads((run_dir / "summary.json").read_text())


def mix(activations: dict[str, int]) -> str:
    """Served precision mix, e.g. 'int4 51%, int3 34%'."""
    total = max(sum(activations.values()), 1)
    return ", ".join(f"{p} {100 * n / total:.0f}%" for p, n in activations.items() if n)


def spearman(x: pd.Series, y: pd.Series) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return float(np.corrcoef(x.rank().to_numpy(), y.rank().to_numpy())[0, 1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="proxy_vs_kl_") as tmp:
        for k, (label, policy, budget) in enumerate(tqdm(CASES, desc="runs")):
            t0 = time.perf_counter()
            s = run_case(policy, budget, args, Path(tmp) / f"run{k}")
            rows.append({"run": label, "budget": budget, "mix": mix(s["activations"]),
                         "quality_proxy": s["quality_proxy"], "kl_mean": s["kl_mean"], "kl_p99": s["kl_p99"],
                         "wall_s": time.perf_counter() - t0})
    df = pd.DataFrame(rows)
    print("| run | budget | served mix | quality proxy | KL mean (nats) | KL p99 (nats) |")
    print("|---|---|---|---|---|---|")
    for r in df.itertuples():
        print(f"| {r.run} | {r.budget} | {r.mix} | {r.quality_proxy:.4f} | {r.kl_mean:.3e} | {r.kl_p99:.3e} |")
    rho = spearman(df["quality_proxy"], df["kl_mean"])
    rho_u = spearman(*(df[df["run"].str.startswith("static_uniform")][c] for c in ("quality_proxy", "kl_mean")))
    rho_m = spearman(*(df[df["run"].str.startswith("mxmoe")][c] for c in ("quality_proxy", "kl_mean")))
    print(f"Spearman(proxy, KL mean): all {len(df)} runs {rho:.3f}; static_uniform {rho_u:.3f}; mxmoe {rho_m:.3f}")
    print(f"total wall {df['wall_s'].sum():.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "spearman": rho, "spearman_static_uniform": rho_u,
                                        "spearman_mxmoe": rho_m, "args": {k: str(v) for k, v in vars(args).items()}},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
