"""Run the whole benchmark set and write its tables into one folder (for BENCHMARKS.md).

Usage: python scripts/benchmarks.py --out DIR [--work DIR] [--device cuda] [--quick] [--extended]
       [--parts train extraction tiny sizes]

The set, each run as its own process: training cost per step (full-size architectures at batch 1
and 8: cache vs end-to-end vs adapter baseline, an int8 cache, and on CUDA the cache's step as
mettle-train runs it there: replayed CUDA graphs, two taking turns (``overlap:last-grid``); the tiny
architectures); extraction and data-path
throughput (full-size random-init backbones on the toy dataset, with a torch.profiler table of one
more extraction; extraction's host side alone, with a stand-in for the device work; a
full-size-layout cache of random tokens); cache sizes per preset and dtype.
``--extended`` adds what is not one of the issue's figures (a few minutes more): the step as one
graph (``overlap_copy=false``) and at the `full` budget, extraction without CUDA graphs on CUDA (``--no-cuda-graphs``; graphs are
the default there since 2026-11-27's seventh session), extraction with the tiny backbones, and
the LCD without stage sharing and at width 128.

Time on one H200 (2026-11-27, commit 15d5e9e, measured in two calls): the training part 2.4
minutes (12 processes), extraction + tiny + sizes 4.8 (extraction 173 s, tiny 105 s, sizes
13 s): 7.2 minutes. The host-side extraction added since (one run) takes some 10-20 s more (not
yet timed on a GPU). Each part prints its time; ``--parts`` runs a subset (a machine with a per-command
limit can take the set in two calls). On a CPU use ``--quick`` (full-size at batch 1 only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("train", "extraction", "tiny", "sizes")  # full-size training cost, full-size extraction, tiny, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="scratch folder for toy data and caches (default: OUT/work)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="CPU-sized: skip the heaviest full-size runs")
    ap.add_argument("--extended", action="store_true", help="also graphed and tiny extraction, the graphed step at the full budget, other LCD "
                    "widths and sharing (a few minutes more)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="run only these parts (e.g. two calls of a machine with a per-command time limit)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    py = sys.executable
    full_batches = ["1"] if args.quick else ["1", "8"]
    # toy clips to extract: on a GPU enough that one-off work (the first batch's precision check, graph
    # capture, kernel selection) weighs little against the steady rate; 48 (15 batches) did not
    cuda = args.device.startswith("cuda")
    # (a) as mettle-train runs it on CUDA (graphed steps, two graphs taking turns, by default) beside the eager modes
    train_modes = ["cache:last-grid", "cache:full", "end-to-end", "adapter", "cache:last-grid/int8",
                   *(["overlap:last-grid"] if cuda else [])]
    clips = "12" if args.quick else "192" if cuda else "48"
    runs = [  # (part, command, file for stdout); the headline figures first, so a run cut short still has them
        ("train", [py, HERE / "bench_train_cost.py", "--sizes", "full", "--batches", *full_batches, "--device", args.device,
          "--steps", "2" if args.quick else "3", "--out", args.out / "train_full", "--modes", *train_modes], None),
        ("extraction", [py, HERE / "bench_pipeline.py", "--backbones", "specific", "--clips", clips,
          "--device", args.device, "--repeats", "1" if args.quick else "3",
          "--work", work, "--out", args.out, "--data-clips", "16" if args.quick else "64", "--trace"], None),
        # a diagnostic, not one of the figures: one run, to keep the set under 8 minutes on a GPU
        ("extraction", [py, HERE / "bench_extract_host.py", "--backbones", "specific", "--clips", clips,
          "--device", args.device, "--repeats", "1", "--work", work], "extract_host.md"),
        ("tiny", [py, HERE / "bench_train_cost.py", "--sizes", "tiny", "--batches", "1", "8", "--device", args.device,
          "--modes", "cache:last-grid", "cache:full", "end-to-end", "adapter", "--out", args.out / "train_tiny"], None),
        ("sizes", [py, HERE / "cache_sizes.py"], "cache_sizes.md"),
    ]
    if args.extended:  # graphed extraction, tiny extraction; the LCD's width and sharing against the same baseline
        if cuda:
            runs.append(("train", [py, HERE / "bench_train_cost.py", "--sizes", "full", "--batches", *full_batches,
                                   "--device", args.device, "--steps", "2" if args.quick else "3",
                                   "--modes", "cache:last-grid", "graphs:last-grid", "graphs:full",
                                   "--out", args.out / "train_full_graphs"], None))
            runs.append(("extraction", [py, HERE / "bench_pipeline.py", "--backbones", "specific", "--clips", clips,
                                        "--device", args.device, "--repeats", "1" if args.quick else "3",
                                        "--work", work, "--out", args.out,
                                        "--data-clips", "0", "--no-cuda-graphs", "--trace"], None))
        runs.append(("tiny", [py, HERE / "bench_pipeline.py", "--backbones", "tiny", "--clips", clips, "--device",
                              args.device, "--work", work, "--out", args.out, "--data-clips", "0"], None))
        for name, sets in (("train_full_unshared", ["lcd.share=none"]), ("train_full_d128", ["lcd.dim=128"])):
            runs.append(("train", [py, HERE / "bench_train_cost.py", "--sizes", "full", "--batches", *full_batches,
                          "--device", args.device, "--steps", "2", "--modes", "cache:last-grid", "end-to-end",
                          *[f"--set={x}" for x in sets], "--out", args.out / name], None))
    started = time.perf_counter()
    for part, cmd, capture in runs:
        if part not in args.parts:
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        took = time.perf_counter() - t0
        print(f"{' '.join(str(c) for c in cmd[1:])}: exit {proc.returncode} in {took:.0f} s", flush=True)
        if proc.stdout:
            print(proc.stdout, flush=True)
        if capture and proc.returncode == 0:
            (args.out / capture).write_text(proc.stdout)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr, flush=True)
    print(f"benchmark set ({' '.join(args.parts)}{', extended' if args.extended else ''}): "
          f"{(time.perf_counter() - started) / 60:.1f} minutes", flush=True)


if __name__ == "__main__":
    main()
