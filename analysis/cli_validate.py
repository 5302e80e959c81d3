"""``moebits analysis validate``: one trace, policy and budget through the runtime and the simulator."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moebits.analysis.fidelity import resimulate, summary_md, validate
from moebits.core.hardware import HardwareProfile

EPILOG = """Runs `moebits runtime runtime.mode=REPLAY OVERRIDES` (the live replay: the GPU when
there is one, else the CPU with a scaled-down model), then the simulator on exactly what it
replayed (same layers, shapes, trace view, budget bytes, policy, seed, observe_lag), priced by
--hardware. Writes to --out: fidelity.json (one row per case, appended), CASE.passes.csv
(measured and simulated latency of every pass), CASE.png (simulated vs measured step latency)
and fidelity.md (the table of every row in fidelity.json). Exit status 1 when the decisions
differ (or, with --cases-file, a case failed; the other cases still run).

examples:
  moebits analysis validate --hardware calibrated_h200 --out out/fid -- policy=static_uniform budget=all_int4
  moebits analysis validate --hardware /tmp/cal.yaml --case dynaexq_b1 -- policy=dynaexq runtime.layers=8"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="replay one trace through the runtime and the simulator; report the error",
                       description="Measure a run and simulate the same run; report per-step and per-run error "
                       "of TPOT, TTFT, stall time, bytes moved and promotions, and whether decisions match.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", required=True,
                   help="hardware profile: a conf/hardware preset name or a YAML path (e.g. one `moebits runtime calibrate` wrote)")
    p.add_argument("--out", type=Path, default=Path("fidelity"), help="output directory (default ./fidelity)")
    p.add_argument("--case", default="", help="name of this case in the table (default: the policy)")
    p.add_argument("--cases-file", type=Path, default=None,
                   help="several cases in one process: one per line, 'CASE override override ...' (the positional "
                   "overrides are added to every line; '#' starts a comment)")
    p.add_argument("--resim", type=Path, nargs="+", default=None, metavar="MEASURED_DIR",
                   help="no runtime: simulate again every case measured into each MEASURED_DIR (its *.measured.npz and "
                   "*.case.json) with --hardware and compare; writes one table to --out")
    p.add_argument("--reference-host", action="store_true",
                   help="price every run's host work at the speed the profile's host costs were fitted at, not at the "
                   "run's own host probe (runtime/host_log.py host_probe_s)")
    p.add_argument("overrides", nargs="*", help="moebits runtime overrides (policy=..., budget=..., workload...)")
    p.set_defaults(func=run)


def load_hardware(name: str) -> HardwareProfile:
    """A profile from a YAML path or a ``conf/hardware`` preset name."""
    import yaml
    from moebits.drive.app import CONF_DIR, presets

    path = Path(name)
    if not path.suffix:
        if name not in presets("hardware"):
            raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(presets('hardware'))}, or a YAML path")
        path = CONF_DIR / "hardware" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"hardware profile {path} does not exist")
    body = yaml.safe_load(path.read_text())
    body.pop("defaults", None)
    return HardwareProfile.from_dict(body)


def read_cases(path: Path | None, case: str, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(case, overrides) per run: the lines of ``path``, each plus ``overrides``; else one case."""
    if path is None:
        return [(case, overrides)]
    lines = [ln.split("#", 1)[0].split() for ln in path.read_text().splitlines()]
    cases = [(ln[0], [*ln[1:], *overrides]) for ln in lines if ln]
    if not cases:
        raise ValueError(f"{path} lists no cases")
    return cases


def run(args: argparse.Namespace) -> int:
    hw = load_hardware(args.hardware)
    if args.resim is not None:
        rows = [c.row for d in args.resim for c in resimulate(d, hw, args.out, host_speed=not args.reference_host)]
        (args.out / "fidelity.md").write_text(summary_md(json.loads((args.out / "fidelity.json").read_text())))
        print(summary_md(rows))
        return 0 if all(r["decisions_match"] for r in rows) else 1
    ok = True
    for case, overrides in read_cases(args.cases_file, args.case, list(args.overrides)):
        try:
            r = validate(overrides, hw, args.out, case, host_speed=not args.reference_host).row
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others' rows
            if args.cases_file is None:
                raise
            print(f"error: case {case}: {type(exc).__name__}: {exc}", flush=True)
            ok = False
            continue
        (args.out / "fidelity.md").write_text(summary_md(json.loads((args.out / "fidelity.json").read_text())))
        print(json.dumps({k: r[k] for k in ("case", "tpot_ms_measured", "tpot_ms_simulated", "tpot_err", "ttft_err",
                                            "step_err_p95", "decisions_match")}), flush=True)
        if not r["decisions_match"]:
            print(f"decisions differ: {r['first_divergence']}", flush=True)
            ok = False
    print(f"wrote {args.out}/fidelity.json, fidelity.md, {args.out}/*.png")
    return 0 if ok else 1
