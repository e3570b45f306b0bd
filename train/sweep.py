"""Sweeps: a grid of training configs against one cache, run in order or on dask workers.

A sweep file (YAML)::

    task: ave
    base:                  # dotted keys or sections, as --set / --config take them
      optim: {epochs: 10}
    grid:                  # every combination of these values
      lcd.meta_tokens: [2, 4, 8]
      lcd.layers: [all, last-stage, every-2]
    seeds: [0, 1, 2]

Each combination x seed is one ordinary run folder (so finished runs are skipped on rerun, and a
sweep can be extended by editing the grid). The results are gathered into ``sweep.csv`` and
``sweep.md`` (mean +- std over seeds of the task's metrics and the trainable parameters),
``sweep.png`` (the selection metric against trainable parameters), ``curves.png`` (validation
curves per grid point) and, when the grid varies ``lcd.layers``, ``layers.png`` (the metric per
layer choice: single blocks, stages, every n-th, i.e. the per-layer contribution). Runs on dask workers load the
cache themselves; the runs are deterministic, so the table does not depend on where they ran.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .config import EXECUTION_OPTIONS, ConfigError, TrainConfig, _flatten_yaml, resolve_config
from .tasks import get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    task: str
    base: Mapping[str, Any]
    grid: Mapping[str, list]
    seeds: tuple[int, ...]

    def points(self) -> list[dict[str, Any]]:
        """Every grid combination (without the seed), in file order."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))] or [{}]

    def configs(self, cache: str, out: str, device: str = "auto") -> list[tuple[dict[str, Any], TrainConfig]]:
        spec = get_task(self.task)
        return [(point, resolve_config(self.task, spec.head_defaults, sets={**self.base, **point}, cache=cache,
                                       out=out, device=device, seed=seed))
                for point in self.points() for seed in self.seeds]


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--sweep {path}: cannot read it ({e.__class__.__name__}). Fix: pass a YAML file") from None
    if not isinstance(d, Mapping) or "task" not in d:
        raise ConfigError(f"--sweep {path} needs a mapping with 'task', and 'grid' / 'base' / 'seeds'. "
                          "Fix: see the example in train/sweep.py")
    unknown = set(d) - {"task", "base", "grid", "seeds"}
    if unknown:
        raise ConfigError(f"--sweep {path}: unknown section {', '.join(sorted(unknown))}. Fix: use task, base, grid, seeds")
    grid = _flatten_yaml(d.get("grid") or {})
    bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
    if bad:
        raise ConfigError(f"--sweep {path}: grid values must be non-empty lists ({', '.join(bad)}). Fix: write "
                          f"{bad[0]}: [a, b]")
    same = [k for k in grid if k in EXECUTION_OPTIONS]
    if same:
        raise ConfigError(f"--sweep {path}: grid axis {same[0]} does not change results (runs differing only in it "
                          f"share one run folder). Fix: set it in 'base' or on the command line")
    seeds = d.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"--sweep {path}: seeds must be a non-empty list of integers. Fix: seeds: [0, 1, 2]")
    return Sweep(str(d["task"]), _flatten_yaml(d.get("base") or {}), grid, tuple(seeds))


def _run(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """One sweep run (also the dask task): open the cache, train or reuse the finished run."""
    from mettle.cache import open_cache

    from .config import load_config_dict
    from .run import train_run

    cfg = load_config_dict(cfg_dict)
    with open_cache(cfg.cache) as source:  # its loader workers (cfg.workers) end with the run
        run_dir, results = train_run(cfg, source, progress=False, resume=True)  # a rerun continues cut runs
    return {"run": str(run_dir), **results}


def run_sweep(sweep: Sweep, cache: str, out: str, device: str = "auto", workers: int = 0,
              scheduler: str | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Run every config (skipping finished ones); write and return the summary table."""
    configs = sweep.configs(cache, out, device)
    # validate every config before spending time on any (a bad grid value fails here)
    from mettle.cache import open_cache

    source = open_cache(cache)
    from .loop import build_model

    for _, cfg in configs[:: max(1, len(sweep.seeds))]:
        build_model(cfg, source)
    jobs = [cfg.to_dict() for _, cfg in configs]
    if workers or scheduler:
        from distributed import Client, LocalCluster

        cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                      dashboard_address=None)
        client = Client(scheduler or cluster)
        try:
            results = client.gather(client.map(_run, jobs, pure=False))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    else:
        results = [_run(j) for j in jobs]
    points = [p for p, _ in configs]
    rows = summarise(sweep, points, results)
    folder = Path(out) / f"sweep-{sweep.task}"
    metric = get_task(sweep.task).select_metric
    write_tables(folder, rows, metric)
    write_plots(folder, rows, results, points, metric)
    return folder, rows


def summarise(sweep: Sweep, points: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point: mean and std over seeds of every test metric, and trainable parameters."""
    rows = []
    for point in sweep.points():
        runs = [r for p, r in zip(points, results) if p == point]
        metrics = sorted({k for r in runs for k in r["test"] if k != "loss"})
        row: dict[str, Any] = {**point, "seeds": len(runs), "trainable_parameters": runs[0]["trainable_parameters"]}
        for m in metrics:
            values = [r["test"][m] for r in runs if m in r["test"]]
            row[f"{m}_mean"] = statistics.fmean(values)
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def write_tables(folder: Path, rows: list[dict[str, Any]], metric: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(folder / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    point_keys = [k for k in keys if not k.endswith(("_mean", "_std")) and k not in ("seeds", "trainable_parameters")]
    metrics = [k[:-5] for k in keys if k.endswith("_mean")]
    lines = ["| " + " | ".join(point_keys + ["trainable", *metrics, "seeds"]) + " |",
             "|" + " --- |" * (len(point_keys) + len(metrics) + 2)]
    for r in rows:
        cells = [str(r[k]) for k in point_keys] + [f"{r['trainable_parameters']:,}"]
        cells += [f"{r[m + '_mean']:.2f} +- {r[m + '_std']:.2f}" for m in metrics] + [str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    (folder / "sweep.md").write_text("\n".join(lines) + "\n")
    (folder / "sweep.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        label = ", ".join(f"{k}={r[k]}" for k in point_keys)
        ax.errorbar(r["trainable_parameters"], r[f"{metric}_mean"], yerr=r[f"{metric}_std"], fmt="o", label=label)
    ax.set(xlabel="trainable parameters", ylabel=f"test {metric}", xscale="log")
    if len(rows) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "sweep.png", dpi=100)
    plt.close(fig)


def write_plots(folder: Path, sweep_rows: list[dict[str, Any]], results: list[dict[str, Any]],
                points: list[dict[str, Any]], metric: str) -> None:
    """``curves.png``: the validation metric per epoch of every grid point (mean over seeds);
    ``layers.png`` (when the grid varies ``lcd.layers``): the test metric per layer choice, the
    per-layer contribution view (single blocks, stages, every n-th)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .run import read_metrics

    point_keys = [k for k in sweep_rows[0] if not k.endswith(("_mean", "_std"))
                  and k not in ("seeds", "trainable_parameters")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for row in sweep_rows:
        point = {k: row[k] for k in point_keys}
        curves = []
        for p, r in zip(points, results):
            if p == point:
                curves.append([x.get(f"val_{metric}", float("nan")) for x in read_metrics(Path(r["run"]))])
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[e] for c in curves) for e in range(n)]
        ax.plot(range(1, n + 1), mean, marker=".", label=", ".join(f"{k}={point[k]}" for k in point_keys))
    ax.set(xlabel="epoch", ylabel=f"validation {metric}")
    if len(sweep_rows) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=100)
    plt.close(fig)
    if "lcd.layers" in point_keys:
        by_layers: dict[str, list[float]] = {}
        for row in sweep_rows:
            by_layers.setdefault(str(row["lcd.layers"]), []).append(row[f"{metric}_mean"])
        names = list(by_layers)
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names)), 3.5))
        ax.bar(range(len(names)), [max(v) for v in by_layers.values()])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel=f"test {metric} (best over the other options)", title="per-layer contribution")
        fig.tight_layout()
        fig.savefig(folder / "layers.png", dpi=100)
        plt.close(fig)
