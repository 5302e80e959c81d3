#!/usr/bin/env bash
# Device calls for issue 10. Usage (repository root, PYTHONPATH set): bash benchmarks/h200_fastrt.sh MODE OUTDIR
#   full:    GPU tests, every decode configuration (+ stress), the MoE layer benchmark (first call, ~330 s)
#   kernels: fused-kernel GPU test, static_int4 decode + step breakdown, the MoE layer benchmark (second call)
#   grouped: grouped (prefill) kernels: GPU test, MoE layer at T=16/128, TTFT of a 128-token prompt (third call)
set -u
mode=${1:-full}; out=${2:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
if [ "$mode" = full ]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_fused_moe.py tests/test_fast_model.py \
      > "$out/gpu_tests.txt" 2>&1; tail -12 "$out/gpu_tests.txt"
  timeout 300 python3 benchmarks/decode.py --trace none --lags 1 --stress 6 --out "$out/decode_h200.json" 2>&1 | grep -v Warning \
      > "$out/decode.log"; tail -32 "$out/decode.log"
  timeout 150 python3 benchmarks/moe_layer.py --reps 15 --no-accuracy --old-impls hf bf16 int4 mixed \
      --out "$out/moe_layer_h200.json" > "$out/moe_layer.log" 2>&1
elif [ "$mode" = kernels ]; then
  timeout 50 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_fused_moe.py > "$out/gpu_tests.txt" 2>&1
  tail -5 "$out/gpu_tests.txt"
  timeout 80 python3 benchmarks/decode.py --trace none --configs static_int4 --breakdown --decode 32 \
      --out "$out/decode_int4_h200.json" 2>&1 | grep -v Warning > "$out/decode.log"; tail -8 "$out/decode.log"
  timeout 110 python3 benchmarks/moe_layer.py --reps 10 --rotations 8 --no-accuracy --old-impls hf int4 \
      --fused-configs 16,32,4,1 32,64,4,1 16,32,4,0 8,32,4,1 --out "$out/moe_layer_h200.json" > "$out/moe_layer.log" 2>&1
else
  timeout 45 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_fused_moe.py > "$out/gpu_tests.txt" 2>&1
  tail -5 "$out/gpu_tests.txt"
  timeout 45 python3 benchmarks/moe_layer.py --tokens 16 128 --reps 8 --rotations 4 --no-accuracy --old-impls int4 \
      --impls int4 mixed int8 --fused-configs 16,32,4,1,1 --grouped-all --out "$out/moe_layer_grouped.json" \
      > "$out/moe_layer.log" 2>&1
  timeout 50 python3 benchmarks/decode.py --trace none --configs static_int4 --prompt 128 --chunk 128 --decode 16 --batch 32 \
      --grouped-from-pairs 64 --out "$out/decode_grouped.json" 2>&1 | grep -v Warning > "$out/decode.log"; tail -5 "$out/decode.log"
fi
grep -E "^ +T=|measured|accuracy|device" "$out/moe_layer.log" | tail -75
