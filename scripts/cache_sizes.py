"""Print the stored size of one clip for every cache preset, token budget and dtype.

Usage: python scripts/cache_sizes.py [--backbones specific|shared|tiny] [--segments 10] [--clips 4143]
Sizes come from the cache format itself (``CacheMeta.bytes_per_clip``) over the real block layouts
of the backbones (built with random weights; sizes do not depend on weights). ``--clips`` scales
the per-clip figure to a whole dataset (4143 = AVE).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mettle.cache import DTYPES, plan_cache  # noqa: E402
from mettle.extract.config import BACKBONE_SETS, ExtractConfig, load_backbones  # noqa: E402
from mettle.manifests import Clip, Manifest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="specific", choices=sorted(BACKBONE_SETS))
    ap.add_argument("--segments", type=int, default=10)
    ap.add_argument("--clips", type=int, default=4143)
    args = ap.parse_args()
    backbones = load_backbones(ExtractConfig(dataset="-", cache="-", backbones=args.backbones, random_init=True))
    records = {m: b.record() for m, b in backbones.items()}
    clip = Clip("x", ("train",), args.segments, float(args.segments), {"video": "x"})
    manifest = Manifest("sizes", (clip,), {})
    print(f"backbones {args.backbones}: " + ", ".join(f"{m}={r.name}" for m, r in records.items()))
    print(f"{'preset':<15} {'tokens':<10} {'dtype':<8} {'arrays':>6} {'MB/clip':>9} {'GB/' + str(args.clips) + ' clips':>14}")
    for preset, budgets in (("classification", ("full", "last-grid", "grid4")), ("segmentation", ("full",))):
        for tokens in budgets:
            for dtype in DTYPES:
                meta = plan_cache(manifest, records, preset=preset, tokens=tokens, dtype=dtype)
                per = meta.bytes_per_clip()
                print(f"{preset:<15} {tokens:<10} {dtype:<8} {len(meta.arrays):>6} {per / 1e6:>9.2f} "
                      f"{per * args.clips / 1e9:>14.1f}")


if __name__ == "__main__":
    main()
