"""The training loop, shared by every task and every token source.

``fit`` trains LCD + head on a :class:`TokenSource` (a cache, or live backbones), evaluates the
validation split after each epoch, keeps the best checkpoint (validation metric; never test),
and reports the test split with the best weights. Data order comes from a generator seeded by
``cfg.seed`` and sources never touch the global RNG, so two sources serving the same tokens give
the same training, step for step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from fnmatch import fnmatchcase
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from mettle.cache import TokenSource
from mettle.cache.runtime import cublas_workspace, peak_memory, resolve_device

from .config import TrainConfig
from .model import MettleModel, count_parameters
from .step import TrainStep, adopt_optimizer, graphs_for, make_optimizer, to_device
from .tasks import Task, get_task

log = logging.getLogger(__name__)

METRIC_UNITS = "percent"  # what saved states and results hold; absent: saved while AVE reported fractions
LAG_DEVICES = ("cuda",)  # where a step's loss is read only after the next step is queued


@dataclass
class FitResult:
    model: MettleModel
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    step_losses: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    extra: dict[str, dict[str, float]] = field(default_factory=dict)  # further test sets
    initialised: int = 0  # parameters taken from cfg.init_from
    left_out: dict[str, int] = field(default_factory=dict)  # clips per split without tokens (failed extraction)
    seconds_per_epoch: float = 0.0
    peak_memory: int = 0
    trainable_parameters: int = 0
    graph_replays: int = 0  # training steps replayed from a CUDA graph (cuda_graphs: auto on CUDA, or true)


def build_model(cfg: TrainConfig, source: TokenSource, task: Task | None = None) -> MettleModel:
    """The model for ``cfg`` on ``source``, after checking the source has what it reads."""
    task = task or get_task(cfg.task)
    task.check(source.manifest)
    torch.manual_seed(cfg.seed)
    model = MettleModel(source.meta, source.manifest, cfg, task)
    source.require(model.keys, f"task {cfg.task} with lcd.layers={cfg.lcd.layers}")
    return model


def _batches(items: Sequence[int], size: int, generator: torch.Generator | None) -> list[list[int]]:
    order = torch.randperm(len(items), generator=generator).tolist() if generator is not None else range(len(items))
    ordered = [items[i] for i in order]
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


@torch.no_grad()
def predict(model: MettleModel, task: Task, source: TokenSource, items: Sequence[int], batch_size: int,
            device: torch.device, workers: int = 0):
    """The model's outputs for ``items`` in order, on the CPU (a tensor, or a dict of tensors), and the
    targets the source carried with them (``task.target_keys``; None when the task has none)."""
    model.eval()
    batches = _batches(list(items), batch_size, None)
    outs, targets = [], []
    rows = [task.item_rows(source.manifest, b) for b in batches]
    for b, data in zip(batches, source.iterate(rows, model.keys + list(task.target_keys), workers,
                                               codes=model.code_keys)):
        extra = to_device(task.head_inputs(source.manifest, b), device)
        out = model(to_device(_tokens(data, task), device), **extra)
        outs.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict) else out.float().cpu())
        carried = task.batch_targets(data)
        if carried is not None:
            targets.append(carried)
    if not outs:
        return torch.empty(0), None
    cat = {k: torch.cat([o[k] for o in outs]) for k in outs[0]} if isinstance(outs[0], dict) else torch.cat(outs)
    return cat, torch.cat(targets) if targets else None


def _tokens(data: dict[str, Any], task: Task) -> dict[str, torch.Tensor]:
    """The batch's token arrays, without the targets that travel with them."""
    return {k: v for k, v in data["tokens"].items() if k not in task.target_keys}


def evaluate(model: MettleModel, task: Task, source: TokenSource, split: str, batch_size: int,
             device: torch.device, workers: int = 0) -> dict[str, float]:
    items = task.items(source, split)
    if not items:
        return {}
    outputs, targets = predict(model, task, source, items, batch_size, device, workers)
    if targets is None:
        targets = task.targets(source.manifest, items)
    return {**task.metrics(outputs, targets, source.manifest, items), "loss": float(task.loss(outputs, targets))}


def fit(cfg: TrainConfig, source: TokenSource, progress: bool = True, max_steps: int | None = None,
        on_epoch: Callable[[dict[str, Any], FitResult], None] | None = None, last_path: Path | None = None,
        resume: dict[str, Any] | None = None, model: MettleModel | None = None) -> FitResult:
    """Train on ``source``'s train split; select on val; score test with the best weights.

    ``max_steps`` stops early (tests, benchmarks); ``on_epoch(record, result)`` sees each epoch's
    record (the run folder writer uses it to append metrics and save checkpoints). With
    ``last_path`` the whole training state (weights, optimiser, schedule, data-order and dropout
    RNGs, best-so-far) is saved atomically after every epoch; ``resume`` (that file, loaded)
    continues from it and ends exactly where an uninterrupted run would. ``model``: one just made by
    :func:`build_model` for ``cfg`` and ``source`` (a caller that validated with it need not build twice).
    """
    # the task that built the model: its head options (AVVP's smoothing and HAN losses, AVQA's match weight)
    # were read by build_head on that instance, and a fresh one would train with their defaults
    task = model.task if model is not None else get_task(cfg.task)
    device = resolve_device(cfg.device)
    if cublas_workspace(cfg.cublas_workspace, device, source.runs_backbones) == "small":  # before its first product
        log.info("cublas_workspace: 4 MiB a stream (cublas_workspace=library for cuBLAS's own)")
    model = model if model is not None else build_model(cfg, source, task)
    initialised = init_from(model, cfg.init_from, cfg.init_keys) if cfg.init_from else 0
    model.to(device)
    result = FitResult(model, trainable_parameters=count_parameters(model), initialised=initialised)
    result.left_out = {split: len(source.rows(split, include_failed=True)) - len(source.rows(split))
                       for split in ("train", "val", "test")}
    if any(result.left_out.values()):
        log.warning("clips that failed extraction are left out: %s", result.left_out)
    train_items = task.items(source, "train")
    for split, items in (("train", train_items), ("val", task.items(source, "val")), ("test", task.items(source, "test"))):
        if not items:  # val selects the checkpoint and test is what a run reports: none may be empty
            raise ValueError(f"the token source {source.describe()} has nothing of the {split} split for task "
                             f"{cfg.task} ({len(source.rows(split, include_failed=True))} clips in it, "
                             f"{result.left_out[split]} failed extraction). Fix: extract more clips (a larger "
                             "--limit) so that every split has some, or re-extract failed ones (--retry-failed)")
    graphs = graphs_for(cfg.cuda_graphs, device)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim.lr, cfg.optim.weight_decay,
                         device, graphs)
    steps_per_epoch = math.ceil(len(train_items) / cfg.optim.batch_size)
    total = steps_per_epoch * cfg.optim.epochs
    warm = steps_per_epoch * cfg.optim.warmup_epochs

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    generator = torch.Generator().manual_seed(cfg.seed)
    best = (-math.inf, -math.inf)
    step, start = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        adopt_optimizer(opt, device, graphs)  # the saving run may have stepped another way
        sched.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        restore_rng(resume, device)
        best, step, start = tuple(resume["best"]), int(resume["step"]), int(resume["epoch"]) + 1
        result.best_epoch, result.best_state, result.val = int(resume["best_epoch"]), resume["best_state"], resume["val"]
        result.history, result.step_losses = list(resume["history"]), list(resume["step_losses"])
        if resume.get("metric_units") != METRIC_UNITS:  # saved while some metrics were fractions
            best = (task.in_percent({task.select_metric: best[0]})[task.select_metric], best[1])
            result.val = task.in_percent(result.val)
            result.history = [task.in_percent(r, "val_") for r in result.history]
        log.info("resuming at epoch %d of %d", start + 1, cfg.optim.epochs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step = TrainStep(model, task.loss, opt, device, cfg.optim.grad_clip, graphs,
                           overlap_copy=graphs and cfg.overlap_copy != "false")
    if cfg.overlap_copy == "true" and not graphs:
        log.warning("overlap_copy: training runs without CUDA graphs (device %s, cuda_graphs=%s); the batches' copies "
                    "are not overlapped", device, cfg.cuda_graphs)
    lag = device.type in LAG_DEVICES  # reading a loss waits for the device: do it a step late
    bar = tqdm(range(start, cfg.optim.epochs), desc=f"train {cfg.task}", unit="epoch", disable=not progress)
    epoch_times = [r["seconds"] for r in result.history]
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        batches = _batches(train_items, cfg.optim.batch_size, generator)
        rows = [task.item_rows(source.manifest, b) for b in batches]
        losses: list[float] = []
        pending: tuple | None = None  # (loss, its copy's event, batch data, step) not yet read back

        def settle(loss: torch.Tensor, ready: torch.cuda.Event | None, data: dict[str, Any], at: int) -> None:
            # the batch's data stays referenced until here: its host buffers are not reused before
            # the step's copies from them have run
            if ready is not None:
                ready.synchronize()  # this step's loss on the host; the next step may still run
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(_diverged(loss, epoch, at, data, task, source))
            losses.append(value)
            result.step_losses.append(value)

        keys = model.keys + list(task.target_keys)
        for b, data in zip(batches, source.iterate(rows, keys, cfg.workers, seed=cfg.seed + epoch,
                                                   codes=model.code_keys)):
            target = task.batch_targets(data)
            target = task.targets(source.manifest, b) if target is None else target
            loss = train_step(_tokens(data, task), task.head_inputs(source.manifest, b), target)
            ready = None
            if lag and device.type == "cuda":  # copied out right behind this step: reading it waits for it only
                loss, ready = loss.to("cpu", non_blocking=True), torch.cuda.Event()
                ready.record(torch.cuda.current_stream(device))
            sched.step()
            if pending is not None:
                settle(*pending)
            pending = (loss, ready, data, step)
            if not lag:
                settle(*pending)
                pending = None
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if pending is not None:
            settle(*pending)
        epoch_times.append(time.perf_counter() - t0)
        val = evaluate(model, task, source, "val", cfg.optim.batch_size, device, cfg.workers)
        record = {"epoch": epoch, "step": step, "train_loss": sum(losses) / max(1, len(losses)),
                  "lr": float(opt.param_groups[0]["lr"]), "seconds": epoch_times[-1],
                  **{f"val_{k}": v for k, v in val.items()}}
        # best = highest validation metric; ties (a saturated metric) go to the lower validation loss
        score = (val.get(task.select_metric, 0.0), -val.get("loss", record["train_loss"]))
        if score > best:
            best, result.best_epoch, result.val = score, epoch, val
            result.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            record["best"] = True
        result.history.append(record)
        if last_path is not None:
            save_state(last_path, {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": generator.get_state(), **rng_state(device),
                "best": list(best), "step": step, "epoch": epoch, "best_epoch": result.best_epoch,
                "best_state": result.best_state, "val": result.val, "history": result.history,
                "step_losses": result.step_losses, "fingerprint": cfg.fingerprint(), "metric_units": METRIC_UNITS})
        if on_epoch is not None:
            on_epoch(record, result)
        bar.set_postfix(train_loss=f"{record['train_loss']:.3f}", **{f"val_{k}": f"{v:.3f}" for k, v in val.items()})
        if max_steps is not None and step >= max_steps:
            break
    bar.close()
    result.graph_replays = train_step.replays
    result.seconds_per_epoch = sum(epoch_times) / max(1, len(epoch_times))
    result.peak_memory = peak_memory(device)
    if result.best_state is not None:
        model.load_state_dict(result.best_state)
    result.test = evaluate(model, task, source, "test", cfg.optim.batch_size, device, cfg.workers)
    for split in task.extra_splits(source):
        result.extra[split] = evaluate(model, task, source, split, cfg.optim.batch_size, device, cfg.workers)
    return result


def _diverged(loss: torch.Tensor, epoch: int, step: int, data: dict[str, Any], task: Task, source: TokenSource) -> str:
    """Say why the loss is not finite: bad tokens in named clips, or a diverging model."""
    tokens = _tokens(data, task)
    rows = data["row"].tolist()
    bad = sorted({source.manifest.clips[r].clip_id for k, r in enumerate(rows)
                  if any(not torch.isfinite(v[k].float()).all() for v in tokens.values())})
    if bad:
        return (f"loss is {loss.item()} at epoch {epoch} step {step}: non-finite tokens in clip {', '.join(bad[:5])}. "
                "Fix: re-extract those clips (mettle-extract --retry-failed after removing them), or exclude them")
    return (f"loss is {loss.item()} at epoch {epoch} step {step} with finite tokens: training diverged. "
            "Fix: lower optim.lr or raise optim.grad_clip's strictness (smaller value)")


def init_from(model: MettleModel, run: str | Path, keys: str = "*") -> int:
    """Copy the parameters of a finished run whose name and shape match (e.g. the LCDs and the
    grounding module of an ``avqa-grounding`` run into ``avqa``), restricted to names matching one of
    ``keys``' comma-separated fnmatch patterns (``head.grounding.*``: the grounding module only, as the
    reference AVQA workflow carries its fusion layers); returns how many tensors."""
    path = Path(run)
    path = path / "best.pt" if path.is_dir() else path
    state = load_checkpoint(path, "--init-from")["model"]
    own = model.state_dict()
    patterns = [p.strip() for p in keys.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"init_keys={keys!r} names no pattern. Fix: pass name patterns such as head.grounding.* "
                         "(or * for every matching parameter)")
    for p in patterns:
        if not any(fnmatchcase(k, p) for k in state):
            prefixes = sorted({".".join(k.split(".")[:2]) for k in state})
            raise ValueError(f"init_keys pattern {p!r} matches no parameter of {path} (its names start with "
                             f"{', '.join(prefixes[:12])}{', ...' if len(prefixes) > 12 else ''}). Fix: use one of "
                             "those names with a trailing .*")
    chosen = {k: v for k, v in state.items() if any(fnmatchcase(k, p) for p in patterns)}
    taken = {k: v for k, v in chosen.items() if k in own and own[k].shape == v.shape}
    if not taken:
        raise ValueError(f"--init-from {run}: no parameter matches this model. Fix: start from a run of a "
                         "compatible task with the same lcd.* settings (e.g. avqa-grounding for avqa)")
    if keys != "*" and len(taken) < len(chosen):
        skipped = sorted(set(chosen) - set(taken))
        log.warning("init_keys=%s: %d chosen tensors are not in this model or differ in shape, left at their "
                    "initial values: %s%s", keys, len(skipped), ", ".join(skipped[:8]), " ..." if len(skipped) > 8 else "")
    model.load_state_dict(taken, strict=False)
    log.info("initialised %d of %d tensors from %s", len(taken), len(own), path)
    return len(taken)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG streams a training step draws from, for a resume to continue exactly.

    Dropout and AVQA grounding's negatives draw from the generator of the device they run on: the
    CPU's (``torch_rng``) and, when training on CUDA, that device's (``cuda_rng``, seed and offset;
    CUDA graphs advance it on the host at every replay, so it is current here). Both uint8 tensors.
    """
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(saved: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`rng_state` saved. A state saved without ``cuda_rng`` (on the CPU, or by a
    mettle before 2026-11-28) resumed on CUDA continues from the current CUDA stream instead, so dropout
    masks differ from an uninterrupted run's: said once, as a warning."""
    torch.set_rng_state(saved["torch_rng"])
    if device.type != "cuda":
        return
    if "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)
    else:
        log.warning("the saved training state has no CUDA RNG state (saved on the CPU or by an older mettle): the "
                    "resumed run's dropout and random negatives differ from an uninterrupted run's; train from the "
                    "start (without --resume) for an exact rerun")


def save_state(path: Path, obj: dict[str, Any]) -> None:
    """Atomic: a kill never leaves half a file. Loadable with ``torch.load(weights_only=True)``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """The best weights and what they scored (``{"model", "info"}``), written atomically."""
    save_state(path, {"model": state, "info": info})


def load_checkpoint(path: Path, option: str = "--checkpoint") -> dict[str, Any]:
    """A checkpoint or training state (``weights_only``); ``option`` names where the path came from."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{option} {path} does not exist. Fix: pass a run folder or its best.pt") from None
    except Exception as e:  # a damaged or foreign file
        raise ValueError(f"{option} {path} is not a mettle checkpoint ({e.__class__.__name__}). "
                         "Fix: pass a run folder or its best.pt") from None
