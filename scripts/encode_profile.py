"""Where the host's time goes: the backbones' pure forward against ``TokenForward.encoded``, per operator.

Usage: python scripts/encode_profile.py [--backbones specific|tiny] [--device cuda] [--batch 32]
       [--batches 12] [--top 12]

Why: on one H200 (BENCHMARKS.md, fourth session of 2026-11-27) ``TokenForward.encoded`` (forward,
pooling, encoding, copies to the host) ran at 71 % of the pure forward's speed eagerly and at 101 %
replayed as CUDA graphs, although it adds only ~40 operators to the forward's ~800 a batch
(``scripts/extract_ops.py``): the host side of ``encoded`` costs more than its operator count says.
This runs both the way ``scripts/bench_pipeline.py`` times them (the same batches, pure forward from
inputs already on the device, ``encoded`` from page-locked host inputs with two batches in flight)
under torch.profiler, and prints for each its wall time and the operators with the most host time
(self CPU time, summed over the batches), so the difference can be read off one table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from extract_ops import one_clip_plan, random_media
    from mettle.cache.dtypes import get_dtype
    from mettle.extract.tokens import TokenForward

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="specific")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32, help="segments a batch (extraction's default)")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    models, meta = one_clip_plan(args.backbones)  # the defaults: last-grid, float16
    storage = get_dtype(meta.dtype)
    media = random_media(args.batch)
    inputs = {m: b.preprocess(media[m]) for m, b in models.items()}
    fws = {m: TokenForward(b, [a for a in meta.arrays if a.modality == m], dev, "float16" if cuda else "float32")
           for m, b in models.items()}
    on_device = {m: x.to(dev) for m, x in inputs.items()}
    host = {m: x.pin_memory() if cuda else x for m, x in inputs.items()}
    indices = {m: fw.indices for m, fw in fws.items()}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def pure() -> None:
        for _ in range(args.batches):
            for m, b in models.items():
                ctx = torch.autocast(dev.type, dtype=torch.float16) if cuda else contextlib.nullcontext()
                with torch.no_grad(), ctx:
                    b.forward_tokens(on_device[m], indices[m])
        sync()

    def encoded() -> None:
        flights = []
        for _ in range(args.batches):
            for m, fw in fws.items():
                flights.append(fw.encoded(host[m], storage))
            while len(flights) > 2 * len(fws):
                flights.pop(0).wait()
        for f in flights:
            f.wait()

    for fn in (pure, encoded):  # warm-up: the precision check, kept casts, allocator caches
        fn()
    for name, fn in (("pure forward", pure), ("TokenForward.encoded", encoded)):
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        print(f"\n{name}: {args.batches} batches of {args.batch} segments, both backbones, {dev}: "
              f"{wall:.3f} s unprofiled; host time in operators {total:.3f} s (profiled)")
        print("| operator | calls | self host s | per call us |")
        print("| --- | --- | --- | --- |")
        for e in rows:
            print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.3f} | {e.self_cpu_time_total / max(e.count, 1):.1f} |")


if __name__ == "__main__":
    main()
