#!/bin/sh
# Regenerate traces/data/default.parquet byte for byte from the recorded knobs; needs no real
# traces. Run from the repository root. How the knobs were fitted: traces/data/README.md.
set -e
moebits traces synth --model Qwen3-30B-A3B --seqs 16 --prompt-len 32 --steps 128 \
    --knobs traces/data/default_knobs.json --seed 0 \
    --note "moebits default trace: Qwen3-30B-A3B-shaped synthetic routing; knobs fitted to real-trace statistics, see traces/data/README.md" \
    -o traces/data/default.parquet
