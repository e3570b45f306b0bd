"""Time one LCD training step (forward + backward) per AVE clip: folded vs naive attention.

Usage: python scripts/lcd_cost.py [--tokens full last-grid] [--repeats 3] [--device cpu]
Both modalities' LCDs over every block of Swin-V2-L + HTS-AT (36 layers), 10 segments, default
LCD width; random float16 tokens (cost does not depend on values). Prints seconds per clip, best of
repeats.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mettle.cache import plan_cache  # noqa: E402
from mettle.extract.config import ExtractConfig, load_backbones  # noqa: E402
from mettle.manifests import Clip, Manifest  # noqa: E402
from mettle.train.config import LCDConfig  # noqa: E402
from mettle.train.lcd import LCD  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", nargs="+", default=["full", "last-grid"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbones", default="specific")
    args = ap.parse_args()
    records = {m: b.record() for m, b in load_backbones(
        ExtractConfig(dataset="-", cache="-", backbones=args.backbones, random_init=True)).items()}
    manifest = Manifest("cost", (Clip("x", ("train",), 10, 10.0, {"video": "x"}),), {})
    print(f"{'tokens':<10} {'attention':<8} {'s/clip (fwd+bwd)':>17}")
    for tokens in args.tokens:
        meta = plan_cache(manifest, records, tokens=tokens)
        # float16, as a cache hands them to training
        data = {a.key: torch.randn(1, 10, a.tokens, a.dim, device=args.device).half() for a in meta.arrays}
        for attention in ("folded", "naive"):
            torch.manual_seed(0)
            lcds = [LCD([a for a in meta.arrays if a.modality == m], LCDConfig(attention=attention)).to(args.device)
                    for m in records]
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                loss = sum(lcd(data).square().mean() for lcd in lcds)
                loss.backward()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            print(f"{tokens:<10} {attention:<8} {best:>17.3f}")


if __name__ == "__main__":
    main()
