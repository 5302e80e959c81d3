#!/usr/bin/env bash
# Fidelity on the H200 in one device call (<= 4 minutes): calibrate, then validate a few cases.
# Usage (repository root, PYTHONPATH set as in COMMON.md): bash benchmarks/h200_fidelity.sh OUTDIR
#   1. moebits runtime calibrate --quick: the graph path -> OUTDIR/calibrated_h200.yaml and the eager
#      runtime -> OUTDIR/calibrated_h200_eager.yaml (commit the first as conf/hardware/calibrated_h200.yaml);
#   2. moebits analysis validate: the cases of benchmarks/fidelity_cases.txt on the embedded default trace,
#      runtime.layers=$FID_LAYERS (default 4) -> OUTDIR/fidelity.json, fidelity.md, scatter.png (every case),
#      passes.csv (every pass of every case, measured and simulated), fidelity.log: 7 files with the profiles.
# Which runtime path is validated: the eager replay (runtime/replay.py, MoE layers only) against the eager
# profile, unless FID_RUNTIME holds the overrides that select the graph path (e.g. FID_RUNTIME="runtime.graph=WHOLE"),
# which is then validated against the graph profile. Without CUDA it runs on the CPU at tiny sizes (smoke test).
set -u
out=${1:?usage: bash benchmarks/h200_fidelity.sh OUTDIR}; mkdir -p "$out"
work=${FID_WORK:-/tmp/fidelity_work}; rm -rf "$work"; mkdir -p "$work"   # per-case files (OUTDIR keeps <= 8 files)
log=$out/fidelity.log
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1  # SAFEPATH: the repo root's moebits/ must not shadow the namespace tree
layers=${FID_LAYERS:-4}; budget_s=${FID_BUDGET_S:-225}; start=$(date +%s)
left() { echo $(( budget_s - ($(date +%s) - start) )); }
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi (CPU smoke run)"; } | tee "$log"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$log"
cal() {  # cal RUNTIME OUTFILE SECONDS
  timeout "$3" $py -m moebits runtime calibrate --runtime "$1" --quick --precisions bf16,int4 --reps 5 --out "$2" \
    2>&1 | grep --line-buffered -v Warning | tee -a "$log"
}
cal graph "$out/calibrated_h200.yaml" 75
cal eager "$out/calibrated_h200_eager.yaml" 55
if [ -n "${FID_RUNTIME:-}" ]; then hw=$out/calibrated_h200.yaml; else hw=$out/calibrated_h200_eager.yaml; fi
[ -f "$hw" ] || { echo "error: no profile $hw (calibration failed, see $log)" | tee -a "$log"; exit 1; }
cases=$work/cases.txt
if [ -n "${FID_SMOKE:-}" ]; then sed -E 's/workload.batch=16/workload.batch=2/' benchmarks/fidelity_cases.txt > "$cases"
else cp benchmarks/fidelity_cases.txt "$cases"; fi
t=$(left); echo "validating against $hw with ${t}s left" | tee -a "$log"
timeout $(( t > 10 ? t : 10 )) $py -m moebits analysis validate --hardware "$hw" --out "$work" --cases-file "$cases" \
  -- runtime.layers="$layers" progress=false ${FID_RUNTIME:-} 2>&1 | grep --line-buffered -v Warning | tee -a "$log"
if [ -f "$work/fidelity.json" ]; then
  cp "$work/fidelity.json" "$out/"
  $py -m moebits analysis fidelity "$work" -o "$out/fidelity.md" --plot "$out/scatter.png" --passes "$out/passes.csv" \
    | tee -a "$log"
fi
echo "done in $(( $(date +%s) - start ))s" | tee -a "$log"
ls "$out" | tee -a "$log"
