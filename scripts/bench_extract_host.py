"""Extraction's host side alone: ``mettle-extract`` with the backbones' device work replaced by a
stand-in that costs nothing, so what is timed is decoding, preprocessing, joining inputs into
batches, putting tokens into shard buffers and writing shards.

Usage: python scripts/bench_extract_host.py [--backbones specific|tiny] [--clips 48] [--batch-size 32]
       [--device cpu|cuda] [--repeats 3] [--work DIR] [--decode-threads N] [--decode-processes N]
       [--format zarr|hdf5] [--torch-threads N] [--switch-interval S] [--ops N] [--device-ms MS] [--predecoded]

Why: on the H200 (BENCHMARKS.md, 2026-11-27) the forward with pooling, encoding and the copies to
the host ran at the pure forward's speed under CUDA graphs (101 %), yet the whole extraction reached
41-51 %, so the host's part of the pipeline capped it. This measures that part on any machine: its
clips/s is the most extraction could reach with an infinitely fast device, and its breakdown says
where the host's time goes. The stand-in hands over, for every batch, tokens of the cache's shapes
and storage dtype made once (zeros); everything else is the real pipeline
(``extract.run.extract``), on ``--device`` (``cuda``: inputs staged in page-locked memory).

Two stand-ins for a GPU make the host's share visible on a CPU machine: ``--ops N`` issues N tiny
torch operators per batch (launching kernels: each call releases Python's lock and takes it back;
compared with the same operators alone), ``--device-ms MS`` makes each batch ready only after MS of
a stand-in device's time, batches one after another (a GPU stream: the device's busy share of the
run is extraction's share of a device-bound forward). ``--predecoded`` hands every clip over as
decoded and preprocessed in an untimed first run, as a machine with many cores decodes ahead of the
GPU (the H200's 16: the launching thread waited 0.30 s of 7.63 for decoded clips), so that on a
machine with few cores the launching thread's own work is what is timed, not the decoding.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def launches(ops: int, stats: dict) -> None:
    """Issue ``ops`` tiny torch operators, as a host launching a GPU's kernels does: each is a short
    call that releases Python's lock and takes it back. Seconds spent are added to ``stats["s"]``."""
    import torch

    t = stats.setdefault("tensor", torch.zeros(8))
    t0 = time.perf_counter()
    for _ in range(ops):
        t.add_(1.0)
    stats["s"] = stats.get("s", 0.0) + time.perf_counter() - t0


class StandInDevice:
    """A stand-in for a GPU's stream: each launched batch takes ``seconds`` of device time, one after
    the other; ``launch()`` returns what ``InFlight`` waits on (an object with ``synchronize()``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.free_at, self.busy = seconds, 0.0, 0.0

    def launch(self, share: float = 1.0) -> "_Done":
        """A batch of ``share`` of the full batch size (its time in proportion)."""
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + self.seconds * share
        self.busy += self.seconds * share
        return _Done(self.free_at)


class _Done:
    def __init__(self, at: float) -> None:
        self.at = at

    def synchronize(self) -> None:
        left = self.at - time.perf_counter()
        if left > 0:
            time.sleep(left)


def stand_in(ops: int = 0, stats: dict | None = None, device: StandInDevice | None = None, batch_size: int = 32):
    """A replacement for ``TokenForward.encoded``: zeros of each array's stored shape, encoded once per
    (forward, batch size, storage dtype) and handed over finished (no device work, no wait); with
    ``ops``, after issuing that many tiny operators (``launches``), a stand-in for a host-bound GPU;
    with ``device``, the batch is ready when that stand-in device has run it."""
    import torch

    from mettle.extract.tokens import InFlight

    made: dict = {}
    stats = {} if stats is None else stats

    def encoded(self, x, storage):
        stats["calls"] = stats.get("calls", 0) + 1
        if ops:
            launches(ops, stats)
        key = (id(self), len(x), storage.name)
        if key not in made:
            grouped = [torch.zeros(len(members) * len(x), self.arrays[members[0]].tokens, self.arrays[members[0]].dim)
                       for members in self.groups]
            made[key] = self._split(self._encode_groups(grouped, storage))
        return InFlight(made[key], device.launch(len(x) / batch_size) if device is not None else None)

    return encoded


def predecoded():
    """A replacement for ``shard._decode`` that decodes each clip once and then hands over the same
    :class:`~mettle.extract.shard.Decoded` (its tensors are only read downstream)."""
    from mettle.extract import shard

    decode, kept = shard._decode, {}

    def from_memory(clip, *args):
        if clip.clip_id not in kept:
            kept[clip.clip_id] = decode(clip, *args)
        return kept[clip.clip_id]

    return from_memory


def run(args) -> list[dict]:
    """``args.repeats`` extractions with the stand-in; each run's profile and clips/s after setup."""
    from bench_pipeline import toy_extract_config  # this folder's: the same toy data and config

    from mettle.extract import shard
    from mettle.extract.config import load_backbones
    from mettle.extract.run import extract
    from mettle.extract.tokens import TokenForward

    cfg = toy_extract_config(args.work, args.clips, f"cache-host-{args.backbones}", backbones=args.backbones,
                             device=args.device, batch_size=args.batch_size, format=args.format,
                             decode_processes=args.decode_processes,
                             **({"decode_threads": args.decode_threads} if args.decode_threads else {}))
    backbones = load_backbones(cfg)
    decode = mock.patch.object(shard, "_decode", predecoded()) if args.predecoded else contextlib.nullcontext()
    runs = []
    for i in range(-1 if args.predecoded else 0, args.repeats):  # -1: the untimed run that decodes
        if Path(cfg.cache).exists():
            shutil.rmtree(cfg.cache)
        stats: dict = {}
        device = StandInDevice(args.device_ms / 1000) if args.device_ms else None
        with decode, mock.patch.object(TokenForward, "encoded", stand_in(args.ops, stats, device, args.batch_size)):
            summary = extract(cfg, progress=False, backbones=backbones)
        if i < 0:
            continue
        p = summary.profile
        run = dict(p, clips_per_s=args.clips / (p["seconds"] - p["setup_s"]), bytes=summary.bytes_written,
                   device_busy_s=device.busy if device else 0.0)
        if args.ops:  # the same operators alone, right after: what the "device" needs without the pipeline
            alone: dict = {}
            launches(args.ops * stats["calls"], alone)
            run.update(ops_in_pipeline_s=stats["s"], ops_alone_s=alone["s"])
        runs.append(run)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="specific", help="whose token shapes and preprocessing (default: specific)")
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("bench_work"))
    ap.add_argument("--decode-threads", type=int, default=0, help="extraction's decode threads (0: its default)")
    ap.add_argument("--decode-processes", type=int, default=None,
                    help="extraction's decode processes (default: by device, as mettle-extract; a GPU's default is one "
                         "per CPU, at most 8)")
    ap.add_argument("--format", default="zarr", choices=["zarr", "hdf5"])
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads for the process (0: torch's default)")
    ap.add_argument("--ops", type=int, default=0,
                    help="tiny torch operators the stand-in issues per batch and backbone, as a host-bound GPU's launches")
    ap.add_argument("--device-ms", type=float, default=0.0,
                    help="a stand-in device: each full batch takes this many ms of its time (a partial one in "
                         "proportion), batches one after another")
    ap.add_argument("--predecoded", action="store_true",
                    help="decode every clip once in an untimed first run and hand it over from memory in the timed ones")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="Python's thread switch interval in seconds (sys.setswitchinterval; 0: leave the default, 0.005)")
    args = ap.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.switch_interval:
        import sys

        sys.setswitchinterval(args.switch_interval)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = sorted(run(args), key=lambda r: r["clips_per_s"])
    mid = runs[(len(runs) - 1) // 2]
    steady = mid["seconds"] - mid["setup_s"]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU threads, device {args.device}, "
          f"{time.strftime('%Y-%m-%d')}; backbones {args.backbones} (shapes and preprocessing; the device work "
          f"is a stand-in), {args.clips} toy clips, batch {args.batch_size}"
          + (", clips decoded once before the timed runs" if args.predecoded else "") + "\n")
    print("| extraction with a stand-in device | clips/s after setup | MB/s written |\n| --- | --- | --- |")
    spread = "/".join(f"{r['clips_per_s']:.1f}" for r in runs)
    print(f"| median of {len(runs)} (runs: {spread}) | "
          f"{mid['clips_per_s']:.2f} | {mid['bytes'] / 1e6 / steady:.0f} |\n")
    print(f"Where the median run's {steady:.2f} s after setup went (host seconds): waiting for decoded clips "
          f"{mid['decode_s']:.2f}, waiting for inputs joined into batches (stage threads) {mid['stage_s']:.2f}, the stand-in's launches "
          f"{mid['launch_s']:.2f}, waiting for the put threads {mid['backlog_s']:.2f}; put threads (summed): putting tokens "
          f"into shard buffers {mid['put_s']:.2f}; writes {mid['write_s']:.2f} (writer thread); "
          f"{mid['bytes'] / 1e6 / args.clips:.1f} MB written per clip.")
    if args.device_ms:
        print(f"\nThe stand-in device ({args.device_ms:g} ms a batch) was busy {mid['device_busy_s']:.2f} s of the "
              f"{steady:.2f} s ({100 * mid['device_busy_s'] / steady:.0f} %; runs: "
              + "/".join(f"{100 * r['device_busy_s'] / (r['seconds'] - r['setup_s']):.0f}" for r in runs) + " %).")
    if args.ops:
        print(f"\nThe stand-in's {args.ops} operators per batch took {mid['ops_in_pipeline_s']:.2f} s in the "
              f"pipeline and {mid['ops_alone_s']:.2f} s alone ({100 * mid['ops_alone_s'] / steady:.0f} % of the "
              f"pipeline's time after setup; runs: "
              + "/".join(f"{100 * r['ops_alone_s'] / (r['seconds'] - r['setup_s']):.0f}" for r in runs) + " %).")


if __name__ == "__main__":
    main()
