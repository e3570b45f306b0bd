"""Where each thread's time went, from a py-spy raw profile: samples per thread and its top frames.

Usage: python scripts/spy_threads.py PROFILE [--within extract] [--top 6]

Record the profile first, e.g. on a GPU machine (BENCHMARKS.md, "Fourth session"):
    py-spy record --threads -r 50 -f raw -o PROFILE -- python scripts/bench_pipeline.py ...
(``--gil`` keeps only samples of the thread holding Python's lock: then the shares say who holds
it while the thread that launches the backbones waits; ``--idle`` keeps waiting threads too.)

Each line of a raw profile is ``frame;frame;...;frame COUNT`` with the thread as the first frame.
``--within NAME`` keeps the samples whose stack passes through a function named NAME (e.g.
``extract``: the extraction itself, not imports or setup); threads started by it are kept whole.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def summarise(path: Path, within: str | None, top: int) -> list[str]:
    """Per thread: samples, share, and the ``top`` most sampled (leaf function, innermost named frame) pairs."""
    threads: collections.Counter = collections.Counter()
    frames: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lines = [line.rpartition(" ") for line in path.read_text().splitlines()]
    samples = [(stack.split(";"), int(count)) for stack, _, count in lines if stack and count.isdigit()]
    # a thread's label is "thread (ID)" or "thread (ID): NAME" (py-spy names a thread once it can): by ID
    labels: dict[str, str] = {}
    for parts, _ in samples:
        tid = parts[0].split(":")[0]
        labels[tid] = parts[0] if ":" in parts[0] else labels.get(tid, parts[0])
    for parts, n in samples:
        thread, names = labels[parts[0].split(":")[0]], [p.split(" (")[0] for p in parts[1:]]
        if within and thread.endswith("MainThread") and within not in names:
            continue
        threads[thread] += n
        leaf = names[-1] if names else "?"
        caller = names[-2] if len(names) > 1 else ""
        frames[thread][f"{caller} > {leaf}" if caller else leaf] += n
    total = sum(threads.values()) or 1
    out = [f"{total} samples in {len(threads)} threads", "", "| thread | samples | share | top frames (caller > leaf: samples) |",
           "| --- | --- | --- | --- |"]
    for thread, n in threads.most_common():
        tops = "; ".join(f"{f}: {c}" for f, c in frames[thread].most_common(top))
        out.append(f"| {thread} | {n} | {100 * n / total:.1f} % | {tops} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--within", default=None, help="keep the main thread's samples under this function only")
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    print("\n".join(summarise(args.profile, args.within, args.top)))


if __name__ == "__main__":
    main()
