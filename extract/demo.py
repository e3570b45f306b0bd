"""``mettle-demo``: the main job on the embedded toy dataset, end to end.

Generate the toy dataset (first run only), build its manifest, extract the tiny backbones' tokens
into a cache (stage one), train LCD + the AVE head from that cache (stage two) and print the test
metrics next to the majority-class rate. Reruns skip finished work: the toy data, the cache and the
training run are all reused when they are complete.

The toy run uses a small LCD (``DEMO_SETTINGS``); real datasets use the defaults of
``mettle.train.config``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click
import torch

from mettle.cache import CacheError, open_cache
from mettle.manifests import build_manifest, save_manifest
from mettle.manifests.cli import clean_errors, summary_lines
from mettle.manifests.toy import ToyParams, generate_toy

from .media import MediaError

log = logging.getLogger(__name__)

DEMO_SETTINGS = {"lcd.dim": 128, "lcd.meta_tokens": 4, "lcd.heads": 4, "head.hidden": 128, "optim.epochs": 15,
                 "optim.batch_size": 4, "optim.lr": 1e-3}


def run_demo(out: Path, num_clips: int = 48, seed: int = 0, progress: bool = True, overwrite: bool = False) -> dict:
    """Generate, extract and train under ``out``; return the manifest, summaries and results. A rerun
    skips what is finished (and continues a cut training); ``overwrite`` extracts and trains again."""
    from mettle.train.config import resolve_config
    from mettle.train.run import train_run
    from mettle.train.tasks import get_task

    from .config import ExtractConfig
    from .run import extract

    data_root = out / "data" / "toy"
    # rendered in up to 8 processes first (the same bytes); build_manifest then finds it complete
    generate_toy(data_root, ToyParams(num_clips=num_clips, seed=seed), processes=min(os.cpu_count() or 1, 8))
    manifest = build_manifest("toy", data_root=str(data_root), num_clips=num_clips, seed=seed)
    save_manifest(manifest, out / "manifest.json")
    cfg = ExtractConfig(dataset="toy", cache=str(out / "cache"), data_root=str(data_root),
                        manifest_options={"num_clips": num_clips, "seed": seed}, backbones="tiny", device="cpu",
                        overwrite=overwrite)
    summary = extract(cfg, progress=progress)
    cache = open_cache(out / "cache")
    task = get_task("ave")
    train_cfg = resolve_config("ave", task.head_defaults, sets=DEMO_SETTINGS, cache=str(cache.root),
                               out=str(out / "runs"), device="cpu")
    run_dir, results = train_run(train_cfg, cache, progress=progress, overwrite=overwrite, resume=not overwrite)
    labels = torch.tensor([cache.manifest.clips[r].labels["segment_labels"] for r in cache.rows("test")])
    majority = 100.0 * float((labels == labels.flatten().mode().values).float().mean()) if labels.numel() else 0.0
    return {"manifest": manifest, "extract": summary, "run_dir": run_dir, "results": results, "majority": majority}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True,
              help="working folder (toy data, manifest, cache, runs)")
@click.option("--clips", "num_clips", type=int, default=48, show_default=True, help="toy clips (multiple of 6)")
@click.option("--seed", type=int, default=0, show_default=True, help="toy dataset seed")
@click.option("--overwrite", is_flag=True, help="extract and train again (e.g. a cache made by an older mettle)")
@clean_errors(MediaError, CacheError, ValueError)
def main(out: Path, num_clips: int, seed: int, overwrite: bool) -> None:
    """Run mettle on the embedded toy dataset, end to end, and print the results."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    r = run_demo(out, num_clips, seed, overwrite=overwrite)
    for line in summary_lines(r["manifest"]):
        click.echo(line)
    click.echo("")
    for line in r["extract"].lines():
        click.echo(line)
    res = r["results"]
    click.echo("")
    click.echo(f"trained AVE in {r['run_dir']}: {res['trainable_parameters']:,} trainable parameters, "
               f"{res['seconds_per_epoch']:.2f} s per epoch, best epoch {res['best_epoch'] + 1} of {res['epochs']} "
               "(chosen on val)")
    for line in res["table"]:
        click.echo(line)
    click.echo(f"| majority-class rate (test) | {r['majority']:.2f} |")
