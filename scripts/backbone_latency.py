"""Print the CPU (or GPU) latency of each backbone preset: per frame (visual) or per 1-s segment (audio).

Usage: python scripts/backbone_latency.py [--presets NAME ...] [--batch 1 4] [--repeats 3] [--device cpu]
Random-init weights (cost does not depend on the values); all blocks tapped, as extraction does.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mettle.extract.backbones import create_backbone, list_backbones  # noqa: E402


def measure(name: str, batch: int, repeats: int, device: str) -> tuple[float, float]:
    """Best-of-``repeats`` seconds per item with all taps, and with no taps kept (plain forward)."""
    b = create_backbone(name, random_init=name.startswith(("swinv2", "htsat")))
    b.to(device)
    rng = np.random.default_rng(0)
    media = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8) if b.modality == "visual" \
        else (0.1 * rng.standard_normal((batch, 32000))).astype(np.float32)
    x = b.preprocess(media).to(device)
    timings = {}
    for label, indices in (("taps", None), ("last", [-1])):
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            b.forward_tokens(x, indices)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        timings[label] = best / batch
    return timings["taps"], timings["last"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list_backbones())
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'preset':<38} {'unit':<8} {'batch':>5} {'all taps s':>11} {'last block s':>13}")
    for name in args.presets:
        for batch in args.batch:
            taps, last = measure(name, batch, args.repeats, args.device)
            unit = "frame" if "swin" in name else "segment"
            print(f"{name:<38} {unit:<8} {batch:>5} {taps:>11.4f} {last:>13.4f}")


if __name__ == "__main__":
    main()
