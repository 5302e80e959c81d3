"""How long a finished sweep takes to resume, before and after an edit of the code or the conf.

A copy of a checkout (``--repo``, default this one; ``git archive main | tar -x -C DIR`` gives
an older one) runs one small sweep of ``moebits sim`` to the end, then runs it again: unchanged,
after a comment is added to a simulator module (code the configs are not made of), after a
comment is added to a policy preset (conf/policy/dynaexq.yaml), and after a value of that preset
changes (its runs must run again). Every resume should reuse every run but the changed preset's;
the figure is how long deciding that takes. The copy is edited, never the checkout.

    python benchmarks/sweep_resume.py                  # this checkout
    python benchmarks/sweep_resume.py --repo /tmp/old  # another one, same sweep

Prints one table row per step: wall seconds, the sweep's tally line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COPIED = ("moebits", "core", "traces", "policies", "drive", "sim", "runtime", "analysis", "conf", ".ci")
POLICIES = "static_uniform,static_frequency,lru_offload,dynaexq,hobbit"
SWEEP = ["model=olmoe_1b_7b", "workload=synth", "workload.seqs=1", "workload.prompt_tokens=2",
         "workload.decode_tokens=3", "progress=false", "figure=false", f"policy={POLICIES}",
         "budget=all_int2,all_int3,all_int4,bf16_25pct", "seed=0,1,2,3,4,5"]


def copy_checkout(repo: Path, into: Path) -> Path:
    """The packages, conf and .ci of ``repo`` under ``into`` (train/ without its data), laid out
    as the ``moebits`` namespace; the PYTHONPATH that imports it."""
    for name in COPIED:
        shutil.copytree(repo / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "train", into / "train", ignore=shutil.ignore_patterns("__pycache__", "data"))
    return Path(subprocess.run(["bash", ".ci/nstree"], cwd=into, capture_output=True, text=True,
                               check=True).stdout.strip())


def sweep(src: Path, pythonpath: Path, out: Path) -> tuple[float, str]:
    """Run the sweep into ``out``; wall seconds and its tally line."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONSAFEPATH": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moebits.sim", "-m", *SWEEP, f"hydra.sweep.dir={out}"], cwd=src,
                          env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    tally = next((line for line in proc.stderr.splitlines() if " runs: " in line), proc.stderr[-300:])
    if proc.returncode != 0:
        raise SystemExit(f"error: the sweep failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall_s, tally.split(": ", 1)[-1]


def edit(path: Path, old: str | None, new: str) -> None:
    """Append ``new`` to ``path`` (``old`` None), or replace ``old`` by ``new`` in it."""
    text = path.read_text()
    if old is not None and old not in text:
        raise SystemExit(f"error: {path} holds no {old!r}")
    path.write_text(text + new if old is None else text.replace(old, new, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to copy")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sweep_resume") as tmp:
        src = Path(tmp) / "src"
        pythonpath = copy_checkout(args.repo.resolve(), src)
        out = Path(tmp) / "sweep"
        steps = [
            ("first run", None),
            ("resume, nothing changed", None),
            ("resume after a comment in sim/engine.py", lambda: edit(src / "sim/engine.py", None, "\n# edited\n")),
            ("resume after a comment in conf/policy/dynaexq.yaml",
             lambda: edit(src / "conf/policy/dynaexq.yaml", None, "\n# edited\n")),
            ("resume after dynaexq's alpha changed", lambda: edit(src / "conf/policy/dynaexq.yaml", "alpha: 0.95", "alpha: 0.5")),
        ]
        print(f"| step ({args.repo}) | wall s | tally |\n|---|---|---|")
        for name, change in steps:
            if change is not None:
                change()
            wall_s, tally = sweep(src, pythonpath, out)
            print(f"| {name} | {wall_s:.1f} | {tally} |", flush=True)


if __name__ == "__main__":
    main()
