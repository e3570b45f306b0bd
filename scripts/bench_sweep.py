"""Wall time of a 20-config AVE sweep on one cache against 2 end-to-end Mettle trainings.

Usage: python scripts/bench_sweep.py [--backbones specific|tiny] [--clips 12] [--epochs 4] [--device cpu]
       [--work DIR] [--out DIR]

Same machine, same toy data, same epochs. The sweep's cost includes extracting the cache (once):
extraction, then 20 configs (lcd.meta_tokens 2/4/8/16 x lcd.layers all/last-stage/every-2/every-3/
every-6) trained from the cache one after the other. The baseline trains the default config twice
(two seeds) with the frozen backbones run live at every step (``LiveSource``), the paper's setting.
Random backbone weights (cost does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GRID = {"lcd.meta_tokens": [2, 4, 8, 16], "lcd.layers": ["all", "last-stage", "every-2", "every-3", "every-6"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="specific")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("bench_work/sweep"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from mettle.extract.config import ExtractConfig, load_backbones
    from mettle.extract.live import LiveSource
    from mettle.extract.run import extract
    from mettle.manifests import build_manifest
    from mettle.train.config import resolve_config
    from mettle.train.loop import fit
    from mettle.train.sweep import Sweep, run_sweep
    from mettle.train.tasks import get_task

    if args.work.exists():
        shutil.rmtree(args.work)
    data = args.work / "toy"
    manifest = build_manifest("toy", data_root=str(data), num_clips=args.clips)  # data generation: not timed
    base = {"optim.epochs": args.epochs, "optim.batch_size": 4}

    t0 = time.perf_counter()
    cfg_x = ExtractConfig(dataset="toy", cache=str(args.work / "cache"), data_root=str(data),
                          manifest_options={"num_clips": args.clips}, backbones=args.backbones, random_init=True,
                          device=args.device)
    extract(cfg_x, progress=False)
    t_extract = time.perf_counter() - t0
    t0 = time.perf_counter()
    folder, rows = run_sweep(Sweep("ave", base, GRID, (0,)), str(args.work / "cache"), str(args.work / "runs"),
                             args.device)
    t_sweep = time.perf_counter() - t0

    backbones = load_backbones(cfg_x)
    live = LiveSource(manifest, data, backbones, tokens="full", device=args.device)
    t0 = time.perf_counter()
    for seed in (0, 1):
        cfg = resolve_config("ave", get_task("ave").head_defaults, sets=base, device=args.device, seed=seed)
        fit(cfg, live, progress=False)
    t_e2e = time.perf_counter() - t0

    lines = [f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU threads, device {args.device}, "
             f"{time.strftime('%Y-%m-%d')}; backbones {args.backbones} (random weights), {args.clips} toy clips, "
             f"{args.epochs} epochs, batch 4", "",
             "| work | wall time s |", "| --- | --- |",
             f"| extraction (once) | {t_extract:.0f} |",
             f"| 20-config sweep from the cache | {t_sweep:.0f} |",
             f"| extraction + sweep | {t_extract + t_sweep:.0f} |",
             f"| 2 end-to-end trainings (live backbones) | {t_e2e:.0f} |",
             f"| ratio (2 end-to-end / extraction + sweep) | {t_e2e / (t_extract + t_sweep):.2f}x |"]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep_cost.md").write_text("\n".join(lines) + "\n")
        (args.out / "sweep_cost.json").write_text(json.dumps(
            {"extract_s": t_extract, "sweep_s": t_sweep, "end_to_end_s": t_e2e, "configs": len(rows)}, indent=1))


if __name__ == "__main__":
    main()
