#!/usr/bin/env bash
# Every whole-pass design set the committed calibrated_h200 profile is fitted from, in one device call:
# the GPU tests of the fast model first (a kernel change must pass them before anything is timed), then the
# Qwen3-30B-A3B shape per pool class set (benchmarks/h200_class_designs.sh), then the trained model's and the
# Llama-4 (1/4 width) shapes with all five classes. Fit with benchmarks/fit_graph_designs.py OUTDIR/designs_*.json.
set -u
out=${1:?usage: bash benchmarks/h200_all_designs.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
log=$out/run.log; start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$log"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_model.py tests/test_graph_stress.py 2>&1 | tail -4 | tee -a "$log"
grep -q " failed" "$log" && { echo "GPU tests failed: no designs timed" | tee -a "$log"; exit 1; }
echo "tests done at $(( $(date +%s) - start ))s" | tee -a "$log"
bash benchmarks/h200_class_designs.sh "$out" 2>&1 | tee -a "$log"
echo "class sets done at $(( $(date +%s) - start ))s" | tee -a "$log"
timeout 80 python3 benchmarks/graph_designs.py --model train/data/traces/evaluation_code.parquet --layers 2,8 \
  --designs 5 --reps 5 --out "$out/designs_evaluation_code.json" 2>&1 | grep -v Warning | tee -a "$log"
timeout 80 python3 benchmarks/graph_designs.py --model .traces/llama4.parquet --layers 2,4 --scale 0.25 \
  --designs 5 --reps 5 --out "$out/designs_llama4.json" 2>&1 | grep -v Warning | tee -a "$log"
for m in "train/data/traces/evaluation_code.parquet --layers 2,8" ".traces/llama4.parquet --layers 2,4 --scale 0.25"; do
  set -- $m   # dynamo's pool (int4, int2 and its channel mix) on the two small shapes
  timeout 80 python3 benchmarks/graph_designs.py --model $m --precisions "int4,int2,int2+int8@f0.1s0.5" --designs 5 --reps 5 \
    --out "$out/designs_$(basename "$1" .parquet)_int4_int2_mix.json" 2>&1 | grep -v Warning | tee -a "$log"
done
echo "done in $(( $(date +%s) - start ))s" | tee -a "$log"
