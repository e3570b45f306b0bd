"""Run the whole benchmark set and write its tables into one folder (for BENCHMARKS.md).

Usage: python scripts/benchmarks.py --out DIR [--device cuda] [--quick]

Runs, each as its own process: cache sizes per preset and dtype; training cost per step (tiny and
full-size architectures, batch 1 and 8, cache vs end-to-end vs adapter baseline); extraction and
data-path throughput (tiny, and full-size random-init backbones on a smaller toy). On one H100/H200
class GPU the set is sized to finish in a few minutes; on a CPU use ``--quick`` (full-size at batch 1
only, no full-size adapter at batch 8).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="CPU-sized: skip the heaviest full-size runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    runs = [
        ([py, HERE / "cache_sizes.py"], "cache_sizes.md"),
        ([py, HERE / "bench_train_cost.py", "--sizes", "tiny", "--batches", "1", "8", "--device", args.device,
          "--out", args.out / "train_tiny"], None),
        ([py, HERE / "bench_train_cost.py", "--sizes", "full", "--batches", "1", *([] if args.quick else ["8"]),
          "--device", args.device, "--steps", "2" if args.quick else "3", "--out", args.out / "train_full"], None),
        ([py, HERE / "bench_pipeline.py", "--backbones", "tiny", "--device", args.device, "--work",
          args.out / "work", "--out", args.out], None),
        ([py, HERE / "bench_pipeline.py", "--backbones", "specific", "--clips", "12", "--device", args.device,
          "--work", args.out / "work", "--out", args.out], None),
    ]
    for cmd, capture in runs:
        t0 = time.perf_counter()
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        took = time.perf_counter() - t0
        print(f"{' '.join(str(c) for c in cmd[1:])}: exit {proc.returncode} in {took:.0f} s", flush=True)
        if capture and proc.returncode == 0:
            (args.out / capture).write_text(proc.stdout)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
