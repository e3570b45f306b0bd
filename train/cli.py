"""``mettle-train``: train LCD + a task head from a cache, or score a checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from mettle.cache import CacheError, open_cache
from mettle.manifests.cli import clean_errors

from .config import ConfigError, parse_sets, resolve_config
from .tasks import get_task, list_tasks


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--task", help=f"one of: {', '.join(list_tasks())}")
@click.option("--cache", "cache_path", required=True, type=click.Path(), help="cache folder written by mettle-extract")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="YAML config")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override, e.g. --set lcd.meta_tokens=4 --set optim.lr=1e-3 (repeatable)")
@click.option("--out", help="folder of run folders [runs]")
@click.option("--device", help="auto, cpu, cuda, cuda:N [auto]")
@click.option("--seed", type=int, help="seed of initialisation and data order [0]")
@click.option("--workers", type=int, help="DataLoader reader processes [0: reads on threads of this process, "
              "1.3-5x faster on every cache measured: processes hand batches over through shared memory]")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="replay each full batch's training step as one CUDA graph, checked against eager at capture "
                   "[on for CUDA devices; --no-cuda-graphs: eager steps, less GPU memory]")
@click.option("--init-from", help="run folder (or best.pt) whose matching parameters start training")
@click.option("--eval-only", is_flag=True, help="score --checkpoint on val and test, no training")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="best.pt of a run")
@click.option("--save-masks", type=int, default=0, help="AVS: write mask overlays of N test clips into RUN/masks")
@click.option("--sweep", "sweep_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML grid of configs (see train/sweep.py); runs each, skips finished ones, writes a table")
@click.option("--scheduler", help="with --sweep: run on the dask cluster at ADDRESS (--workers N: a local one)")
@click.option("--resume", is_flag=True, help="continue an unfinished run from its last.pt")
@click.option("--overwrite", is_flag=True, help="train again even when the run folder has results")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@clean_errors(CacheError, ConfigError, ValueError, FloatingPointError)
def main(task, cache_path, config_file, sets, out, device, seed, workers, cuda_graphs, init_from, eval_only, checkpoint, save_masks,
         sweep_file, scheduler, resume, overwrite, quiet) -> None:
    """Train TASK from the cache and print its test metrics (or run a --sweep of configs)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if sweep_file is not None:
        from .sweep import load_sweep, run_sweep

        given = [flag for flag, value in (("--task", task), ("--config", config_file), ("--set", sets or None),
                                          ("--seed", seed), ("--init-from", init_from), ("--eval-only", eval_only or None),
                                          ("--checkpoint", checkpoint), ("--save-masks", save_masks or None),
                                          ("--resume", resume or None), ("--overwrite", overwrite or None),
                                          ("--[no-]cuda-graphs", cuda_graphs)) if value is not None]
        if given:  # a sweep's runs take everything from its file; silently dropping these misleads
            raise ConfigError(f"--sweep runs what its file says; {', '.join(given)} would be ignored. Fix: put "
                              "them in the sweep file (base: or grid:), or drop them (a sweep resumes by itself)")
        if scheduler and workers:
            raise ConfigError("--scheduler and --workers both given: --workers N starts a local cluster. "
                              "Fix: pass one of them")
        if workers is not None and workers < 0:
            raise ConfigError(f"--workers {workers} must be 0 (one process) or more. Fix: e.g. --workers 2")

        if not sweep_file.is_file():
            raise ConfigError(f"--sweep {sweep_file} does not exist. Fix: pass a sweep YAML file")
        sweep = load_sweep(sweep_file)
        folder, rows = run_sweep(sweep, cache_path, out or "runs", device or "auto", workers or 0, scheduler)
        click.echo(f"sweep of {len(rows)} configs x {len(sweep.seeds)} seeds: {folder}")
        click.echo((folder / "sweep.md").read_text().rstrip())
        return
    if task is None:
        raise ConfigError("--task is required (or --sweep FILE). Fix: pass --task " + "|".join(list_tasks()))
    if checkpoint is not None and not eval_only:
        raise ConfigError("--checkpoint is read by --eval-only only. Fix: add --eval-only to score it, or use "
                          "--init-from RUN to start training from a run's weights")
    if scheduler:
        raise ConfigError("--scheduler runs a --sweep's configs on a dask cluster. Fix: pass --sweep FILE with it")
    spec = get_task(task)
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"--config {config_file} does not exist. Fix: pass a YAML file")
    cfg = resolve_config(task, spec.head_defaults, config_file, parse_sets(sets), cache=cache_path, out=out,
                         device=device, seed=seed, workers=workers, cuda_graphs=cuda_graphs,
                         init_from=init_from)
    with open_cache(cache_path) as source:  # its loader workers (--workers) end with the run
        if eval_only:
            from .run import eval_checkpoint

            if checkpoint is None:
                raise ConfigError("--eval-only needs --checkpoint RUN/best.pt")
            results = eval_checkpoint(cfg, source, checkpoint)
            click.echo(json.dumps({k: results[k] for k in ("val", "test")}))
        else:
            from .run import train_run

            if save_masks and not hasattr(spec, "save_examples"):
                raise ConfigError(f"--save-masks: task {task} does not predict masks. "
                                  "Fix: use it with avs-s4 or avs-ms3")
            run_dir, results = train_run(cfg, source, overwrite=overwrite, progress=not quiet,
                                         save_masks=save_masks, resume=resume)
            click.echo(f"run {run_dir}")
            click.echo(f"trainable parameters {results['trainable_parameters']:,}; "
                       f"{results['seconds_per_epoch']:.2f} s per epoch; "
                       f"peak memory {results['peak_memory_bytes'] / 2**20:.0f} MiB; best epoch "
                       f"{results['best_epoch'] + 1} (on val)"
                       + (f"; {results.get('graph_replays', 0)} steps replayed from a CUDA graph"
                          if results.get("graph_replays") or cfg.cuda_graphs == "true" else ""))
    for line in results["table"]:
        click.echo(line)
