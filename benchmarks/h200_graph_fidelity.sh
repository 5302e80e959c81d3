#!/usr/bin/env bash
# The graph path's calibration data and fidelity measurements on the H200, in one device call.
# Usage (repository root; PYTHONPATH as in the device recipe): bash benchmarks/h200_graph_fidelity.sh OUTDIR
#   1. benchmarks/graph_designs.py: whole-pass timings of synthetic designs (no trace) for the model shapes of
#      GFID_MODELS -> OUTDIR/designs_<model>.json (what `moebits runtime calibrate --runtime graph` fits);
#   2. the per-layer seam's host turnaround: a synthetic workload (no trace) with a static policy on per-layer
#      graphs (route_lag=0) and whole-step graphs (route_lag=2) -> OUTDIR/turnaround.json;
#   3. moebits analysis validate on the cases of the GFID_CASES files (default benchmarks/graph_cases.txt; each line
#      sets its runtime.layers), then again on those of the GFID_REPEAT files (as CASE_r2: repeatability), through the graph
#      runtime -> OUTDIR/validate.tgz (every measured run, re-simulated offline with
#      `moebits analysis validate --resim DIR --hardware PROFILE`).
# GFID_COPY_CHECK=0 skips benchmarks/copy_check.py (copy timing in a burst; ~60 s).
set -u
out=${1:?usage: bash benchmarks/h200_graph_fidelity.sh OUTDIR}; mkdir -p "$out"
work=${GFID_WORK:-/tmp/gfid}; rm -rf "$work"; mkdir -p "$work"
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
layers=${GFID_LAYERS:-8}; budget_s=${GFID_BUDGET_S:-540}; start=$(date +%s)
left() { echo $(( budget_s - ($(date +%s) - start) )); }
py=${PYTHON:-python3}; log=$out/run.log
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU (smoke run)"; } | tee "$log"
for raw in ${GFID_IMPORT:-}; do   # "FOLDER:OUT.parquet": import a raw trace here (its Parquet written by this pyarrow)
  IFS=: read -r src dst <<< "$raw"; $py -m moebits traces import "$src" -o "$dst" 2>&1 | tail -1 | tee -a "$log"
done
# GFID_MODELS: "NAME:LAYERS[:SCALE]" per shape (a conf/model preset or a trace .parquet); set but empty: no designs
for m in ${GFID_MODELS-qwen3_30b_a3b:2,8}; do
  IFS=: read -r name lay scale <<< "$m"
  timeout "${GFID_DESIGN_S:-150}" $py benchmarks/graph_designs.py --model "$name" --layers "$lay" --scale "${scale:-1}" \
    ${GFID_DESIGN_ARGS:-} --out "$out/designs_$(basename "$name" .parquet).json" 2>&1 | grep -v Warning | tee -a "$log"
done
for rl in ${GFID_TURNAROUND-0 2}; do
  timeout 90 $py -m moebits runtime runtime.mode=REPLAY runtime.engine=GRAPH workload=synth workload.seqs=2 \
    workload.decode_tokens=64 policy=static_uniform budget=all_int4 route_lag=$rl runtime.layers="$layers" \
    runtime.kl=false progress=false hydra.run.dir="$work/turnaround_$rl" 2>&1 | grep -v Warning | tail -3 | tee -a "$log"
done
[ -f "$work/turnaround_0/summary.json" ] && $py - "$work" "$out/turnaround.json" <<'PY' 2>&1 | tee -a "$log"
import json, sys, pathlib
w = pathlib.Path(sys.argv[1]); s = {rl: json.loads((w / f"turnaround_{rl}" / "summary.json").read_text()) for rl in (0, 2)}
keep = ("tpot_ms_mean", "tpot_ms_p50", "ttft_ms_mean", "runtime_path", "layer_steps", "device", "observe")
pathlib.Path(sys.argv[2]).write_text(json.dumps({str(rl): {k: v.get(k) for k in keep} for rl, v in s.items()}, indent=1))
print(open(sys.argv[2]).read())
PY
[ "${GFID_COPY_CHECK:-1}" = 1 ] && timeout 60 $py benchmarks/copy_check.py --hardware conf/hardware/calibrated_h200.yaml --out "$out/copy_check.json" 2>&1 \
  | grep -v Warning | tee -a "$log"
# GFID_SUFFIX (e.g. _s2): every case renamed CASE$GFID_SUFFIX (a later call's measurements, graded beside CASE)
grep -hv '^\s*#' ${GFID_CASES:-benchmarks/graph_cases.txt} | grep -v '^\s*$' \
  | sed -E "s/^([A-Za-z0-9_]+)/\1${GFID_SUFFIX:-}/" > "$work/cases.txt"
t=$(left); echo "validating with ${t}s left" | tee -a "$log"
timeout $(( t > 10 ? t : 10 )) $py -m moebits analysis validate --hardware conf/hardware/calibrated_h200.yaml \
  --out "$work/val" --cases-file "$work/cases.txt" -- runtime.engine=GRAPH progress=false ${GFID_OVERRIDES:-} 2>&1 | grep --line-buffered -v Warning | tee -a "$log"
if [ -n "${GFID_REPEAT:-}" ]; then   # the same cases measured again (CASE_r2): how far two identical runs differ
  grep -hv '^\s*#' $GFID_REPEAT | grep -v '^\s*$' | sed -E 's/^([A-Za-z0-9_]+)/\1_r2/' > "$work/repeat.txt"
  t=$(left); echo "repeating with ${t}s left" | tee -a "$log"
  timeout $(( t > 10 ? t : 10 )) $py -m moebits analysis validate --hardware conf/hardware/calibrated_h200.yaml \
    --out "$work/val" --cases-file "$work/repeat.txt" -- runtime.engine=GRAPH progress=false ${GFID_OVERRIDES:-} 2>&1 | grep --line-buffered -v Warning | tee -a "$log"
fi
tar czf "$out/validate.tgz" -C "$work" val
echo "done in $(( $(date +%s) - start ))s" | tee -a "$log"; ls -la "$out" | tee -a "$log"
