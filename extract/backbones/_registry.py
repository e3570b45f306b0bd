"""Backbone registry: identity-carrying names -> factories, and the weights policy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .base import RANDOM_INIT, Backbone, BackboneError, state_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone. ``factory(weights, random_init)`` returns it with weights loaded."""

    name: str
    modality: str
    summary: str
    factory: Callable[[Path | None, bool], Backbone]


_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, modality: str, summary: str):
    """Decorator registering a factory under ``name`` (re-registering warns)."""

    def wrap(factory):
        if name in _BACKBONES:
            log.warning("backbone %r registered twice; the later factory wins", name)
        _BACKBONES[name] = BackboneSpec(name, modality, summary, factory)
        return factory

    return wrap


def list_backbones(modality: str | None = None) -> list[str]:
    return sorted(n for n, s in _BACKBONES.items() if modality in (None, s.modality))


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}. Fix: use one of {', '.join(list_backbones())}") from None


def create_backbone(name: str, weights: str | Path | None = None, random_init: bool = False) -> Backbone:
    """Build a frozen backbone.

    Args:
        name: registered name, e.g. ``swinv2_large_window12_192.ms_in22k``, ``htsat.audioset``.
        weights: a local weights file (safetensors or torch; the official checkpoint for HTS-AT).
        random_init: explicitly ask for random weights (cost measurements, tests).

    The backbone's ``weights_id`` is the content hash of the loaded weights (``random-init`` otherwise),
    so every cache records which weights produced it.
    """
    spec = get_backbone_spec(name)
    if weights is not None and random_init:
        raise BackboneError("both a weights file and random init were asked for. Fix: pass only one")
    path = Path(weights) if weights is not None else None
    if path is not None and not path.is_file():
        raise BackboneError(f"weights file {path} does not exist. Fix: pass the path of a local weights file")
    torch.manual_seed(0)  # random-init presets are the same in every process
    backbone = spec.factory(path, random_init)
    backbone.weights_id = RANDOM_INIT if random_init or backbone.weights_id == RANDOM_INIT else state_sha256(backbone)
    return backbone.freeze()
