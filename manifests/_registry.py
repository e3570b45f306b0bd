"""Dataset registry: name -> manifest builder, with the options each builder accepts."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ManifestError
from .schema import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder and the keyword options the builder takes."""

    name: str
    builder: Callable[..., Manifest]
    summary: str

    def options(self) -> dict[str, Any]:
        """Option name -> default value (``inspect.Parameter.empty`` when required)."""
        return {p.name: p.default for p in inspect.signature(self.builder).parameters.values()}


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, summary: str) -> Callable[[Callable[..., Manifest]], Callable[..., Manifest]]:
    """Decorator registering a manifest builder under ``name`` (re-registering warns)."""

    def wrap(fn: Callable[..., Manifest]) -> Callable[..., Manifest]:
        if name in _DATASETS:
            log.warning("dataset %r registered twice; the later builder wins", name)
        _DATASETS[name] = DatasetSpec(name, fn, summary)
        return fn

    return wrap


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    try:
        return _DATASETS[name]
    except KeyError:
        raise ManifestError(f"unknown dataset {name!r}. Fix: use one of {', '.join(list_datasets())}") from None


def build_manifest(name: str, **options: Any) -> Manifest:
    """Build and validate the manifest of dataset ``name``.

    Unknown options and missing required options are refused with the list of valid ones.
    """
    spec = get_dataset(name)
    accepted = spec.options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ManifestError(
            f"dataset {name!r} has no option {', '.join(unknown)}. Fix: use only {', '.join(sorted(accepted)) or 'none'}"
        )
    missing = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in options]
    if missing:
        raise ManifestError(f"dataset {name!r} needs {', '.join(missing)}. Fix: pass "
                            f"{' '.join(f'--set {k}=...' for k in missing)} (mettle-extract takes data_root as "
                            "--data-root PATH)")
    return spec.builder(**options).validate()
