#!/usr/bin/env bash
# The copy bubble (docs/FIDELITY.md): passes after a boundary that issued expert copies ran longer by about the
# copies' transfer time on the H200: the pass's own small H2D uploads (tokens, positions, replayed routing) queued
# behind the expert copies on the copy engine. The replay now keeps every pass's inputs on the device (as a
# serving engine's are); this measures both ways in one call:
#   host    MOEBITS_INPUTS=host: inputs in pinned host memory, uploaded before each pass (the old behaviour);
#   device  the default: inputs staged on the device before the timed loop (no input DMA per pass).
# Session 5 also tried expert copies in 1 MiB pieces (no change: the copy engine is FIFO); removed since.
# Usage (repository root, device recipe PYTHONPATH): bash benchmarks/copy_bubble.sh OUTDIR [CASE_OVERRIDES...]
# Writes OUTDIR/val (one measured run per variant, graded with calibrated_h200; moebits analysis validate --resim)
# and OUTDIR/copy_bubble.json (benchmarks/copy_bubble_summary.py: passes after copies against the others).
set -u
out=${1:?usage: bash benchmarks/copy_bubble.sh OUTDIR [overrides]}; shift; mkdir -p "$out"
case_args=${*:-policy=dynaexq budget=bf16_50pct workload.max_seqs=2 route_lag=2 runtime.layers=48}
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
for v in host device; do
  MOEBITS_INPUTS=$v timeout 120 python3 -m moebits analysis validate --hardware conf/hardware/calibrated_h200.yaml \
    --out "$out/val" --case "cb_$v" -- $case_args runtime.engine=GRAPH progress=false 2>&1 | grep -v Warning | tail -1
done
${PYTHON:-python3} benchmarks/copy_bubble_summary.py "$out/val" -o "$out/copy_bubble.json" \
  --machine "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1), $(date -u +%FT%RZ)"
