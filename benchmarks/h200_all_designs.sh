#!/usr/bin/env bash
# Every whole-pass design set the committed calibrated_h200 profile is fitted from, in one device call:
# the GPU tests of the fast model first (a kernel change must pass them before anything is timed), then every pool
# class set the validation policies build (benchmarks/h200_class_designs.sh) on the three shapes: Qwen3-30B-A3B,
# the trained model, Llama-4 at 1/4 width. Fit with benchmarks/fit_graph_designs.py OUTDIR/designs_*.json.
#   ALL_SHAPES  which shapes (default "qwen tr l4"); CLS_SETS as in h200_class_designs.sh
set -u
out=${1:?usage: bash benchmarks/h200_all_designs.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
log=$out/run.log; start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$log"
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_model.py tests/test_graph_stress.py 2>&1 | tail -4 | tee -a "$log"
  grep -q " failed" "$log" && { echo "GPU tests failed: no designs timed" | tee -a "$log"; exit 1; }
  echo "tests done at $(( $(date +%s) - start ))s" | tee -a "$log"
fi
for shape in ${ALL_SHAPES:-qwen tr l4}; do
  case $shape in
    qwen) CLS_MODEL=qwen3_30b_a3b CLS_ARGS="--layers 2,8" bash benchmarks/h200_class_designs.sh "$out" 2>&1 | tee -a "$log" ;;
    tr) CLS_MODEL=train/data/traces/evaluation_code.parquet CLS_ARGS="--layers 2,8" \
          bash benchmarks/h200_class_designs.sh "$out" 2>&1 | tee -a "$log" ;;
    l4) CLS_MODEL=.traces/llama4.parquet CLS_ARGS="--layers 2,4 --scale 0.25" \
          bash benchmarks/h200_class_designs.sh "$out" 2>&1 | tee -a "$log" ;;
  esac
  echo "$shape done at $(( $(date +%s) - start ))s" | tee -a "$log"
done
echo "done in $(( $(date +%s) - start ))s" | tee -a "$log"
