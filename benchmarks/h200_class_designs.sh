#!/usr/bin/env bash
# Whole-pass designs of one model shape per pool class set (the fused kernels are compiled for the precisions a pool
# holds, so a table measured with another class set prices a different kernel): one JSON per set in OUTDIR; fit with
# benchmarks/fit_graph_designs.py. The default sets are every class set the validation cases' policies build
# (benchmarks/graph_cases*.txt), dynamo's with its channel mix as a class of its own.
#   CLS_MODEL  a conf/model preset or a trace .parquet (default qwen3_30b_a3b)
#   CLS_ARGS   more graph_designs.py arguments (default "--layers 2,8"; Llama-4: "--layers 2,4 --scale 0.25")
#   CLS_SETS   space-separated class sets (comma-separated precisions)
set -u
out=${1:?usage: bash benchmarks/h200_class_designs.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
model=${CLS_MODEL:-qwen3_30b_a3b}; tag=$(basename "$model" .parquet); [ "$model" = qwen3_30b_a3b ] && tag=""
for set in ${CLS_SETS:-int4 bf16,int4 bf16,int8,int4,int3,int2 bf16 int4,int3,int2 int8,int4,int2 int8,int4,int3,int2 int4,int2,int2+int8@f0.1s0.5}; do
  timeout 80 python3 benchmarks/graph_designs.py --model "$model" ${CLS_ARGS:---layers 2,8} --precisions "$set" \
    --designs 5 --reps 5 --out "$out/designs_${tag:+${tag}_}${set//[,+@]/_}.json" 2>&1 | grep -v Warning
done
