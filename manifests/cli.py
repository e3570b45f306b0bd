"""``mettle-manifest``: build, validate and save a dataset's manifest; print its summary."""

from __future__ import annotations

import functools
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import click

from ._registry import build_manifest, get_dataset, list_datasets
from .errors import ManifestError
from .options import parse_overrides
from .schema import SPLITS, Manifest, save_manifest


def clean_errors(*error_types: type[BaseException]) -> Callable:
    """Decorator for CLI commands: the given user errors print one line and exit with status 2."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                if e.errno is None and isinstance(e, (FileExistsError, *error_types)):
                    click.echo(f"error: {user_message(e)}", err=True)  # raised by mettle, with its fix
                else:  # the system's: an output path under a file, unwritable, missing, a scheduler not there
                    where = f": {e.filename}" if e.filename else ""
                    click.echo(f"error: {e.strerror or user_message(e)}{where}. Fix: check that the path (or "
                               "address) exists, is a folder where one is meant, and is writable", err=True)
                sys.exit(2)
            except (ManifestError, *error_types) as e:
                click.echo(f"error: {user_message(e)}", err=True)
                sys.exit(2)

        return inner

    return wrap


def user_message(e: BaseException) -> str:
    """The error's own message. One raised in a DataLoader worker process reaches the main process
    re-raised with torch's text around it ("Caught ... in DataLoader worker process 0", the worker's
    traceback, then ``module.Type: message``): the message alone is what the user needs."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    kind, sep, rest = last.partition(": ")
    return rest if sep and kind.split(".")[-1] == type(e).__name__ else last


def summary_lines(manifest: Manifest) -> list[str]:
    """Human-readable summary: sizes per split and, when there are event labels, label counts."""
    sizes = manifest.split_sizes()
    unit = "questions" if manifest.questions else "clips"
    lines = [f"dataset {manifest.dataset}: {len(manifest)} clips; {unit} per split: "
             + ", ".join(f"{s} {sizes[s]}" for s in SPLITS),
             f"manifest sha256 {manifest.sha256()}"]
    if "event" in manifest.vocabularies:
        names = manifest.vocabularies["event"]
        counts: Counter = Counter()
        for c in manifest.clips:
            counts.update(c.labels.get("segment_labels", ()))
            counts.update(c.labels.get("video_labels", ()))
        what = "segments" if any("segment_labels" in c.labels for c in manifest.clips) else "clips"
        lines.append(f"{what} per label: " + ", ".join(f"{names[i]} {counts[i]}" for i in range(len(names))))
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", required=True, help=f"registered dataset: one of {', '.join(list_datasets())}")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="builder option, e.g. --set data_root=PATH, --set eval_audio=dgsct (repeatable)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write the manifest JSON here")
@click.option("-v", "--verbose", is_flag=True, help="log progress")
@clean_errors()
def main(dataset: str, overrides: tuple[str, ...], out: Path | None, verbose: bool) -> None:
    """Build DATASET's manifest from its official annotations, validate it, print a summary."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    spec = get_dataset(dataset)
    manifest = build_manifest(dataset, **parse_overrides(overrides, spec.options(), f"dataset {dataset!r}"))
    for line in summary_lines(manifest):
        click.echo(line)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_manifest(manifest, out)
        click.echo(f"wrote {out}")
