"""A training run on disk: its folder, resolved config, metrics log, best checkpoint, results, plot.

Run folder ``<out>/<task>__<cache name>-<tokens>-<dtype>__K<k>-d<d>-<layers>-lr<lr>-s<seed>-<hash>``::

    config.yaml      the resolved config (defaults <- YAML <- --set)
    source.json      the token source's description (backbones, weights, arrays, budget): what
                     mettle-predict must compute from new videos
    metrics.jsonl    one line per epoch (train loss, lr, validation metrics, seconds)
    best.pt          best-on-validation weights + info (torch.load(weights_only=True))
    last.pt          the whole training state after the last finished epoch (--resume)
    curves.png       training loss and validation metric per epoch
    results.json     written last: test and val metrics, trainable parameters, peak memory,
                     seconds per epoch, the token source's identity. Its presence = run done.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from mettle import __version__
from mettle.cache import CacheError, CacheMeta, TokenSource
from mettle.cache.format import write_json_atomic
from mettle.cache.writer import identity_diff
from mettle.cache.runtime import cublas_workspace
from mettle.manifests.errors import first_line

from .config import ConfigError, TrainConfig, save_config
from .loop import METRIC_UNITS, FitResult, build_model, evaluate, fit, load_checkpoint, resolve_device, save_checkpoint
from .tasks import Task, get_task

log = logging.getLogger(__name__)
RESULTS = "results.json"
SOURCE_META = "source.json"


def run_name(cfg: TrainConfig, source: TokenSource) -> str:
    m = source.meta
    src = re.sub(r"[^A-Za-z0-9._+-]", "_", Path(source.describe()).name or "source")
    return (f"{cfg.task}__{src}-{m.tokens}-{m.dtype}__K{cfg.lcd.meta_tokens}-d{cfg.lcd.dim}-"
            f"{re.sub(r'[^A-Za-z0-9.+-]', '_', cfg.lcd.layers)[:40]}-lr{cfg.optim.lr:g}-s{cfg.seed}-{cfg.fingerprint()}")


def source_identity(source: TokenSource) -> dict[str, Any]:
    m = source.meta
    return {"source": source.describe(), "dataset": m.dataset, "manifest_sha256": m.manifest_sha256,
            "preset": m.preset, "tokens": m.tokens, "dtype": m.dtype,
            "backbones": {k: {"name": b.name, "weights_id": b.weights_id} for k, b in m.backbones.items()}}


def check_same_source(run_dir: Path, source: TokenSource, what: str) -> None:
    """The run folder's ``source.json`` describes ``source`` (the folder name holds only the cache
    folder's name, tokens and dtype: a cache extracted again at the same path, with other clips or
    backbones, maps to the same run folder). Refused with the difference and the fix."""
    path = Path(run_dir) / SOURCE_META
    if not path.is_file():
        return  # a run folder written before the source was recorded
    try:
        saved = CacheMeta.from_dict(json.loads(path.read_text()), str(path)).identity()
    except (CacheError, ValueError) as e:
        diff = f"its {SOURCE_META} is unreadable ({e.__class__.__name__})"
    else:
        diff = identity_diff(saved, source.meta.identity())
    if diff:
        raise CacheError(f"{run_dir}: {what} another token source than {source.describe()} ({diff}). Fix: pass "
                         "another --out, or delete that run folder (mettle-train --overwrite trains it again)")


def _table(task: Task, test: dict[str, float], extra: dict[str, dict[str, float]]) -> list[str]:
    return task.table(test) + [line for name, m in extra.items() for line in ["", f"{name}:", *task.table(m)] if m]


def read_results(path: Path) -> dict[str, Any]:
    """A finished run's results, its metrics in percent also where it was saved while AVE reported a
    fraction (no ``metric_units``), so that sweeps and reruns never mix the two."""
    results = json.loads(Path(path).read_text())
    if results.get("metric_units") != METRIC_UNITS:
        task = get_task(results["task"])
        results["test"], results["val"] = task.in_percent(results["test"]), task.in_percent(results["val"])
        results["extra_tests"] = {n: task.in_percent(m) for n, m in results.get("extra_tests", {}).items()}
        results["metric_units"], results["table"] = METRIC_UNITS, _table(task, results["test"], results["extra_tests"])
    return results


def train_run(cfg: TrainConfig, source: TokenSource, overwrite: bool = False, progress: bool = True,
              plot: bool = True, save_masks: int = 0, resume: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train into a run folder (or return the finished one's results: reruns skip finished work).

    ``save_masks`` (segmentation tasks): write predicted-vs-true mask overlays of that many test
    clips into ``<run>/masks/``. An unfinished run folder is started again, or with ``resume``
    continued from its ``last.pt`` (saved after every epoch).
    """
    run_dir = Path(cfg.out) / run_name(cfg, source)
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it again. Fix: pass one of them")
    if (run_dir / RESULTS).is_file() and not overwrite:
        check_same_source(run_dir, source, "its results are of")
        log.info("%s is finished; not training again (pass --overwrite to)", run_dir)
        return run_dir, read_results(run_dir / RESULTS)
    model = build_model(cfg, source)  # refuse a source that lacks what the task needs before creating anything
    state = None
    if resume and (run_dir / "last.pt").is_file():
        check_same_source(run_dir, source, "--resume would continue training on")
        state = load_checkpoint(run_dir / "last.pt")
        log.info("--resume: continuing %s after epoch %d", run_dir, int(state["epoch"]) + 1)
        _trim_metrics(run_dir / "metrics.jsonl", int(state["epoch"]),  # saved while AVE gave fractions: percent
                      get_task(cfg.task) if state.get("metric_units") != METRIC_UNITS else None)
    elif run_dir.exists():
        if (run_dir / "last.pt").is_file() and not overwrite:
            raise ConfigError(f"{run_dir} is an unfinished run of this config (its state after some epochs is in "
                              "last.pt). Fix: pass --resume to continue it, or --overwrite to start it again")
        if resume:
            log.info("--resume: %s has no last.pt; starting it again", run_dir)
        shutil.rmtree(run_dir)  # an unfinished run without a saved state, or --overwrite: start it again
    elif resume:
        log.info("--resume: there is no unfinished run of this config in %s; training from the start", cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    write_json_atomic(run_dir / SOURCE_META, source.meta.to_dict())  # what prediction must feed the model
    task = get_task(cfg.task)

    def on_epoch(record: dict[str, Any], res: FitResult) -> None:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("best"):
            save_checkpoint(run_dir / "best.pt", res.best_state,
                            {"epoch": record["epoch"], "task": cfg.task, "config": cfg.to_dict(),
                             "val": {k: v for k, v in record.items() if k.startswith("val_")}})

    t0 = time.perf_counter()
    try:
        res = fit(cfg, source, progress=progress, on_epoch=on_epoch, last_path=run_dir / "last.pt", resume=state,
                  model=model)
    except BaseException:
        if state is None and not (run_dir / "last.pt").exists():  # nothing to resume: leave no empty run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    results = {"task": cfg.task, "test": res.test, "val": res.val, "extra_tests": res.extra,
               "initialised_tensors": res.initialised, "clips_left_out": res.left_out, "best_epoch": res.best_epoch,
               "epochs": len(res.history), "trainable_parameters": res.trainable_parameters,
               "peak_memory_bytes": res.peak_memory, "seconds_per_epoch": res.seconds_per_epoch,
               "graph_replays": res.graph_replays,
               "seconds": time.perf_counter() - t0, "device": str(resolve_device(cfg.device)),
               "source": source_identity(source), "mettle_version": __version__,
               "metric_units": METRIC_UNITS, "table": _table(task, res.test, res.extra)}
    if plot:
        plot_curves(res.history, task.select_metric, run_dir / "curves.png")
    if save_masks:
        results["mask_overlays"] = [str(p) for p in write_masks(res, task, source, cfg, run_dir / "masks", save_masks)]
    write_json_atomic(run_dir / RESULTS, results)
    return run_dir, results


def _trim_metrics(path: Path, last_epoch: int, in_percent: Task | None = None) -> None:
    """Keep the metric lines of the epochs a resumed state covers (a kill may have cut one short); with
    ``in_percent`` (a state saved while AVE reported fractions) their metrics in percent, as the new lines."""
    if path.is_file():
        keep = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        keep = [r if in_percent is None else in_percent.in_percent(r, "val_") for r in keep if r["epoch"] <= last_epoch]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch lines (``metrics.jsonl``), in percent also for a finished run saved while AVE
    reported fractions (its ``results.json`` has no ``metric_units``)."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    results = Path(run_dir) / RESULTS
    if results.is_file():
        saved = json.loads(results.read_text())
        if saved.get("metric_units") != METRIC_UNITS:
            task = get_task(saved["task"])
            lines = [task.in_percent(r, "val_") for r in lines]
    return lines


def eval_checkpoint(cfg: TrainConfig, source: TokenSource, checkpoint: Path) -> dict[str, Any]:
    """Score a saved checkpoint on the validation and test splits of ``source``."""
    ckpt = load_checkpoint(checkpoint)
    try:  # scoring on another cache is allowed (another test set), but other tokens make other features
        check_same_source(Path(checkpoint).parent, source, "its checkpoint was trained on")
    except CacheError as e:
        log.warning("%s", str(e).split(" Fix:")[0])
    task = get_task(cfg.task)
    device = resolve_device(cfg.device)
    cublas_workspace(cfg.cublas_workspace, device, source.runs_backbones)  # as training sets it
    model = build_model(cfg, source, task)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"--checkpoint {checkpoint} does not fit this model ({first_line(e)[:160]}). "
                         "Fix: pass the run's config (--config RUN/config.yaml) with its checkpoint") from None
    model.to(device)
    out = {split: evaluate(model, task, source, split, cfg.optim.batch_size, device, cfg.workers)
           for split in ("val", "test")}
    return {"task": cfg.task, "checkpoint": str(checkpoint), **out, "table": task.table(out["test"]),
            "source": source_identity(source)}


def write_masks(res: FitResult, task, source: TokenSource, cfg: TrainConfig, folder: Path, n: int) -> list[Path]:
    """Overlays of predicted vs true masks for the first ``n`` test clips (segmentation tasks)."""
    from .loop import predict

    if not hasattr(task, "save_examples"):
        raise ValueError(f"--save-masks: task {cfg.task} does not predict masks. Fix: use it with avs-s4 or avs-ms3")
    items = task.items(source, "test")[:n]
    outputs, targets = predict(res.model, task, source, items, cfg.optim.batch_size, resolve_device(cfg.device))
    return task.save_examples(outputs, targets, source.manifest, items, folder)


def plot_curves(history: list[dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in history]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="training loss", title="training loss")
    key = f"val_{metric}"
    ax[1].plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", color="tab:green")
    ax[1].set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
