#!/usr/bin/env bash
# Does pinning the runtime's host loop to one CPU keep the H200 host in one speed mode? (docs/FIDELITY.md
# session 5: the host probe reads ~40-48 us or ~70-115 us, and a run's host work follows it.) One calibration case
# measured REPS times unpinned, then REPS times with MOEBITS_PIN_CPU=CPU (runtime/replay.py pin_host_thread); prints
# each run's probes and mean / median TPOT. Usage (repository root, device recipe PYTHONPATH):
#   bash benchmarks/host_modes.sh OUTDIR [REPS] [CPU]
set -u
out=${1:?usage: bash benchmarks/host_modes.sh OUTDIR [REPS] [CPU]}; reps=${2:-4}; cpu=${3:-2}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
case_args="workload=synth workload.seqs=2 workload.decode_tokens=64 policy=static_uniform budget=all_int4 route_lag=0 runtime.layers=8"
for pin in none "$cpu"; do
  for i in $(seq "$reps"); do
    name="hm_${pin}_$i"
    if [ "$pin" = none ]; then env -u MOEBITS_PIN_CPU timeout 120 ${PYTHON:-python3} -m moebits analysis validate --hardware conf/hardware/calibrated_h200.yaml \
        --out "$out/val" --case "$name" -- $case_args runtime.engine=GRAPH progress=false 2>&1 | grep '"case"'
    else MOEBITS_PIN_CPU=$pin timeout 120 ${PYTHON:-python3} -m moebits analysis validate --hardware conf/hardware/calibrated_h200.yaml \
        --out "$out/val" --case "$name" -- $case_args runtime.engine=GRAPH progress=false 2>&1 | grep '"case"'
    fi
  done
done
${PYTHON:-python3} - "$out/val" <<'PY'
import json, sys, pathlib
for r in json.loads((pathlib.Path(sys.argv[1]) / "fidelity.json").read_text()):
    print(f"{r['case']:12s} probe {r.get('host_probe_us') or 0:6.1f} us  TPOT mean {r['tpot_ms_measured']:.3f} ms  median {r['tpot_p50_ms_measured']:.3f} ms")
PY
