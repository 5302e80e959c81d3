"""``moebits analysis calibrate-host``: the graph runtime's host costs, measured and fitted into a profile."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml
from moebits.analysis.cli_validate import load_hardware, read_cases
from moebits.analysis.fidelity import CALIBRATION_PREFIX, validate
from moebits.analysis.hostcost import describe, fit_host_costs
from moebits.core.hardware import HardwareProfile
from moebits.drive.app import CONF_DIR

DEFAULT_CASES = CONF_DIR.parent / "benchmarks" / "graph_cases_calibration.txt"

EPILOG = """The second half of calibrating the graph path, after `moebits runtime calibrate --runtime graph`
(whole-pass designs -> graph tables). Runs every case of --cases-file (a synthetic workload: calibration
never sees a validation trace) through the graph runtime and the simulator, keeping each measured run
and its host log in --measured, then fits the profile's host costs (analysis/hostcost.py: each policy's
observation cost, the host work of a pass and of a copy, the pass's own copies, the per-layer graph
turnaround, a waiting step's drain) and writes the completed profile to --out. Case names must start
with "cal_": validation cases kept in the same folder are never fitted to.

examples:
  moebits runtime calibrate --runtime graph --out conf/hardware/my_gpu.yaml
  moebits analysis calibrate-host --hardware conf/hardware/my_gpu.yaml --out conf/hardware/my_gpu.yaml
  moebits analysis calibrate-host --fit-only --measured host_calibration --hardware my_gpu --out /tmp/h.yaml"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate-host", help="measure the graph runtime's host costs and fit them into a profile",
                       description="Measure synthetic calibration runs on the graph runtime and fit the host "
                       "costs of a hardware profile.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", required=True,
                   help="the profile to complete: a conf/hardware preset name or a YAML path (its graph tables "
                   "price the runs)")
    p.add_argument("--out", type=Path, required=True, help="the YAML profile to write (may be the --hardware file)")
    p.add_argument("--measured", type=Path, default=Path("host_calibration"),
                   help="folder of the measured runs (written, or read with --fit-only; default ./host_calibration)")
    p.add_argument("--cases-file", type=Path, default=DEFAULT_CASES,
                   help=f"calibration cases, one per line 'cal_NAME override ...' (default {DEFAULT_CASES.name})")
    p.add_argument("--fit-only", action="store_true", help="no runtime: fit the runs already in --measured")
    p.add_argument("overrides", nargs="*", help="moebits runtime overrides added to every case")
    p.set_defaults(func=run)


def measure(cases_file: Path, overrides: list[str], hw: HardwareProfile, measured: Path) -> None:
    """Every case of ``cases_file`` through the runtime and the simulator; runs kept in ``measured``."""
    if not cases_file.exists():
        raise ValueError(f"cases file {cases_file} does not exist; pass --cases-file")
    cases = read_cases(cases_file, "", overrides)
    bad = [c for c, _ in cases if not c.startswith(CALIBRATION_PREFIX)]
    if bad:
        raise ValueError(f"{cases_file}: calibration case names start with {CALIBRATION_PREFIX!r}; rename {bad}")
    for case, ov in cases:
        row = validate([*ov, "runtime.engine=GRAPH", "progress=false"], hw, measured, case).row
        print(f"{case}: measured TPOT {row['tpot_ms_measured']:.3f} ms, decisions "
              f"{'match' if row['decisions_match'] else 'DIFFER'}", flush=True)


def write_profile(hw: HardwareProfile, base: str, out: Path) -> None:
    """``hw`` as YAML at ``out``, keeping the hydra ``defaults`` of the ``base`` profile's file."""
    path = Path(base) if Path(base).suffix else CONF_DIR / "hardware" / f"{base}.yaml"
    defaults = yaml.safe_load(path.read_text()).get("defaults") if path.exists() else None
    body = hw.to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {body['source']}\n" + yaml.safe_dump(({"defaults": defaults} if defaults else {}) | body,
                                                          sort_keys=False))


def run(args: argparse.Namespace) -> int:
    hw = load_hardware(args.hardware)
    if not args.fit_only:
        measure(args.cases_file, list(args.overrides), hw, args.measured)
    fitted = fit_host_costs(hw, args.measured)
    if "host costs fitted" not in fitted.source:
        fitted = dataclasses.replace(fitted, source=f"{fitted.source}; host costs fitted to synthetic runs "
                                     "(moebits analysis calibrate-host)")
    write_profile(fitted, args.hardware, args.out)
    print(describe(fitted))
    print(f"wrote {args.out}")
    return 0
