#!/usr/bin/env bash
# A whole calibrate-then-validate session on the H200 in two device calls back to back (the machine stays warm
# between them; host and device timing drift between calls far apart, docs/FIDELITY.md session 5). Each part fits
# one 10-minute call; results go to OUTDIR as at most 8 files (tarballs), for the device tool to bring back.
#   part 1: host modes (benchmarks/host_modes.sh: does MOEBITS_PIN_CPU keep one host speed?), the whole-pass designs
#           (benchmarks/h200_all_designs.sh, GPU tests first), the 21 calibration cases (all three shapes, staging)
#           -> OUTDIR/part1.tgz
#   part 2: every validation case (Qwen3, trained model, Llama-4, 48 layers, coverage, staging), then as many of
#           the b1 cases again (CASE_r2) as time allows -> OUTDIR/part2.tgz
#   part 3: (a later call, ideally a fresh machine) every calibration and validation case again, named CASE_s2
#           -> OUTDIR/part3.tgz: the measurement's own call-to-call spread, graded beside part 2 (FIDELITY session 6)
# Then, here: tar xzf part1.tgz; tar xzf part2.tgz; tar xzf part3.tgz; for d in cal val s2; do tar xzf $d/validate.tgz -C $d; done
#   cp s2/val/cal_* cal/val/   # the calibration runs of both calls
#   python benchmarks/fit_graph_designs.py designs/designs_*.json --host-runs cal/val \
#     --base conf/hardware/calibrated_h200.yaml --out conf/hardware/calibrated_h200.yaml
#   moebits analysis validate --resim val/val s2/val cal/val --hardware calibrated_h200 --out fid
# Usage (repository root, device recipe PYTHONPATH): bash benchmarks/h200_session.sh 1|2|3 OUTDIR
set -u
part=${1:?usage: bash benchmarks/h200_session.sh 1|2|3 OUTDIR}; out=${2:?usage: bash benchmarks/h200_session.sh 1|2|3 OUTDIR}
mkdir -p "$out"; work=/tmp/h200_session; mkdir -p "$work"; start=$(date +%s)
left() { echo $(( ${SESSION_BUDGET_S:-560} - ($(date +%s) - start) )); }
if [ "$part" = 1 ]; then
  bash benchmarks/host_modes.sh "$work/host_modes" "${HOST_MODES_REPS:-3}" "${HOST_MODES_CPU:-2}" > "$work/host_modes.log" 2>&1
  tail -8 "$work/host_modes.log"
  bash benchmarks/h200_all_designs.sh "$work/designs" > "$work/designs.log" 2>&1; tail -3 "$work/designs.log"
  GFID_WORK="$work/gcal" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) \
    GFID_CASES="benchmarks/graph_cases_calibration.txt" bash benchmarks/h200_graph_fidelity.sh "$work/cal" > "$work/cal.log" 2>&1
  tail -3 "$work/cal.log"
  tar czf "$out/part1.tgz" -C "$work" host_modes host_modes.log designs designs.log cal cal.log
elif [ "$part" = 3 ]; then
  GFID_WORK="$work/gs2" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) GFID_SUFFIX=_s2 \
    GFID_CASES="benchmarks/graph_cases_calibration.txt benchmarks/graph_cases.txt benchmarks/graph_cases_traces.txt benchmarks/graph_cases_full.txt benchmarks/graph_cases_coverage.txt benchmarks/graph_cases_staging.txt benchmarks/graph_cases_dynamo.txt" \
    bash benchmarks/h200_graph_fidelity.sh "$work/s2" > "$work/s2.log" 2>&1
  tail -3 "$work/s2.log"
  tar czf "$out/part3.tgz" -C "$work" s2 s2.log
else
  GFID_WORK="$work/gval" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) \
    GFID_CASES="benchmarks/graph_cases.txt benchmarks/graph_cases_traces.txt benchmarks/graph_cases_full.txt benchmarks/graph_cases_coverage.txt benchmarks/graph_cases_staging.txt benchmarks/graph_cases_dynamo.txt" \
    GFID_REPEAT="benchmarks/graph_cases_traces.txt" bash benchmarks/h200_graph_fidelity.sh "$work/val" > "$work/val.log" 2>&1
  tail -3 "$work/val.log"
  tar czf "$out/part2.tgz" -C "$work" val val.log
fi
echo "part $part done in $(( $(date +%s) - start ))s"; ls -la "$out"
