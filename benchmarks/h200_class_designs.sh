#!/usr/bin/env bash
# Whole-pass designs of the Qwen3-30B-A3B shape per pool class set (the fused kernels are compiled for the
# precisions a pool holds; the last set is dynamo's pool, its channel mix a class of its own): one JSON per set in
# OUTDIR; fit with benchmarks/fit_graph_designs.py.
set -u
out=${1:?usage: bash benchmarks/h200_class_designs.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
for set in ${CLS_SETS:-int4 bf16,int4 bf16,int8,int4,int3,int2 bf16 int4,int3,int2 int8,int4,int2 int4,int2,int2+int8@f0.1s0.5}; do
  timeout 80 python3 benchmarks/graph_designs.py --model "${CLS_MODEL:-qwen3_30b_a3b}" --layers 2,8 --precisions "$set" \
    --designs 5 --reps 5 --out "$out/designs_${set//[,+@]/_}.json" 2>&1 | grep -v Warning
done
