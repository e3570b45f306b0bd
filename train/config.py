"""Training configuration: typed defaults <- YAML file <- ``--set key=value`` overrides.

Sections are dataclasses; keys are dotted (``lcd.meta_tokens=4``, ``optim.lr=1e-3``,
``head.hidden=128``). Each override takes the type of its default; an unknown key or a value of the
wrong type is refused with the valid keys. The resolved config is saved with every run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from mettle.cache.runtime import CUBLAS_WORKSPACE_CHOICES
from mettle.manifests.options import parse_bool


class ConfigError(ValueError):
    """A configuration value or file cannot be used; the message says the fix."""


@dataclass(frozen=True)
class LCDConfig:
    """Layer-Centric Distillation options (see ``lcd.py``).

    layers: ``auto`` (the task's choice: every block for classification, the last stage for AVS) |
        ``all`` | ``last-stage`` | ``every-N`` (every N-th block, counted from the last) |
        comma-separated block names (``stage2.block17,stage3.block1``).
    share: ``stage`` (layers of one backbone stage share the value/output projections and the MLP;
        meta-tokens, queries and gates stay per layer) | ``none`` (every layer its own).
    chunk_mib: the layers of a group run in chunks whose meta-token activations stay under this many
        MiB, the attention inside in pieces whose float32 normalised tokens do too; ``0`` takes the
        device's default (fewer, larger chunks on CUDA, where the number of kernels is the cost). Speed and
        transient memory only: every value gives the same numbers up to float rounding (the order
        of the sums), so it is no part of a run's fingerprint and no sweep axis.
    matmul: how CUDA runs the LCD's float32 matrix products: ``auto`` (the default: ``tf32``) | ``tf32``
        (tensor cores, inputs rounded to 10 mantissa bits, the float16 cache's own precision; sums
        in float32) | ``float32`` (full float32, FFMA: on an H200 the products took 6.5 of a batch-8
        step's 10.7 ms of kernels that way). The CPU has no TF32: there every value computes in float32.
        Set around the LCD's forward (the process's setting is restored after) and again for the backward of
        its attention and of the recomputed part after it; where that part keeps its activations instead
        (small batches: ``LCD.recompute``), its backward, small products, follows the process's setting as
        the head's does. Like the device, an execution choice, no part of a run's fingerprint.
    The queries are per layer and per head (``heads x meta_tokens x D_l``); with
    ``meta_tokens <= dim / heads`` that is the same function class as query and key projections.
    """

    meta_tokens: int = 8
    dim: int = 256
    heads: int = 4
    layers: str = "auto"
    adapt: bool = True
    preserve: bool = True
    mlp_ratio: float = 2.0
    gate_init: float = 0.5
    attention: str = "folded"  # folded | naive (the same mathematics; naive projects every token)
    share: str = "stage"  # stage | none: a stage's layers share value/output projections and the MLP
    chunk_mib: int = 0  # transient memory per batched group of layers; 0: by device (lcd.py, LCD.CHUNK_MIB:
    # on the CPU 8 MiB of tokens per attention piece and 16 of activations per chunk; 32 and 32 on CUDA)
    matmul: str = "auto"  # auto | tf32 | float32: the LCD's float32 matrix products on CUDA (auto: tf32)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 1e-2
    epochs: int = 30
    batch_size: int = 16
    warmup_epochs: int = 1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``head`` holds the task's head options (its defaults come from the task)."""

    task: str
    cache: str = ""
    out: str = "runs"
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    cuda_graphs: str = "auto"  # each full batch's step as one replayed CUDA graph (step.py): auto = on CUDA
    overlap_copy: str = "auto"  # graphed steps take turns between two graphs, the next batch copied in during the
    # current one (step.py): auto = wherever steps are graphed; costs one more batch of inputs on the device
    cublas_workspace: str = "auto"  # auto | small | library: cuBLAS's workspace on CUDA (cache/runtime.py): auto =
    # small (4 MiB a stream, ~50 MiB off a full-size step's peak) unless CUBLAS_WORKSPACE_CONFIG or
    # CUBLASLT_WORKSPACE_SIZE is set or the source runs the backbones (end-to-end); library = cuBLAS's own
    init_from: str = ""  # a run folder (or its best.pt) whose matching parameters start this run
    init_keys: str = "*"  # with init_from: comma-separated name patterns (fnmatch) of the parameters taken,
    # e.g. head.grounding.* for the reference AVQA workflow's fusion layers only; * = every match of name and shape
    lcd: LCDConfig = field(default_factory=LCDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def fingerprint(self) -> str:
        """Hash of everything that changes the result (not where it is written or what reads it)."""
        d = self.to_dict()
        for k in EXECUTION_OPTIONS:
            section, _, key = k.rpartition(".")
            (d[section] if section else d).pop(key)
        for name, default in LATE_DEFAULTS.items():  # at their defaults, runs keep the fingerprints they had
            section, _, key = name.rpartition(".")
            where = d[section] if section else d
            if key in where and where[key] == default:
                where.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


# options added after runs were made (init_keys, head.han_losses, head.match_weight on 2026-11-28): left out of the
# fingerprint at their default, so that a rerun of an earlier config finds its finished run
LATE_DEFAULTS = {"init_keys": "*", "head.han_losses": False, "head.match_weight": 0.0}
# where and how a run executes, not what it computes (up to float rounding): outside the run
# fingerprint (a rerun that changes only these finds the finished run), and so no sweep axis
EXECUTION_OPTIONS = ("out", "workers", "device", "cache", "cuda_graphs", "overlap_copy", "cublas_workspace",
                     "lcd.chunk_mib", "lcd.matmul")
# string options with a fixed set of values
CHOICES = {"cuda_graphs": ("auto", "true", "false"), "overlap_copy": ("auto", "true", "false"),
           "cublas_workspace": CUBLAS_WORKSPACE_CHOICES,
           "lcd.matmul": ("auto", "tf32", "float32")}


def _convert(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        flag = parse_bool(value)
        if flag is not None:
            return flag
        raise ConfigError(f"{key}={value!r} is not a boolean. Fix: use true or false")
    if isinstance(default, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not an integer. Fix: write e.g. {key}={default}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number. Fix: write e.g. {key}={default}") from None
    if isinstance(default, str):
        if key not in CHOICES:
            return str(value)
        flag = parse_bool(value)  # YAML's booleans, --flag/--no-flag
        text = str(value).lower() if flag is None else "true" if flag else "false"
        if text not in CHOICES[key]:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(CHOICES[key])}. Fix: write e.g. {key}={default}")
        return text
    return value


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out.update({f"{f.name}.{g.name}": getattr(v, g.name) for g in fields(v)})
        elif isinstance(v, Mapping):
            out.update({f"{f.name}.{k}": x for k, x in v.items()})
        else:
            out[f.name] = v
    return out


def apply(cfg: TrainConfig, values: Mapping[str, Any], where: str) -> TrainConfig:
    """Return ``cfg`` with dotted ``values`` applied, each converted to its default's type."""
    flat = _flat(cfg)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in values.items():
        if key not in flat:
            raise ConfigError(f"{where}: unknown option {key!r}. Fix: use one of {', '.join(sorted(flat))}")
        converted = _convert(key, value, flat[key])
        section, _, name = key.partition(".")
        if name:
            sections.setdefault(section, {})[name] = converted
        else:
            top[key] = converted
    for section, changes in sections.items():
        current = getattr(cfg, section)
        top[section] = replace(current, **changes) if is_dataclass(current) else {**current, **changes}
    return replace(cfg, **top)


def _flatten_yaml(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten_yaml(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_sets(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not key=value. Fix: write e.g. --set lcd.meta_tokens=4")
        out[key.strip()] = value
    return out


def resolve_config(task: str, head_defaults: Mapping[str, Any], config_file: str | Path | None = None,
                   sets: Mapping[str, Any] | None = None, **top: Any) -> TrainConfig:
    """Typed defaults (with the task's head defaults) <- YAML ``config_file`` <- ``sets`` <- ``top``."""
    cfg = defaults = TrainConfig(task=task, head=dict(head_defaults))
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {path}: cannot read it ({e.__class__.__name__}). Fix: pass a YAML file") \
                from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"--config {path} is not a YAML mapping. Fix: write sections like 'lcd: {{dim: 128}}'")
        loaded = _flatten_yaml(loaded)
        if loaded.pop("task", task) != task:
            raise ConfigError(f"--config {path} is for another task. Fix: pass --task as in the file, or edit it")
        cfg = apply(cfg, loaded, f"--config {path}")
    if "task" in (sets or {}):
        raise ConfigError("--set task=... would keep the head defaults of --task. Fix: pass the task as --task")
    cfg = apply(cfg, dict(sets or {}), "--set")
    cfg = apply(cfg, {k: v for k, v in top.items() if v is not None}, "option")
    check_ranges(cfg, defaults)
    if cfg.init_keys != "*" and not cfg.init_from:
        raise ConfigError(f"init_keys={cfg.init_keys!r} chooses parameters of --init-from, which is not given. "
                          "Fix: pass --init-from RUN, or drop init_keys")
    return cfg


# the values each numeric option admits: (lowest, highest, whether the bounds themselves are allowed); a
# value outside would otherwise surface as a ZeroDivisionError, a torch message naming neither the option
# nor the fix, or a run that trains nothing (epochs 0, lr 0)
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "workers": (0, math.inf, True, False),
    "lcd.meta_tokens": (1, math.inf, True, False), "lcd.dim": (1, math.inf, True, False),
    "lcd.heads": (1, math.inf, True, False), "lcd.mlp_ratio": (0, math.inf, False, False),
    "optim.lr": (0, math.inf, False, False), "optim.weight_decay": (0, math.inf, True, False),
    "optim.epochs": (1, math.inf, True, False), "optim.batch_size": (1, math.inf, True, False),
    "optim.warmup_epochs": (0, math.inf, True, False),
    "optim.grad_clip": (0, math.inf, True, False),  # 0: no clipping
    "head.dropout": (0, 1, True, False), "head.hidden": (1, math.inf, True, False),
    "head.match_weight": (0, math.inf, True, False),
}


def check_ranges(cfg: TrainConfig, defaults: TrainConfig) -> None:
    """Refuse a numeric option outside :data:`RANGES`, naming it, its range and a valid value (its value in
    ``defaults``: the typed defaults with the task's head defaults)."""
    flat = _flat(cfg)
    for key, (low, high, low_ok, high_ok) in RANGES.items():
        if key not in flat:
            continue  # a head option this task's head does not have
        v = flat[key]
        if not math.isfinite(v) or (v < low or (v == low and not low_ok)) or (v > high or (v == high and not high_ok)):
            lo, hi = ("[" if low_ok else "(") + f"{low:g}", f"{high:g}" + ("]" if high_ok else ")")
            default = _flat(defaults)[key]
            raise ConfigError(f"{key}={v} is outside {lo}, {hi}. Fix: write e.g. {key}={default}")


def save_config(cfg: TrainConfig, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: Path) -> TrainConfig:
    return load_config_dict(yaml.safe_load(Path(path).read_text()))


def load_config_dict(d: Mapping[str, Any]) -> TrainConfig:
    """A config from its ``to_dict()`` form (saved runs, sweep tasks sent to workers)."""
    d = dict(d)
    task = d.pop("task")
    head = d.pop("head", {})
    return resolve_config(task, head, sets=_flatten_yaml(d))
