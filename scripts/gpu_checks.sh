#!/usr/bin/env bash
# The checks a short GPU loan should run, in order of worth, each under its own time limit, writing
# its tables and logs into OUT (default ./gpu_checks). All parts: about 8-9 minutes on an H200
# (estimated from the parts' times of 2026-11-27, not yet run as one script): more than one call of
# the device tool may run (600 s), so name the parts to run in two calls. See BENCHMARKS.md.
#
# Usage: bash scripts/gpu_checks.sh [OUT] [WORK] [PART ...]      (no PART: all, in this order)
#   gpu_tests       the GPU tests (kept weight casts, graphed extraction with partial batches, training graphs;
#                   since the sixth session: the LCD's bmm into strided out= views on CUDA, the capture checked
#                   by an eager step run before it; since the eighth: TF32 products, two graphs taking turns;
#                   since the ninth: extraction's copies on streams of their own, five batches in flight),
#                   then the loader test with worker processes on its own (it hung in the eighth session; since
#                   the ninth a process with CUDA starts its loader workers from a forkserver; since the tenth
#                   the cache keeps them from one pass to the next; 2026-11-28: a resumed CUDA run against an
#                   uninterrupted one, two toy trainings, ~40 s more)
#   train           end-to-end and the adapter baseline against the eager and the graphed cache step (float16
#                   and int8 tokens; overlap_copy: two graphs, each batch copied in during the step before), full
#                   size, batch 1 and 8, each step timed alone and back to back (the seventh session: 23.0x / 12.7x time and
#                   9.5x / 11.8x memory against end-to-end; the adapter baseline was last run against the
#                   graphed step at f5a0833)
#   train_chunks    the graphed cache step with lcd.chunk_mib=8, 16 (the CUDA default before 2026-11-27's
#                   fifth session) and 64: what fewer, larger chunks buy in time and cost in memory (counted
#                   on the CPU since the sixth session: 64 MiB at batch 8 is 27 % fewer LCD operators than 32
#                   for +44 MiB of peak: make it the CUDA default if the time is worth it); since 2026-11-28
#                   also 8: the CPU counts -20 / -23 MiB of a step's peak at batch 1 / 8 for +5 / +23 % operators
#   train_fp32      the graphed step with lcd.matmul=float32 (full float32 products, the default before the eighth
#                   session, which made TF32 the LCD's default on CUDA): what TF32 buys, beside train's rows
#   step_profile    kernels and peak memory of one eager step at batch 8, the LCD's products as TF32 (the default)
#                   and as float32, with the 12 kernels taking the most device time (the eighth session, float32:
#                   10.7 ms of kernels, 6.5 ms of it FFMA matrix products)
#   extract_long    extraction with graphs on 576 toy clips, two runs: one-off costs (graph captures, the float16
#                   check) weigh a third as much as on 192 clips, nearer a real dataset's share; since the ninth
#                   session with the joins on stage threads and the copies on streams of their own, and
#                   TokenForward.encoded timed with its copies on the compute stream and on their own streams
#   extract_trace   one more such extraction under torch.profiler: how busy the GPU was (the union of its kernels
#                   and copies) and its idle gaps: host stalls (the eighth session's 73 %) or device work beyond
#                   the forward (pooling, encoding, copies)?
#   train_workspace the graphed step with cuBLAS's own workspace (--set cublas_workspace=library), beside train's
#                   rows under mettle-train's default since 2026-11-28 (4 MiB a stream: on the H200 that day
#                   52 / 49 MiB less peak at batch 1 / 8 for 1-6 % of the time; end-to-end lost 17-40 % under it)
#   encode_profile  host time per operator: the pure forward against TokenForward.encoded (71 % of it eagerly
#                   on the H200 for ~5 % more operators: where does the rest go?)
#   extract_eager   extraction, 192 toy clips, three runs, --no-cuda-graphs (graphs are the default on CUDA since
#                   the seventh session: 77 % of the forward against 47 % eagerly on an H200)
#   extract_graphs  the same with --cuda-graphs (since the seventh session three put threads, not one: the
#                   launching thread had waited 1.28 s of 3.01 s for the one)
#   extract_switch  eager extraction with a 0.5 ms switch interval
#   spy             py-spy's view of who holds Python's lock during one extraction, as by default (needs py-spy)
#   extract_host    extraction's host side alone on this machine (a stand-in for the device work)
# The parts' times on an H200 (seventh session): gpu_tests 60 s, train 105, train_chunks 64, step_profile
# ~20, train_workspace ~40 (graphed only; ~70 with end-to-end), extract_eager 46-51, extract_graphs 45-58;
# eighth session: train (with overlap:last-grid) 176, train_fp32 41, step_profile 13, extract_long 75,
# extract_graphs 56; the new GPU tests alone ~50 s with their fixtures; 2026-11-28: gpu_tests 62 + 39 (the
# loader test alone), extract_long 81, extract_trace 89, train_workspace (with end-to-end) 60, train 159: 499 s.
# The per-part limits below are ceilings that add up to more than a call's 600 s, and what a killed call
# leaves in OUT still comes back. Next loan: BENCHMARKS.md, "Open work and the next GPU loan". DEVICE=cpu BACKBONES=tiny SIZE=tiny
# runs the parts on a CPU, to try the script.
#
# On the lent machine (Python 3.12 and torch there, none of mettle's other packages, no network):
# carry an ignored folder `.whl/` of cp312 wheels made here beforehand (`echo /.whl/ >> .git/info/exclude`;
# `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
# --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl zarr numcodecs donfig google-crc32c
# msgspec dask distributed partd locket tornado tblib zict av librosa audioread soundfile soxr pooch
# decorator cffi pycparser platformdirs py-spy`: 44 MB, what the seventh session carried; the image has
# torch, timm, h5py, numpy, click, pillow, tqdm, pyyaml, matplotlib, pytest and hypothesis),
# then prefix the command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export
#   PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH; mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/mettle;
#   export PYTHONPATH=/tmp/pkg:$PYTHONPATH
# (the repository root is the package `mettle`), and pass "$OUT" as the first argument so that the
# logs come back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_checks}
WORK=${2:-/tmp/bwork}
shift $(( $# < 2 ? $# : 2 ))
PARTS=${*:-gpu_tests train train_fp32 train_chunks step_profile train_workspace encode_profile extract_eager extract_graphs extract_long extract_trace extract_switch spy extract_host}
for part in $PARTS; do  # every name checked before anything runs
    case " gpu_tests train train_fp32 train_chunks step_profile train_workspace encode_profile extract_eager \
extract_graphs extract_long extract_trace extract_switch spy extract_host " in
    *" $part "*) ;;
    *) echo "unknown part $part (see the usage at the top of $0)"; exit 2 ;;
    esac
done
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
show() {  # the lines of a part's log worth reading in the tool's reply
    echo "== $1"; grep -v '^$' "$OUT/$1.log" | grep -v 'Warning\|warn\|USDT\|gpuGetDevice' | tail -${2:-30}
}
DEVICE=${DEVICE:-cuda}
BACKBONES=${BACKBONES:-specific}
SIZE=${SIZE:-full}
GRAPHED=graphs:last-grid
OVERLAP=overlap:last-grid
[ "$DEVICE" = cuda ] || GRAPHED=cache:last-grid OVERLAP=  # CUDA graphs need CUDA: the eager step, to try the script
EXTRACT=("$PY" scripts/bench_pipeline.py --backbones "$BACKBONES" --clips 192 --device "$DEVICE" --work "$WORK" --data-clips 0)
TRAIN=("$PY" scripts/bench_train_cost.py --sizes "$SIZE" --batches 1 8 --device "$DEVICE" --steps 3)
for part in $PARTS; do
    case $part in
    # the loader test with worker processes hung in both of the eighth session's calls (a worker forked from a
    # process with page-locked batches, a pin thread and idle read threads; see README): on its own, after the rest
    gpu_tests) step gpu_tests 200 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_gpu_train.py -rs \
            -k "not page_locked_memory" -o faulthandler_timeout=60
        show gpu_tests 4
        step gpu_fork 60 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs -k page_locked_memory \
            -o faulthandler_timeout=25
        show gpu_fork 8 ;;
    train) step train 300 "${TRAIN[@]}" --modes cache:last-grid end-to-end adapter $GRAPHED $GRAPHED/int8 $OVERLAP \
            --out "$OUT/train"
        show train 34 ;;
    train_fp32) step train_fp32 100 "${TRAIN[@]}" --modes $GRAPHED --set lcd.matmul=float32 --out "$OUT/train_fp32"
        show train_fp32 8 ;;
    train_chunks)
        for mib in 8 16 64; do
            step train_chunk$mib 100 "${TRAIN[@]}" --modes $GRAPHED --set lcd.chunk_mib=$mib --out "$OUT/train_chunk$mib"
            show train_chunk$mib 8
        done ;;
    step_profile) step step_profile 120 $PY scripts/step_profile.py --device $DEVICE --size $SIZE --batches 8 \
            --compare lcd.matmul=float32 --top 12
        show step_profile 36 ;;
    train_workspace) step train_workspace 100 "${TRAIN[@]}" --modes $GRAPHED --set cublas_workspace=library \
            --out "$OUT/train_workspace"
        show train_workspace 8 ;;
    encode_profile) step encode_profile 120 $PY scripts/encode_profile.py --backbones $BACKBONES --device $DEVICE
        show encode_profile 34 ;;
    extract_eager) step extract_eager 200 "${EXTRACT[@]}" --repeats 3 --out "$OUT" --no-cuda-graphs
        show extract_eager ;;
    extract_graphs) step extract_graphs 150 "${EXTRACT[@]}" --repeats 3 --out "$OUT/graphs" --cuda-graphs
        show extract_graphs ;;
    extract_long) step extract_long 200 "${EXTRACT[@]}" --clips 576 --repeats 2 --out "$OUT/long" --cuda-graphs
        show extract_long ;;
    extract_trace) step extract_trace 150 "${EXTRACT[@]}" --clips 576 --repeats 1 --out "$OUT/trace" --cuda-graphs --trace
        echo "== extract_trace"; head -3 "$OUT/trace/extraction_trace_$BACKBONES-graphs.txt" ;;
    # the launching thread waits up to Python's switch interval (5 ms) for the lock after each operator
    # when another thread runs Python (a 1000x slowdown in a throwaway test): the same, at 0.5 ms
    extract_switch) step extract_switch 200 "${EXTRACT[@]}" --repeats 3 --out "$OUT/switch" --no-cuda-graphs \
            --switch-interval 0.0005
        show extract_switch ;;
    spy) if command -v py-spy > /dev/null; then
            step spy 120 py-spy record --gil --threads -r 50 -f raw -o "$OUT/spy_gil.txt" -- "${EXTRACT[@]}" --repeats 1 \
                --no-data-path
            $PY scripts/spy_threads.py "$OUT/spy_gil.txt" --within extract > "$OUT/spy_gil.md" 2>&1
            echo "== spy"; head -14 "$OUT/spy_gil.md"
        else
            echo "spy: skipped (py-spy is not installed)"
        fi ;;
    extract_host) step extract_host 90 $PY scripts/bench_extract_host.py --backbones $BACKBONES --clips 192 \
            --device $DEVICE --repeats 1 --work "$WORK"
        show extract_host ;;
    esac
done
