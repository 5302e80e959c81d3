#!/usr/bin/env bash
# dynamo on the graph path, on the H200 (session 7), in two device calls back to back:
#   part 1: the GPU tests of the fused kernels (the channel-mix class against its dequantize reference), whole-pass
#           designs with dynamo's pool classes (int4, int2 and its mix) for the three model shapes, then the six
#           dynamo cases of benchmarks/graph_cases_dynamo.txt -> OUTDIR/part1.tgz
#   part 2: the GPU tests of the fast model and graph runtime, the dynamo cases again (CASE_s2), and four cases of
#           session 6 measured again (kernel-refactor check: the descriptor grew, the plain classes' code did not
#           change) -> OUTDIR/part2.tgz
#   part 3: every GPU test of the fused kernels, unhurried (part 1's 200 s ran out while compiling the mix variants),
#           then dynamo's four synthetic calibration cases (benchmarks/graph_cases_calibration.txt: its host work per
#           pass) -> OUTDIR/part3.tgz
#   part 4: the four calibration cases again (CASE_s2), the call after -> OUTDIR/part4.tgz
# Usage (repository root, device recipe PYTHONPATH): bash benchmarks/h200_dynamo.sh 1|2|3|4 OUTDIR
set -u
part=${1:?usage: bash benchmarks/h200_dynamo.sh 1|2 OUTDIR}; out=${2:?usage: bash benchmarks/h200_dynamo.sh 1|2 OUTDIR}
mkdir -p "$out"; work=/tmp/h200_dynamo; mkdir -p "$work"; start=$(date +%s)
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
left() { echo $(( ${SESSION_BUDGET_S:-560} - ($(date +%s) - start) )); }
MIX=int2+int8@f0.1s0.5
if [ "$part" = 1 ]; then
  d=$work/designs; mkdir -p "$d"; log=$d/run.log
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$log"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_moe.py 2>&1 | tail -4 | tee -a "$log"
  grep -q " failed\|Timeout\|rror" "$log" && echo "GPU tests did not pass" | tee -a "$log"
  echo "tests done at $(( $(date +%s) - start ))s" | tee -a "$log"
  CLS_SETS="int4,int2,$MIX" bash benchmarks/h200_class_designs.sh "$d" 2>&1 | tee -a "$log"
  for m in "train/data/traces/evaluation_code.parquet --layers 2,8" ".traces/llama4.parquet --layers 2,4 --scale 0.25"; do
    set -- $m
    timeout 80 python3 benchmarks/graph_designs.py --model $m --precisions "int4,int2,$MIX" --designs 5 --reps 5 \
      --out "$d/designs_$(basename "$1" .parquet)_int4_int2_mix.json" 2>&1 | grep -v Warning | tee -a "$log"
  done
  echo "designs done at $(( $(date +%s) - start ))s" | tee -a "$log"
  GFID_WORK="$work/gdyn" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) \
    GFID_CASES="benchmarks/graph_cases_dynamo.txt" bash benchmarks/h200_graph_fidelity.sh "$work/dyn" > "$work/dyn.log" 2>&1
  tail -12 "$work/dyn.log"
  tar czf "$out/part1.tgz" -C "$work" designs dyn dyn.log
elif [ "$part" = 3 ] || [ "$part" = 4 ]; then
  grep -h '^cal_[a-z0-9_]*dynamo' benchmarks/graph_cases_calibration.txt > "$work/cal.txt"
  if [ "$part" = 3 ]; then
    timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_moe.py 2>&1 | tail -4 | tee "$work/tests3.log"
  fi
  suffix=$([ "$part" = 4 ] && echo _s2)
  GFID_WORK="$work/gc$part" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) GFID_SUFFIX=$suffix \
    GFID_CASES="$work/cal.txt" bash benchmarks/h200_graph_fidelity.sh "$work/cal$part" > "$work/cal$part.log" 2>&1
  tail -8 "$work/cal$part.log"
  tar czf "$out/part$part.tgz" -C "$work" $( [ "$part" = 3 ] && echo tests3.log ) "cal$part" "cal$part.log"
else
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_model.py tests/test_graph_stress.py 2>&1 \
    | tail -3 | tee "$work/tests2.log"
  grep -hE '^(static_uniform_b1|dynaexq_b16|tr_static_b16|l4_static_b16) ' benchmarks/graph_cases.txt \
    benchmarks/graph_cases_traces.txt > "$work/check.txt"
  GFID_WORK="$work/gs2" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) GFID_SUFFIX=_s2 \
    GFID_CASES="benchmarks/graph_cases_dynamo.txt" bash benchmarks/h200_graph_fidelity.sh "$work/s2" > "$work/s2.log" 2>&1
  tail -8 "$work/s2.log"
  GFID_WORK="$work/gchk" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) GFID_SUFFIX=_k7 \
    GFID_CASES="$work/check.txt" bash benchmarks/h200_graph_fidelity.sh "$work/chk" > "$work/chk.log" 2>&1
  tail -6 "$work/chk.log"
  tar czf "$out/part2.tgz" -C "$work" tests2.log s2 s2.log chk chk.log
fi
echo "part $part done in $(( $(date +%s) - start ))s"; ls -la "$out"
