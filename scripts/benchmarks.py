"""Run the whole benchmark set and write its tables into one folder (for BENCHMARKS.md).

Usage: python scripts/benchmarks.py --out DIR [--work DIR] [--device cuda] [--quick] [--extended]
       [--parts train extraction tiny sizes]

Runs, each as its own process: training cost per step (full-size and tiny architectures, batch 1
and 8, cache vs end-to-end vs adapter baseline, and on CUDA the cache's step as one CUDA graph; with ``--extended`` also the LCD without stage
sharing and at width 128); extraction and data-path throughput (full-size random-init backbones on
the toy dataset, eager and with ``--cuda-graphs``, each with a torch.profiler table of one more
extraction; a full-size-layout cache of random tokens; the tiny backbones); cache sizes per preset
and dtype. On one H200 (2026-11-27) the training part took 4.1 minutes and the full-size extraction
with 48 clips 1.7 (the graphed training rows then failed at capture, a bug fixed since); with 192
clips on a GPU (since then) and the graphed rows running, the whole set is likely near 9 minutes:
``--parts`` runs a subset, so that two calls of a machine with a 10-minute limit per command cover it. On a CPU use ``--quick``
(full-size at batch 1 only).
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
    ap.add_argument("--extended", action="store_true", help="also other LCD widths and sharing (a few minutes more)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="run only these parts (e.g. two calls of a machine with a per-command time limit)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    py = sys.executable
    full_batches = ["1"] if args.quick else ["1", "8"]
    # toy clips to extract: on a GPU enough that one-off work (the first batch's precision check, graph
    # capture, kernel selection) weighs little against the steady rate; 48 (15 batches) did not
    clips = "12" if args.quick else "192" if args.device.startswith("cuda") else "48"
    runs = [  # (part, command, file for stdout); the headline figures first, so a run cut short still has them
        ("train", [py, HERE / "bench_train_cost.py", "--sizes", "full", "--batches", *full_batches, "--device", args.device,
          "--steps", "2" if args.quick else "3", "--out", args.out / "train_full",
          *(["--cuda-graphs"] if args.device.startswith("cuda") else [])], None),
        ("extraction", [py, HERE / "bench_pipeline.py", "--backbones", "specific", "--clips", clips,
          "--device", args.device, "--repeats", "1" if args.quick else "3",
          "--work", work, "--out", args.out, "--data-clips", "16" if args.quick else "64", "--trace"], None),
        ("extraction", [py, HERE / "bench_pipeline.py", "--backbones", "specific", "--clips", clips,
          "--device", args.device, "--repeats", "1" if args.quick else "3", "--work", work, "--out", args.out,
          "--data-clips", "0", "--cuda-graphs", "--trace"], None),
        ("tiny", [py, HERE / "bench_pipeline.py", "--backbones", "tiny", "--clips", clips, "--device", args.device,
          "--work", work, "--out", args.out, "--data-clips", "0"], None),
        ("tiny", [py, HERE / "bench_train_cost.py", "--sizes", "tiny", "--batches", "1", "8", "--device", args.device,
          "--modes", "cache:last-grid", "cache:full", "end-to-end", "adapter", "--out", args.out / "train_tiny"], None),
        ("sizes", [py, HERE / "cache_sizes.py"], "cache_sizes.md"),
    ]
    if args.extended:  # the LCD's width and sharing against the same end-to-end baseline
        for name, sets in (("train_full_unshared", ["lcd.share=none"]), ("train_full_d128", ["lcd.dim=128"])):
            runs.append(("train", [py, HERE / "bench_train_cost.py", "--sizes", "full", "--batches", *full_batches,
                          "--device", args.device, "--steps", "2", "--modes", "cache:last-grid", "end-to-end",
                          *[f"--set={x}" for x in sets], "--out", args.out / name], None))
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


if __name__ == "__main__":
    main()
