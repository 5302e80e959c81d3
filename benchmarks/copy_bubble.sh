#!/usr/bin/env bash
# The copy bubble (docs/FIDELITY.md): a pass after a boundary that issued expert copies into fenced slabs runs
# longer by about the copies' transfer time on the H200, as if the pass's own small H2D copies (inputs, routing,
# the residency table) queued behind the expert copies on the copy engine. Four variants of one case in one call:
#   base   as served;
#   chunk  expert copies in pieces of MOEBITS_COPY_CHUNK_BYTES (1 MiB): a small copy waits behind one piece;
#   dev    the replayed passes' inputs staged on the device before the timed loop (no input DMA per pass);
#   both   chunk + dev.
# Usage (repository root, device recipe PYTHONPATH): bash benchmarks/copy_bubble.sh OUTDIR [CASE_OVERRIDES...]
# Writes OUTDIR/val (one measured run per variant, graded with calibrated_h200; moebits analysis validate --resim).
set -u
out=${1:?usage: bash benchmarks/copy_bubble.sh OUTDIR [overrides]}; shift; mkdir -p "$out"
case_args=${*:-policy=dynaexq budget=bf16_50pct workload.max_seqs=2 route_lag=2 runtime.layers=48}
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
for v in base chunk dev both; do
  chunk=0; inputs=host
  case $v in chunk) chunk=1048576 ;; dev) inputs=device ;; both) chunk=1048576; inputs=device ;; esac
  MOEBITS_COPY_CHUNK_BYTES=$chunk MOEBITS_INPUTS=$inputs timeout 120 python3 -m moebits analysis validate \
    --hardware conf/hardware/calibrated_h200.yaml --out "$out/val" --case "cb_$v" -- $case_args runtime.engine=GRAPH \
    progress=false 2>&1 | grep -v Warning | tail -1
done
