"""Extraction throughput against the pure backbone forward, and the training data path against a raw
sequential read of the same bytes.

Usage: python scripts/bench_pipeline.py [--backbones tiny|specific] [--clips 48] [--batch-size 32]
       [--device cpu] [--repeats 3] [--work DIR] [--out DIR] [--trace] [--[no-]cuda-graphs]
       [--data-clips 64] [--data-dtype float16|int8] [--data-workers N] [--switch-interval S] [--no-data-path]

1. ``mettle-extract`` on the toy dataset (decode + forward + write, clips/s) against the backbones'
   forward alone on inputs of the same shapes, same device, batch size and precision (float16
   autocast on a GPU, as extraction chose it) (clips/s). The ratio uses
   extraction after its setup (manifest, moving the models to the device, the cache plan,
   starting the decode processes: paid once per run, negligible on a real dataset); the figure with
   setup is shown too. The models are built once for all runs (their build time is shown). Three
   runs, the median shown.
2. One epoch of the training data path (``Cache.iterate`` over every clip in shuffled batches of
   16, in-memory row cache off) against reading the cache's token files once, sequentially (MB/s):
   the first epoch of a freshly opened cache (page cache dropped, when this process may; its batch
   arrays are new memory), then an epoch as later epochs run, cold and warm (batch arrays reused:
   on a CPU machine by the loader's array pool, on a CUDA machine, where batches are page-locked,
   by torch's host allocator); three times, the median run shown.
   With ``--data-dtype int8`` the full-size layout cache is int8, read as training reads it (the
   LCD's arrays as codes + scales) and, for comparison, decoded to float32 on the host. With
   ``--data-workers N`` the epochs read through N loader worker processes (``mettle-train --workers``),
   started at the first epoch and kept for the later ones, as training keeps them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from encode_path import batch_inputs, copy_streams_compared, encode_path  # this folder's

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def toy_extract_config(work: Path, clips: int, cache: str, **options):
    """The toy dataset of ``clips`` clips under ``work`` (rendered once, not part of any timing) and an
    ``ExtractConfig`` for extracting it into ``work / cache`` with random-init backbones and ``options``."""
    from mettle.extract.config import ExtractConfig
    from mettle.manifests import build_manifest
    from mettle.manifests.toy import ToyParams, generate_toy

    data = work / f"toy{clips}"  # the toy generator refuses a folder made with other parameters
    generate_toy(data, ToyParams(num_clips=clips), processes=os.cpu_count() or 1)
    build_manifest("toy", data_root=str(data), num_clips=clips)
    return ExtractConfig(dataset="toy", cache=str(work / cache), data_root=str(data), manifest_options={"num_clips": clips},
                         random_init=True, **options)


def extraction(args) -> dict:
    """Extraction against the pure forward ``args.repeats`` times, side by side; the run with the
    median ratio (a shared machine's timings vary by 10 % and more between runs)."""
    from mettle.extract.config import load_backbones

    cfg = toy_extract_config(args.work, args.clips, f"cache-{args.backbones}", backbones=args.backbones,
                             device=args.device, batch_size=args.batch_size, cuda_graphs=args.graphs)
    t0 = time.perf_counter()
    backbones = load_backbones(cfg)  # built once (Swin-V2-L takes a while), used by every run
    build = time.perf_counter() - t0
    runs = sorted((_extraction_once(args, cfg, backbones) for _ in range(args.repeats)), key=lambda r: r["ratio"])
    if args.trace and args.out:
        _trace(args, cfg, backbones)
    mid = runs[(len(runs) - 1) // 2]  # even: the lower
    copies = copy_streams_compared(args, backbones, mid) if args.device.startswith("cuda") else None
    return dict(mid, ratios=[r["ratio"] for r in runs], build_s=build, copies=copies)


def _trace(args, cfg, backbones) -> None:
    """One more extraction (not in the figures) under torch.profiler: where the driving thread's time
    goes, operator by operator, and how busy the GPU was; written to OUT/extraction_trace_<backbones>.txt."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mettle.extract.run import extract

    if Path(cfg.cache).exists():
        shutil.rmtree(cfg.cache)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        summary = extract(cfg, progress=False, backbones=backbones)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    lines = [f"extraction of {args.clips} clips under the profiler: {wall:.2f} s wall ({summary.profile['setup_s']:.2f} s "
             f"setup); device kernels {device_us / 1e6:.2f} s ({100 * device_us / 1e6 / wall:.0f} % of the wall time)",
             "profile: " + json.dumps({k: round(v, 3) for k, v in summary.profile.items() if isinstance(v, float)}), "",
             events.table(sort_by="self_cpu_time_total", row_limit=30)]
    if args.device.startswith("cuda"):
        from device_busy import device_busy

        busy, span, gaps = device_busy([(e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
                                        if e.device_type() == torch.autograd.DeviceType.CUDA])
        if span:  # the union of kernels, copies and memsets: what the sum above counts twice where they overlap
            long = [g for g in gaps if g >= 1e-3]
            lines[1:1] = [f"GPU busy {busy:.2f} s of the {span:.2f} s from its first activity to its last "
                          f"({100 * busy / span:.0f} %); idle gaps of 1 ms or more: {len(long)}, {sum(long):.2f} s in "
                          f"all, the longest {', '.join(f'{1e3 * g:.0f}' for g in sorted(long)[-5:][::-1])} ms"]
        lines += ["", events.table(sort_by="self_device_time_total", row_limit=15)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"extraction_trace_{args.backbones}{'-graphs' if args.graphs else ''}.txt").write_text("\n".join(lines) + "\n")


def _extraction_once(args, cfg, backbones) -> dict:
    import torch

    from mettle.cache import open_cache
    from mettle.extract.run import extract

    cache = Path(cfg.cache)
    if cache.exists():
        shutil.rmtree(cache)
    t0 = time.perf_counter()
    summary = extract(cfg, progress=False, backbones=backbones)
    pipeline = time.perf_counter() - t0
    dev = torch.device(args.device)
    segs = args.clips * 10
    inputs = batch_inputs(args, backbones, dev)
    meta = open_cache(cache).meta
    indices = {m: [a.block_index for a in meta.arrays if a.modality == m] for m in backbones}
    status = json.loads(next((cache / "status").glob("*.json")).read_text())
    autocast = status["extra"]["autocast"]  # the precision extraction chose (float16 autocast on a GPU)

    def run(m: str, b, n: int) -> None:
        ctx = torch.autocast(dev.type, dtype=torch.float16) if autocast[m] else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            b.forward_tokens(inputs[m][:n], indices[m])

    for m, b in backbones.items():
        run(m, b.to(dev), args.batch_size)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, segs, args.batch_size):  # the same batches as extraction: full ones, then the rest
        n = min(args.batch_size, segs - start)
        for m, b in backbones.items():
            run(m, b, n)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    forward = time.perf_counter() - t0
    encode = encode_path(args, backbones, meta, autocast, inputs, dev, segs)
    steady = pipeline - summary.profile["setup_s"]  # without loading the models and planning (once per run)
    return {"clips": args.clips, "pipeline_s": pipeline, "pipeline_clips_per_s": args.clips / pipeline,
            "steady_s": steady, "steady_clips_per_s": args.clips / steady,
            "forward_s": forward, "forward_clips_per_s": args.clips / forward, "ratio": forward / steady,
            "ratio_with_setup": forward / pipeline, "encode_s": encode, "encode_clips_per_s": args.clips / encode,

            "profile": summary.profile, "cache": str(cache), "autocast": autocast}


def _precision(autocast: dict) -> str:
    return ", ".join(f"{m} {'float16 autocast' if on else 'float32'}" for m, on in autocast.items())


def full_size_cache(work: Path, clips: int, backbones: str = "specific", dtype: str = "float16") -> Path:
    """A cache of random tokens in the full-size layout (Swin-V2-L + HTS-AT, last-grid, ``dtype``).

    The data path does not care what the tokens are, only how many bytes of which shapes: this gives
    the layout users train from, at any number of clips, without running the backbones.
    """
    import numpy as np

    from mettle.cache import ShardBuffer, ShardStatus, create_cache, plan_cache
    from mettle.extract.config import ExtractConfig, load_backbones
    from mettle.manifests import Clip, Manifest

    path = work / f"cache-{backbones}-synthetic-{clips}{'' if dtype == 'float16' else '-' + dtype}"
    if (path / "done.json").exists():
        return path
    if path.exists():
        shutil.rmtree(path)
    models = load_backbones(ExtractConfig(dataset="-", cache="-", backbones=backbones, random_init=True))
    records = {m: b.record() for m, b in models.items()}
    del models
    vocab = {"event": tuple(f"c{i}" for i in range(28)) + ("background",)}
    manifest = Manifest("bench", tuple(Clip(f"clip{i:05d}", ("train",), 10, 10.0, {"video": f"clip{i:05d}"})
                                       for i in range(clips)), vocab)
    meta = plan_cache(manifest, records, dtype=dtype)  # the defaults: last-grid, zarr
    writer = create_cache(path, meta, manifest)
    rng = np.random.default_rng(0)
    for k in writer.pending_shards():
        buf = ShardBuffer(meta, k)
        for local, row in enumerate(meta.shard_rows(k)):
            for a in meta.arrays:
                buf.put(a.key, local, slice(None), rng.standard_normal(meta.shape(a)[1:], dtype=np.float32))
        writer.write_shard(buf, ShardStatus(k, {manifest.clips[r].clip_id: "ok" for r in meta.shard_rows(k)}))
    writer.finish({"seconds": 0.0})
    return path


def data_path(cache_path: Path, repeats: int = 3, codes: bool = True, workers: int = 0) -> dict:
    """The data-path measurement ``repeats`` times; each figure is the run with the median ratio
    (a shared machine's disk is noisy, which is also why raw and loader are read side by side).
    ``codes``: an int8 cache's arrays handed over as stored (codes + scales), as training reads the
    LCD's arrays; else decoded to float32 on the host. ``workers``: loader worker processes (training's
    ``--workers``), kept by the cache from one epoch to the next as training keeps them."""
    runs = [_data_path_once(cache_path, codes, workers) for _ in range(repeats)]
    out = {}
    for state in STATES:
        got = sorted((r[state] for r in runs if r[state]), key=lambda r: r["ratio"])
        out[state] = dict(got[len(got) // 2], ratios=[r["ratio"] for r in got]) if got else None
    return out


STATES = ("first", "cold", "warm")  # a process's first epoch (cold), later epochs cold and warm
LABELS = {"first": "cold, first epoch", "cold": "cold", "warm": "warm"}


def _data_path_once(cache_path: Path, codes: bool, workers: int = 0) -> dict:
    """One cache opened as training opens it; its first epoch from a dropped page cache (batch
    arrays not yet allocated: their pages fault in), then an epoch as later epochs run, cold and
    warm (the arrays reused, see cache/dataset.py), each beside a raw read of the same files."""
    import torch

    from mettle.cache import open_cache

    files = [p for p in (cache_path / "tokens.zarr").rglob("*") if p.is_file()]
    nbytes = sum(p.stat().st_size for p in files)
    cache = open_cache(cache_path)
    cache.memory_budget = 0
    rows = cache.rows(None)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [[rows[i] for i in order[s:s + 16]] for s in range(0, len(rows), 16)]

    buf = bytearray(1 << 24)  # one reused buffer, written once before timing: the raw read allocates and
    buf[:] = bytes(len(buf))  # faults in nothing, as a fair ceiling (reading into fresh bytes objects was not)

    def raw() -> float:
        t0 = time.perf_counter()
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        return time.perf_counter() - t0

    def epoch() -> float:
        t0 = time.perf_counter()
        for _ in cache.iterate(batches, cache.keys(), workers, codes=cache.keys() if codes else ()):
            pass
        return time.perf_counter() - t0

    out: dict = {}
    cold_raw = raw() if _drop_page_cache() else None
    for state in STATES:
        if state != "warm" and cold_raw is None:
            out[state] = None
            if state == "first":
                epoch()  # allocate the batch arrays all the same
            continue
        if state != "warm":
            _drop_page_cache()
        seconds_raw = cold_raw if state != "warm" else raw()
        seconds = epoch()
        out[state] = {"bytes": nbytes, "raw_mb_per_s": nbytes / seconds_raw / 1e6,
                      "loader_mb_per_s": nbytes / seconds / 1e6, "ratio": seconds_raw / seconds}
    cache.close()  # the loader workers, if any, kept over the epochs above
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="tiny")
    ap.add_argument("--clips", type=int, default=48, help="toy clips to extract (0: no extraction)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="extraction runs (each against its own pure forward)")
    ap.add_argument("--work", type=Path, default=Path("bench_work"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="extract with or without CUDA graphs [mettle-extract's default: on for CUDA]; the pure "
                    "forward stays eager; graphed runs' tables get a -graphs suffix, and a run given either flag "
                    "skips the data path")
    ap.add_argument("--trace", action="store_true",
                    help="also profile one extraction (torch.profiler; needs --out): where the time goes")
    ap.add_argument("--data-clips", type=int, default=64,
                    help="clips of the full-size synthetic cache the data path is also measured on (0: skip)")
    ap.add_argument("--data-dtype", default="float16", choices=["float16", "int8"],
                    help="that cache's dtype; int8 is read both as training reads it (codes) and decoded")
    ap.add_argument("--data-workers", type=int, default=0,
                    help="loader worker processes of the data path (mettle-train --workers; 0: reads in this process)")
    ap.add_argument("--no-data-path", action="store_true", help="skip the extracted cache's data path (extraction only)")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="Python's thread switch interval in seconds for this process (sys.setswitchinterval; 0: "
                         "the default, 0.005): how long the launching thread may wait for the lock (BENCHMARKS.md)")
    args = ap.parse_args()
    from mettle.cache.runtime import resolve_device
    from mettle.extract.config import ExtractConfig, graphs_of

    setting = "auto" if args.cuda_graphs is None else args.cuda_graphs  # mettle-extract's own rule decides
    args.graphs = graphs_of(ExtractConfig(dataset="toy", cache="", cuda_graphs=setting), resolve_device(args.device).type)
    if args.switch_interval:
        import sys

        sys.setswitchinterval(args.switch_interval)
    args.work.mkdir(parents=True, exist_ok=True)
    ex = extraction(args) if args.clips else None  # --clips 0: the data path on the full-size layout only
    extraction_only = args.cuda_graphs is not None or args.no_data_path  # a variant: extraction only
    dp = data_path(Path(ex["cache"]), workers=args.data_workers) if ex and not extraction_only else None
    full = decoded = None
    if args.data_clips:
        layout = full_size_cache(args.work, args.data_clips, dtype=args.data_dtype)
        full = data_path(layout, workers=args.data_workers)
        decoded = data_path(layout, codes=False, workers=args.data_workers) if args.data_dtype == "int8" else None
    lines = [f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU threads, device {args.device}, "
             f"{time.strftime('%Y-%m-%d')}; backbones {args.backbones}, {args.clips} toy clips, batch {args.batch_size}"
             + ("; extraction with CUDA graphs" if args.graphs else "")
             + (f"; switch interval {args.switch_interval * 1e3:g} ms" if args.switch_interval else ""),
             ""]
    if ex:
        lines += ["| extraction | clips/s |", "| --- | --- |",
                  f"| mettle-extract (decode + forward + write), after setup | {ex['steady_clips_per_s']:.2f} |",
                  f"| backbone forward alone ({_precision(ex['autocast'])}, as extraction ran it) | "
                  f"{ex['forward_clips_per_s']:.2f} |",
                  f"| forward + pooling + encoding + copy to the host alone (TokenForward.encoded) | "
                  f"{ex['encode_clips_per_s']:.2f} ({100 * ex['forward_s'] / ex['encode_s']:.0f} % of the forward) |",
                  *([f"| the same, copies on the compute stream / on streams of their own, once each after the runs | "
                     f"{ex['clips'] / ex['copies'][False]:.2f} / {ex['clips'] / ex['copies'][True]:.2f} "
                     f"({100 * ex['forward_s'] / ex['copies'][False]:.0f} % / "
                     f"{100 * ex['forward_s'] / ex['copies'][True]:.0f} % of the forward) |"] if ex.get("copies") else []),
                  f"| ratio (median of {len(ex['ratios'])}) | {100 * ex['ratio']:.0f} % (runs: "
                  f"{'/'.join(f'{100 * x:.0f}' for x in ex['ratios'])} %) |",
                  f"| mettle-extract including setup ({ex['pipeline_s'] - ex['steady_s']:.1f} s: plan, models to "
                  f"the device, decode processes; building the models took {ex['build_s']:.1f} s more) | "
                  f"{ex['pipeline_clips_per_s']:.2f} ({100 * ex['ratio_with_setup']:.0f} %) |"]
        p = ex["profile"]
        lines += [f"\nWhere the median run's {ex['steady_s']:.2f} s after setup went (host seconds): waiting for "
                  f"decoded inputs joined into batches (stage threads) {p.get('stage_s', 0.0):.2f}, launching the backbones {p['launch_s']:.2f} (of which one-off work of first batches, the float16 check and "
                  f"graph captures, {p.get('one_off_s', 0.0):.2f}), waiting for the put threads "
                  f"{p.get('backlog_s', 0.0):.2f}, waiting for decoded clips {p['decode_s']:.2f}; put threads (busy seconds summed): waiting "
                  f"for the device {p['wait_s']:.2f}, putting tokens into shard buffers {p['put_s']:.2f}; writes "
                  f"{p['write_s']:.2f} (writer thread). The pure forward of the same batches: "
                  f"{ex['forward_s']:.2f} s, after a warm-up batch.", ""]
    lines += ["| training data path | raw sequential read MB/s | one epoch through Cache.iterate MB/s | ratio |",
              "| --- | --- | --- | --- |"]
    layout = f"full-size layout, {args.data_clips} clips" + ("" if args.data_dtype == "float16" else ", int8")
    if args.data_workers:
        lines[0] += f"; data path through {args.data_workers} loader worker processes"
    for name, result in ((f"this {args.backbones} cache", dp), (layout + (" as codes" if decoded else ""), full),
                         (f"{layout} decoded to float32", decoded)):
        for state in STATES:
            r = result[state] if result else None
            if result is None:
                continue
            spread = "/".join(f"{100 * x:.0f}" for x in r["ratios"]) if r else ""
            lines.append(f"| {name}, {LABELS[state]} ({r['bytes'] / 1e6:.0f} MB) | {r['raw_mb_per_s']:.0f} | "
                         f"{r['loader_mb_per_s']:.0f} | {100 * r['ratio']:.0f} % (runs: {spread} %) |" if r else
                         f"| {name}, {LABELS[state]} | not measured (cannot drop the page cache here) | | |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"pipeline_{args.backbones}{'-graphs' if args.graphs else ''}"
        (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
        (args.out / f"{name}.json").write_text(json.dumps({"extraction": ex, "data_path": dp, "data_path_full": full,
                                                           "data_path_full_decoded": decoded},
                                                                            indent=1, default=str))


if __name__ == "__main__":
    main()
