#!/usr/bin/env bash
# A whole calibrate-then-validate session on the H200: four device calls, the first three back to back (the machine
# stays warm between them; host and device timing drift between calls far apart, docs/FIDELITY.md session 5), the
# fourth later, ideally on a fresh machine. Each part fits one 10-minute call; results go to OUTDIR as tarballs, for
# the device tool to bring back.
#   part 1: the fast model's GPU tests, then every whole-pass design set (benchmarks/h200_all_designs.sh: each pool
#           class set the validation policies build, dynamo's channel mix a class, on the three shapes)
#           -> OUTDIR/part1.tgz
#   part 2: host modes (benchmarks/host_modes.sh: does MOEBITS_PIN_CPU keep one host speed?), then the 25 calibration
#           cases (all three shapes, staging, dynamo) -> OUTDIR/part2.tgz
#   part 3: every validation case (Qwen3, trained model, Llama-4, 48 layers, coverage, staging, dynamo), then as many
#           of the trace cases again (CASE_r2) as time allows -> OUTDIR/part3.tgz
#   part 4: (a later call) every calibration and validation case again, named CASE_s2 -> OUTDIR/part4.tgz: the
#           measurement's own call-to-call spread, graded beside part 3 (FIDELITY session 6)
# Then, here: for p in 1 2 3 4; do tar xzf part$p.tgz; done; for d in cal val s2; do tar xzf $d/validate.tgz -C $d; done
#   cp s2/val/cal_* cal/val/   # the calibration runs of both calls
#   python benchmarks/fit_graph_designs.py designs/designs_*.json --host-runs cal/val \
#     --base conf/hardware/calibrated_h200.yaml --out conf/hardware/calibrated_h200.yaml
#   moebits analysis validate --resim val/val s2/val cal/val --hardware calibrated_h200 --out fid
#   moebits analysis fidelity fid --plot P1 --spread-plot P2 --policy-plot P3
# Usage (repository root, device recipe PYTHONPATH): bash benchmarks/h200_session.sh 1|2|3|4 OUTDIR
set -u
part=${1:?usage: bash benchmarks/h200_session.sh 1|2|3|4 OUTDIR}; out=${2:?usage: bash benchmarks/h200_session.sh 1|2|3|4 OUTDIR}
mkdir -p "$out"; work=/tmp/h200_session; mkdir -p "$work"; start=$(date +%s)
left() { echo $(( ${SESSION_BUDGET_S:-560} - ($(date +%s) - start) )); }
CAL="benchmarks/graph_cases_calibration.txt"
VAL="benchmarks/graph_cases.txt benchmarks/graph_cases_traces.txt benchmarks/graph_cases_full.txt benchmarks/graph_cases_coverage.txt benchmarks/graph_cases_staging.txt benchmarks/graph_cases_dynamo.txt"
if [ "$part" = 1 ]; then
  bash benchmarks/h200_all_designs.sh "$work/designs" > "$work/designs.log" 2>&1; tail -3 "$work/designs.log"
  tar czf "$out/part1.tgz" -C "$work" designs designs.log
elif [ "$part" = 2 ]; then
  bash benchmarks/host_modes.sh "$work/host_modes" "${HOST_MODES_REPS:-3}" "${HOST_MODES_CPU:-2}" > "$work/host_modes.log" 2>&1
  tail -8 "$work/host_modes.log"
  GFID_WORK="$work/gcal" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) GFID_CASES="$CAL" \
    bash benchmarks/h200_graph_fidelity.sh "$work/cal" > "$work/cal.log" 2>&1
  tail -3 "$work/cal.log"
  tar czf "$out/part2.tgz" -C "$work" host_modes host_modes.log cal cal.log
elif [ "$part" = 4 ]; then
  GFID_WORK="$work/gs2" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) GFID_SUFFIX=_s2 GFID_CASES="$CAL $VAL" \
    bash benchmarks/h200_graph_fidelity.sh "$work/s2" > "$work/s2.log" 2>&1
  tail -3 "$work/s2.log"
  tar czf "$out/part4.tgz" -C "$work" s2 s2.log
else
  GFID_WORK="$work/gval" GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) GFID_CASES="$VAL" \
    GFID_REPEAT="benchmarks/graph_cases_traces.txt" bash benchmarks/h200_graph_fidelity.sh "$work/val" > "$work/val.log" 2>&1
  tail -3 "$work/val.log"
  tar czf "$out/part3.tgz" -C "$work" val val.log
fi
echo "part $part done in $(( $(date +%s) - start ))s"; ls -la "$out"
