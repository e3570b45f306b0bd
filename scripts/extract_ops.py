"""Operators the host issues per batch: the backbones' pure forward against extraction's
``TokenForward.encoded`` (forward + pooling + encoding + copies), counted with torch.profiler.

Usage: python scripts/extract_ops.py [--backbones specific|tiny] [--batch 4] [--dtype float16] [--autocast]

Why: on a GPU, extraction of the full-size backbones is bound by the host launching operators, not
by the GPU (BENCHMARKS.md, section "GPU figures"), so its cost against the pure forward is about the
ratio of these counts. Counted on the CPU, where the same operators run (a GPU run adds the copies to
the host as operators of their own). "kernels" leaves out operators that only make views of memory.

``--autocast`` counts instead what a GPU extraction runs: the pure forward under float16 autocast,
operators as dispatched to kernels (below autocast, so its casts are counted), for the frozen
backbone as built (weights cast once: ``extract/backbones/kept_casts.py``) and for a copy whose
Linear / Conv2d modules are PyTorch's own (autocast casts their weights in every forward).
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


def random_media(segments: int, size: int = 112, seed: int = 0) -> dict:
    """Random model inputs for ``segments`` segments, as the benchmarks feed them: ``visual`` uint8 RGB
    frames ``(segments, size, size, 3)``, ``audio`` 1-s float32 windows at 32 kHz ``(segments, 32000)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"visual": rng.integers(0, 256, (segments, size, size, 3), dtype=np.uint8),
            "audio": (0.1 * rng.standard_normal((segments, 32000))).astype(np.float32)}


def one_clip_plan(backbones: str):
    """Random-init backbones of the set ``backbones`` and the default cache plan (last-grid, float16)
    of a one-clip manifest: what a batch's tokens look like, without data."""
    from mettle.cache import plan_cache
    from mettle.extract.config import ExtractConfig, load_backbones
    from mettle.manifests import Clip, Manifest

    models = load_backbones(ExtractConfig(dataset="-", cache="-", backbones=backbones, random_init=True))
    manifest = Manifest("ops", (Clip("c0", ("train",), 10, 10.0, {"video": "c0"}),), {"event": ("a", "b")})
    return models, plan_cache(manifest, {m: b.record() for m, b in models.items()})


def count(fn) -> collections.Counter:
    """Top-level operators ``fn`` calls (not those they call in turn)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)


def dispatched(fn) -> collections.Counter:
    """Operators ``fn`` runs as dispatched to kernels (after autograd and autocast), by name, views left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = "aten::" + func.overloadpacket.__name__
            if name not in VIEWS and name not in ALLOCS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    with _Count() as mode:
        fn()
    return mode.ops


ALLOCS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
          "aten::_reshape_alias", "aten::view_as"}  # no kernel of their own


def autocast_counts(models: dict, meta, media: dict) -> None:
    import torch

    from mettle.extract.backbones.kept_casts import per_call_copy

    print("| backbone | pure forward, float16 autocast: kernels (casts) with weights cast once | "
          "with per-call casts | fewer |")
    print("| --- | --- | --- | --- |")
    for m, b in models.items():
        idx = [a.block_index for a in meta.arrays if a.modality == m]
        x = b.preprocess(media[m])
        counts = {}
        for name, model in (("kept", b), ("plain", per_call_copy(b))):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                model.forward_tokens(x, idx)  # the kept casts and terms are made
                counts[name] = dispatched(lambda: model.forward_tokens(x, idx))
        k, p = (sum(counts[n].values()) for n in ("kept", "plain"))
        casts = {n: counts[n]["aten::_to_copy"] for n in counts}
        print(f"| {b.name} | {k} ({casts['kept']}) | {p} ({casts['plain']}) | {p - k} ({100 * (p - k) / p:.0f} %) |")


def main() -> None:
    import torch

    from mettle.cache.dtypes import get_dtype
    from mettle.extract.tokens import TokenForward

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="specific")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--autocast", action="store_true", help="count the float16-autocast forward's kernels instead "
                    "(weights cast once against per-call casts)")
    args = ap.parse_args()
    models, meta = one_clip_plan(args.backbones)
    media = random_media(args.batch)
    if args.autocast:
        print(f"backbones {args.backbones}, batch {args.batch}, CPU float16 autocast, default preset")
        autocast_counts(models, meta, media)
        return
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
