#!/usr/bin/env bash
# The checks a short GPU loan should run, in order of worth, each under its own time limit, writing
# its tables and logs into OUT (default ./gpu_checks). About 6-7 minutes on an H200 (estimated from
# the parts' times of 2026-11-27, not yet run as one script). See BENCHMARKS.md, "Fourth session".
#
# Usage: bash scripts/gpu_checks.sh [OUT] [WORK]
#   1. the GPU tests (kept weight casts, graphed extraction with partial batches, graphed training)
#   2. extraction eager and with --cuda-graphs, three runs each, 192 toy clips (whether graphs should
#      be extraction's default on CUDA, as they are for training)
#   3. eager extraction with a 0.5 ms switch interval; py-spy's view of who holds Python's lock during one
#      eager extraction (needs py-spy)
#   4. extraction's host side alone on this machine (a stand-in for the device work)
#   5. end-to-end against the graphed cache step, full size, batch 1 and 8 (end-to-end's backbones now
#      keep their float16 weight casts)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_checks}
WORK=${2:-/tmp/bwork}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, say how it went
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $(( $(date +%s) - start )) s"
}
step gpu_tests 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs
tail -3 "$OUT/gpu_tests.log"
step extract_eager 200 $PY scripts/bench_pipeline.py --backbones specific --clips 192 --device cuda --repeats 3 \
    --work "$WORK" --out "$OUT" --data-clips 0 --no-data-path
step extract_graphs 150 $PY scripts/bench_pipeline.py --backbones specific --clips 192 --device cuda --repeats 3 \
    --work "$WORK" --out "$OUT" --data-clips 0 --cuda-graphs
# the launching thread waits up to Python's switch interval (5 ms) for the lock after each operator when
# another thread runs Python (BENCHMARKS.md, a 1000x slowdown in a throwaway test): the same, at 0.5 ms
step extract_switch 200 $PY scripts/bench_pipeline.py --backbones specific --clips 192 --device cuda --repeats 3 \
    --work "$WORK" --out "$OUT/switch" --data-clips 0 --no-data-path \
    --switch-interval 0.0005
if command -v py-spy > /dev/null; then
    step spy 120 py-spy record --gil --threads -r 50 -f raw -o "$OUT/spy_gil.txt" -- \
        $PY scripts/bench_pipeline.py --backbones specific --clips 192 --device cuda --repeats 1 --work "$WORK" \
        --data-clips 0 --no-data-path
    $PY scripts/spy_threads.py "$OUT/spy_gil.txt" --within extract > "$OUT/spy_gil.md" 2>&1
else
    echo "spy: skipped (py-spy is not installed)"
fi
step extract_host 90 $PY scripts/bench_extract_host.py --backbones specific --clips 192 --device cuda --repeats 1 \
    --work "$WORK"
step train 200 $PY scripts/bench_train_cost.py --sizes full --batches 1 8 --device cuda --steps 3 \
    --modes cache:last-grid end-to-end graphs:last-grid --out "$OUT/train"
for f in extract_eager extract_graphs extract_switch extract_host train; do
    echo "== $f"; grep -v '^$' "$OUT/$f.log" | grep -v 'Warning\|warn' | head -30
done
[ -f "$OUT/spy_gil.md" ] && { echo "== spy"; head -14 "$OUT/spy_gil.md"; }
