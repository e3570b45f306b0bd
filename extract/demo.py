"""``mettle-demo``: the main job on the embedded toy dataset, end to end, as far as it is built.

Today that is: generate the toy dataset (first run only), build and save its manifest, decode
every clip's frames and audio, and extract the tiny backbones' tokens into a cache (stage one),
printing what the cache holds. Training (stage two) joins this command as it lands; see the README.
Reruns skip finished work (the toy data and the cache are both resumable).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
from tqdm import tqdm

from mettle.manifests import SPLITS, build_manifest, save_manifest
from mettle.manifests.cli import clean_errors, summary_lines

from mettle.cache import CacheError, describe

from .media import MediaError, read_clip

log = logging.getLogger(__name__)


def run_demo(out: Path, num_clips: int = 48, seed: int = 0, progress: bool = True) -> dict:
    """Generate (once) and read the toy dataset under ``out``; return the figures printed."""
    data_root = out / "data" / "toy"
    t0 = time.perf_counter()
    manifest = build_manifest("toy", data_root=str(data_root), num_clips=num_clips, seed=seed)
    t_manifest = time.perf_counter() - t0
    save_manifest(manifest, out / "manifest.json")

    t1 = time.perf_counter()
    stats = {s: {"clips": 0, "frames": 0, "audio_seconds": 0.0} for s in SPLITS}
    shapes = set()
    for clip in tqdm(manifest.clips, desc="decode", unit="clip", disable=not progress):
        media = read_clip(clip, data_root, manifest.frame_rule)
        shapes.add((media.frames.shape, media.audio.shape))
        s = stats[clip.splits[0]]
        s["clips"] += 1
        s["frames"] += len(media.frames)
        s["audio_seconds"] += media.audio.size / 32000
    t_decode = time.perf_counter() - t1
    from .config import ExtractConfig
    from .run import extract

    cfg = ExtractConfig(dataset="toy", cache=str(out / "cache"), data_root=str(data_root),
                        manifest_options={"num_clips": num_clips, "seed": seed}, backbones="tiny", device="cpu")
    summary = extract(cfg, progress=progress)
    return {"manifest": manifest, "stats": stats, "shapes": sorted(shapes), "seconds_manifest": t_manifest,
            "seconds_decode": t_decode, "extract": summary}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True,
              help="working folder (toy data, manifest, cache, later the runs)")
@click.option("--clips", "num_clips", type=int, default=48, show_default=True, help="toy clips (multiple of 6)")
@click.option("--seed", type=int, default=0, show_default=True, help="toy dataset seed")
@clean_errors(MediaError, CacheError)
def main(out: Path, num_clips: int, seed: int) -> None:
    """Run mettle on the embedded toy dataset and print the results."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    r = run_demo(out, num_clips, seed)
    for line in summary_lines(r["manifest"]):
        click.echo(line)
    click.echo("")
    click.echo(f"{'split':<6} {'clips':>5} {'frames':>6} {'audio s':>8}")
    for split, s in r["stats"].items():
        click.echo(f"{split:<6} {s['clips']:>5} {s['frames']:>6} {s['audio_seconds']:>8.1f}")
    n = len(r["manifest"])
    click.echo(f"decoded {n} clips in {r['seconds_decode']:.1f} s ({r['seconds_decode'] / max(n, 1) * 1000:.0f} ms/clip); "
               f"per clip frames {r['shapes'][0][0]} uint8, audio {r['shapes'][0][1]} float32 at 32 kHz")
    click.echo("")
    for line in r["extract"].lines():
        click.echo(line)
    for line in describe(r["extract"].cache):
        click.echo(line)
    click.echo("next stage (training LCD + task heads from this cache, metrics) is not built yet: see README 'Status'")
