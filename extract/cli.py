"""``mettle-extract``: run the frozen backbones once and store every tapped block in a cache."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import yaml

from mettle.cache import DTYPES, PRESET_SUMMARY, STORAGES, TASK_PRESETS, CacheError, describe, verify_cache
from mettle.manifests import get_dataset, list_datasets
from mettle.manifests.cli import clean_errors
from mettle.manifests.options import parse_overrides

from .backbones import BackboneError, get_backbone_spec, list_backbones
from .config import BACKBONE_SETS, ExtractConfig, typed_options
from .media import MediaError
from .media.pool import DecodeWorkersError
from .shard import ExtractError

log = logging.getLogger(__name__)


def load_config(path: Path | None, cli: dict) -> ExtractConfig:
    """Typed defaults <- YAML file <- command-line options (only those given)."""
    values: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CacheError(f"--config {path}: cannot read it ({e.__class__.__name__}). Fix: pass a YAML mapping "
                             "of mettle-extract options") from None
        if not isinstance(loaded, dict):
            raise CacheError(f"--config {path} is not a YAML mapping. Fix: write option: value lines")
        known = set(ExtractConfig.__dataclass_fields__)
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise CacheError(f"--config {path}: unknown option {', '.join(unknown)}. Fix: use only "
                             f"{', '.join(sorted(known))}")
        values.update(typed_options(loaded, f"--config {path}"))
    values.update(typed_options({k: v for k, v in cli.items() if v is not None}, "option"))
    for required in ("dataset", "cache"):
        if not values.get(required):
            raise CacheError(f"--{required} is required. Fix: pass --{required} (or set it in --config)")
    given = (values.get("manifest_options") or {}).get("data_root")
    if given and values.get("data_root") and Path(given).resolve() != Path(values["data_root"]).resolve():
        raise CacheError(f"--set data_root={given} and --data-root {values['data_root']} differ: the manifest would "
                         "come from one folder and the media from the other. Fix: pass --data-root only")
    if values.get("scheduler") and values.get("workers"):
        raise CacheError("--scheduler and --workers both given: a --scheduler's cluster has its own workers, "
                         "--workers N starts a local one. Fix: pass one of them")
    return ExtractConfig(**values)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", help=f"registered dataset: {', '.join(list_datasets())}")
@click.option("--data-root", type=click.Path(file_okay=False), help="folder holding the dataset's media")
@click.option("--cache", type=click.Path(), help="cache folder to create or resume")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of these options (command-line options win)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="manifest builder option (repeatable)")
@click.option("--backbones", help=f"{', '.join(BACKBONE_SETS)} or visual=NAME,audio=NAME [specific]")
@click.option("--visual-weights", type=click.Path(dir_okay=False), help="local weights file of the visual backbone")
@click.option("--audio-weights", type=click.Path(dir_okay=False),
              help="local weights file of the audio backbone (HTS-AT: the official AudioSet .ckpt)")
@click.option("--random-init", is_flag=True, default=None, help="random backbone weights (cost runs, tests)")
@click.option("--preset", type=click.Choice(sorted(TASK_PRESETS)), help="what is cached [by dataset]")
@click.option("--tokens", help="token budget: full, last-grid or gridN [last-grid]")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), help="stored dtype [float16]")
@click.option("--format", "format_", type=click.Choice(STORAGES), help="storage [zarr]")
@click.option("--shard-clips", type=int, help="clips per shard (unit of writing and of work) [~512 MB]")
@click.option("--device", help="auto, cpu, cuda, cuda:N [auto]")
@click.option("--precision", type=click.Choice(["auto", "float32", "float16"]),
              help="backbone compute: auto = float16 autocast on CUDA when within tolerance [auto]")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="run each batch shape of the backbones as one CUDA graph, checked against eager "
              "[on for CUDA devices; --no-cuda-graphs: eager, less GPU memory]")
@click.option("--batch-size", type=int, help="segments per backbone forward [32]")
@click.option("--decode-threads", type=int, help="threads preprocessing (and, with 0 processes, decoding) [2]")
@click.option("--decode-processes", type=int, help="processes decoding media ahead of the backbones; 0: in the "
              "threads [on a GPU one per CPU, at most 8; on the CPU 0]")
@click.option("--audio-tile", type=int, help="seconds HTS-AT tiles each 1-s segment to [10; 5 for AVSBench]")
@click.option("--workers", type=int, help="start a local dask cluster of N worker processes")
@click.option("--scheduler", help="join a running dask cluster at ADDRESS instead")
@click.option("--limit", type=int, help="only the first N clips of the manifest (a smaller cache of its own)")
@click.option("--overwrite", is_flag=True, default=None, help="delete the cache in --cache and start again")
@click.option("--retry-failed", is_flag=True, default=None, help="redo shards whose clips failed before")
@click.option("--on-error", type=click.Choice(["fail", "skip"]),
              help="bad clip: stop (fail) or record it and go on (skip) [fail]")
@click.option("--info", "info", type=click.Path(), help="print what the cache at PATH holds, and exit")
@click.option("--verify", "verify", type=click.Path(),
              help="read every shard of the cache at PATH back against its checksums; damaged shards are marked "
                   "for the next extraction run; exit 1 if any")
@click.option("--list-backbones", "list_backbones_", is_flag=True, help="list registered backbones and sets, and exit")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@clean_errors(CacheError, BackboneError, MediaError, ExtractError, DecodeWorkersError, ValueError)
def main(info, verify, list_backbones_, quiet, verbose, config_file, overrides, format_, **options) -> None:
    """Extract DATASET's per-block backbone tokens into a cache (resumes by default)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")
    if info:
        for line in describe(Path(info)):
            click.echo(line)
        return
    if verify:
        report = verify_cache(Path(verify), progress=not quiet)
        for line in report.lines():
            click.echo(line)
        if not report.ok:
            sys.exit(1)
        return
    if list_backbones_:
        for name in list_backbones():
            spec = get_backbone_spec(name)
            click.echo(f"{name:<45} {spec.modality:<7} {spec.summary}")
        for name, pair in BACKBONE_SETS.items():
            click.echo(f"set {name:<12} " + ", ".join(f"{m}={b}" for m, b in pair.items()))
        for name, text in PRESET_SUMMARY.items():
            click.echo(f"preset {name:<15} {text}")
        return
    options["format"] = format_
    if options.get("dataset"):
        defaults = get_dataset(options["dataset"]).options()
        options["manifest_options"] = parse_overrides(overrides, defaults, f"dataset {options['dataset']!r}") or None
    cfg = load_config(config_file, options)
    from .run import extract

    summary = extract(cfg, progress=not quiet)
    for line in summary.lines():
        click.echo(line)
    if summary.failures and cfg.on_error != "skip":
        sys.exit(1)
