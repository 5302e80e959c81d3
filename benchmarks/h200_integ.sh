#!/usr/bin/env bash
# One device call for the integrated graph path (issue 10 on the one driver): <= 4 minutes on an H200.
#
#   bash benchmarks/h200_integ.sh OUTDIR           # H200 (repository root, PYTHONPATH from .ci/nstree)
#   bash benchmarks/h200_integ.sh OUTDIR --smoke   # CPU: the same steps at a tiny shape (catches typos)
#
# 1. GPU tests of the graph path (pytest -m gpu): graph engine on CUDA (WHOLE / per-layer graphs),
#    promote/demote stress under a captured graph, fused MoE kernels.
# 2. benchmarks/decode.py, 48 of 48 layers, batch 1, routing forced from the embedded default trace:
#    transformers eager baseline, bf16 resident, static int4 (+ batch 8 and 32), dynaexq bf16/int4 and
#    bf16/int3 at lag 1 and 2, LRU bf16 offload (STALL, per-layer graphs), stress check.
#    -> OUTDIR/decode_h200.json, OUTDIR/decode.log
# 3. If time is left: the grouped (prefill) kernels the fastrt helper left unmeasured: MoE layer at
#    T = 16/128 -> OUTDIR/moe_layer_grouped.json, OUTDIR/moe_layer.log.
# Everything also goes to OUTDIR/integ.log. Each stage has its own timeout; a stage cut short keeps
# what it wrote (decode.py rewrites its JSON after every configuration).
set -u
out=${1:?usage: bash benchmarks/h200_integ.sh OUTDIR [--smoke]}
smoke=${2:-}
mkdir -p "$out"
# PYTHONSAFEPATH: the checkout root (cwd of `python3 -m pytest`) must not shadow the nstree link tree
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
log="$out/integ.log"
say() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$log"; }
left() { echo $(( ${1} - SECONDS )); }   # seconds until the stage deadline ${1}

if [ "$smoke" = --smoke ]; then
  dec_args=(--smoke --decode 4 --batch 8 --stress 1)
  grouped_args=(--small --tokens 16 --reps 1 --rotations 1 --no-graphs --no-accuracy --impls int4
                --fused-configs 16,32,4,1,1 --grouped-all)
  total=900
else
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt" | tee -a "$log"
  dec_args=(--layers 48 --decode 32 --batch 8 --lags 1 2 --stress 4)
  grouped_args=(--tokens 16 128 --reps 8 --rotations 4 --no-accuracy --old-impls int4 --impls int4 mixed
                --fused-configs 16,32,4,1,1 --grouped-all)
  total=230
fi

say "1/3 GPU tests"
timeout 75 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_graph_parity.py tests/test_graph_stress.py \
    tests/test_fused_moe.py > "$out/gpu_tests.txt" 2>&1
say "gpu tests rc=$?: $(tail -1 "$out/gpu_tests.txt")"

say "2/3 decode (trace-driven routing, embedded default trace)"
timeout "$(left $(( total - 25 )))" python3 benchmarks/decode.py "${dec_args[@]}" --trace default \
    --configs hf bf16_resident static_int4 dynaexq dynaexq_int3 lru_bf16 --out "$out/decode_h200.json" 2>&1 \
    | grep -v Warning > "$out/decode.log"
say "decode rc=${PIPESTATUS[0]}"
tail -16 "$out/decode.log" | tee -a "$log"

budget=$(left "$total")
if [ "$budget" -ge 20 ]; then
  say "3/3 grouped prefill kernels (${budget}s left)"
  timeout "$budget" python3 benchmarks/moe_layer.py "${grouped_args[@]}" --out "$out/moe_layer_grouped.json" \
      > "$out/moe_layer.log" 2>&1
  say "moe_layer rc=$?"
  grep -E "^ +T=|measured|device" "$out/moe_layer.log" | tail -20 | tee -a "$log"
else
  say "3/3 grouped prefill kernels skipped (${budget}s left)"
fi
say "done"
