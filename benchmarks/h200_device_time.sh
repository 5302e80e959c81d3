#!/usr/bin/env bash
# Session 8, on the H200: the whole-step validation cases again, now with each pass's device time (busy_s) measured,
# to split every whole-step TPOT error into the device's part (the graph tables) and the rest (host, copies).
#   part 1: the GPU fidelity test (the new busy path), then the 40 whole-step cases (route_lag=2 lines of the
#           validation case files) -> OUTDIR/part1.tgz
#   part 2: the same 40 again as CASE_s2 (a later call) -> OUTDIR/part2.tgz
#   part 3: the 25 synthetic calibration cases (benchmarks/graph_cases_calibration.txt), whose host costs and now
#           the per-pass copies outside the graph (pass_io_s, from each pass's latency less its device time) the
#           profile is fitted to -> OUTDIR/part3.tgz; part 4: the same again as CASE_s2 -> OUTDIR/part4.tgz
#   part 5: the 30 per-layer validation cases (caches, dymoe, hobbit; staging) -> OUTDIR/part5.tgz; part 6: the
#           same again as CASE_s2 -> OUTDIR/part6.tgz
#   part 7: the calibration cases once more as CASE_s3, now logging the layer steps that issue copies (copy_steps:
#           the per-layer seam's issue cost, HostCosts.layer_copy_s) -> OUTDIR/part7.tgz
# Then, here: tar xzf part1.tgz; tar xzf part2.tgz; for d in v1 v2; do tar xzf $d/validate.tgz -C $d; done
#   moebits analysis validate --resim v1/val v2/val --hardware calibrated_h200 --out fid; moebits analysis fidelity fid
# Usage (repository root, device recipe PYTHONPATH): bash benchmarks/h200_device_time.sh 1|2|3|4|5|6|7 OUTDIR
set -u
part=${1:?usage: bash benchmarks/h200_device_time.sh 1|2|3|4|5|6|7 OUTDIR}; out=${2:?usage: bash benchmarks/h200_device_time.sh 1|2|3|4|5|6|7 OUTDIR}
mkdir -p "$out"; work=/tmp/h200_device_time; mkdir -p "$work"; start=$(date +%s)
export PYTHONUNBUFFERED=1 MOEBITS_TRITON_AUTOTUNE=0 PYTHONSAFEPATH=1
left() { echo $(( ${SESSION_BUDGET_S:-560} - ($(date +%s) - start) )); }
grep -h 'route_lag=2' benchmarks/graph_cases.txt benchmarks/graph_cases_traces.txt benchmarks/graph_cases_full.txt \
  benchmarks/graph_cases_coverage.txt benchmarks/graph_cases_dynamo.txt | grep -v '^\s*#' > "$work/whole.txt"
cat benchmarks/graph_cases.txt benchmarks/graph_cases_traces.txt benchmarks/graph_cases_full.txt benchmarks/graph_cases_coverage.txt \
  benchmarks/graph_cases_dynamo.txt benchmarks/graph_cases_staging.txt | grep -v '^\s*#' | grep -v '^\s*$' \
  | grep -v 'route_lag=2' > "$work/layer.txt"
cases=$work/whole.txt; [ "$part" -ge 3 ] && cases=benchmarks/graph_cases_calibration.txt
{ [ "$part" = 5 ] || [ "$part" = 6 ]; } && cases=$work/layer.txt
keep=""
if [ "$part" = 1 ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fidelity.py 2>&1 | tail -3 | tee "$work/tests.log"
  keep=tests.log
fi
suffix=$( { [ "$part" = 2 ] || [ "$part" = 4 ] || [ "$part" = 6 ]; } && echo _s2)
[ "$part" = 7 ] && suffix=_s3
GFID_WORK="$work/g$part" GFID_COPY_CHECK=0 GFID_MODELS="" GFID_TURNAROUND="" GFID_BUDGET_S=$(left) GFID_SUFFIX=$suffix \
  GFID_CASES="$cases" bash benchmarks/h200_graph_fidelity.sh "$work/v$part" > "$work/v$part.log" 2>&1
tail -8 "$work/v$part.log"
tar czf "$out/part$part.tgz" -C "$work" $keep "v$part" "v$part.log"
echo "part $part done in $(( $(date +%s) - start ))s"; ls -la "$out"
