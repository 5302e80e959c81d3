#!/usr/bin/env bash
# One device call for issue 10: GPU tests, graph-captured decode, the MoE layer benchmark.
# Usage (repository root, PYTHONPATH set): bash benchmarks/h200_fastrt.sh OUTDIR
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_fused_moe.py tests/test_fast_model.py \
    > "$out/gpu_tests.txt" 2>&1; tail -12 "$out/gpu_tests.txt"
timeout 300 python3 benchmarks/decode_fast.py --stress 6 --out "$out/decode_h200.json" 2>&1 | grep -v Warning \
    > "$out/decode.log"; tail -32 "$out/decode.log"
timeout 150 python3 benchmarks/moe_layer.py --reps 15 --no-accuracy --old-impls hf bf16 int4 mixed \
    --fused-configs 16,32,4 8,32,4 32,64,4 16,32,8 --out "$out/moe_layer_h200.json" > "$out/moe_layer.log" 2>&1
grep -E "^ +T=|measured|accuracy|device" "$out/moe_layer.log" | tail -75
