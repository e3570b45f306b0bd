"""Operators the host issues per batch: the backbones' pure forward against extraction's
``TokenForward.encoded`` (forward + pooling + encoding + copies), counted with torch.profiler.

Usage: python scripts/extract_ops.py [--backbones specific|tiny] [--batch 4] [--dtype float16]

Why: on a GPU, extraction of the full-size backbones is bound by the host launching operators, not
by the GPU (BENCHMARKS.md, section "GPU figures"), so its cost against the pure forward is about the
ratio of these counts. Counted on the CPU, where the same operators run (a GPU run adds the copies to
the host as operators of their own). "kernels" leaves out operators that only make views of memory.
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VIEWS = {"aten::view", "aten::reshape", "aten::transpose", "aten::slice", "aten::select", "aten::permute",
         "aten::as_strided", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::alias", "aten::detach",
         "aten::t", "aten::flatten", "aten::unflatten", "aten::split", "aten::chunk", "aten::lift_fresh",
         "aten::_unsafe_view", "aten::unbind", "aten::narrow", "aten::split_with_sizes"}


def count(fn) -> collections.Counter:
    """Top-level operators ``fn`` calls (not those they call in turn)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)


def main() -> None:
    import numpy as np
    import torch

    from mettle.cache import plan_cache
    from mettle.cache.dtypes import get_dtype
    from mettle.extract.config import ExtractConfig, load_backbones
    from mettle.extract.tokens import TokenForward
    from mettle.manifests import Clip, Manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="specific")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    models = load_backbones(ExtractConfig(dataset="-", cache="-", backbones=args.backbones, random_init=True))
    manifest = Manifest("ops", (Clip("c0", ("train",), 10, 10.0, {"video": "c0"}),), {"event": ("a", "b")})
    meta = plan_cache(manifest, {m: b.record() for m, b in models.items()})  # the defaults: last-grid
    rng = np.random.default_rng(0)
    media = {"visual": rng.integers(0, 256, (args.batch, 112, 112, 3), dtype=np.uint8),
             "audio": (0.1 * rng.standard_normal((args.batch, 32000))).astype(np.float32)}
    print(f"backbones {args.backbones}, batch {args.batch}, {args.dtype}, default preset and budget")
    print("| backbone | arrays | pure forward: operators (kernels) | encoded(): operators (kernels) | extra |")
    print("| --- | --- | --- | --- | --- |")
    for m, b in models.items():
        arrays = [a for a in meta.arrays if a.modality == m]
        fw = TokenForward(b, arrays, torch.device("cpu"), "float32")
        x, idx, dtype = b.preprocess(media[m]), [a.block_index for a in arrays], get_dtype(args.dtype)
        fw.encoded(x, dtype).wait()  # warm-up
        with torch.no_grad():
            pure = count(lambda: b.forward_tokens(x, idx))
        enc = count(lambda: fw.encoded(x, dtype).wait())
        kernels = {k: sum(n for op, n in c.items() if op not in VIEWS) for k, c in (("pure", pure), ("enc", enc))}
        extra = ", ".join(f"{op} {n}" for op, n in sorted((enc - pure).items()) if op not in VIEWS)
        print(f"| {b.name} | {len(arrays)} | {sum(pure.values())} ({kernels['pure']}) | {sum(enc.values())} "
              f"({kernels['enc']}) | {extra} |")


if __name__ == "__main__":
    main()
