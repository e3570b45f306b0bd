"""The trained part of Mettle: one LCD per modality and the task head (the backbones are elsewhere)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mettle.cache import CacheMeta
from mettle.manifests import Manifest

from .config import TrainConfig
from .lcd import LCD, select_layers
from .tasks import Task


class MettleModel(nn.Module):
    """``forward(tokens, **head_inputs)``: tokens ``{key: (B, T, N, D)}`` (for :attr:`code_keys`, int8 codes
    with ``key + SCALE`` scales may stand in) -> the task head's outputs."""

    def __init__(self, meta: CacheMeta, manifest: Manifest, cfg: TrainConfig, task: Task) -> None:
        super().__init__()
        self.task = task  # the instance whose build_head read cfg.head (its loss reads what that set)
        layers = task.default_layers if cfg.lcd.layers == "auto" else cfg.lcd.layers
        self.lcds = nn.ModuleDict({m: LCD(select_layers(meta, m, layers), cfg.lcd) for m in task.modalities})
        self.direct = task.extra_keys(meta)
        self.head = task.build_head(cfg.head, cfg.lcd.dim, cfg.lcd.meta_tokens, manifest, meta=meta)

    @property
    def keys(self) -> list[str]:
        """The token arrays this model reads (LCD layers, then arrays the head reads directly)."""
        keys = [k for lcd in self.lcds.values() for k in lcd.keys]
        return keys + [k for k in self.direct if k not in keys]

    @property
    def code_keys(self) -> list[str]:
        """The arrays only the LCDs read: an int8 cache may hand them as codes + scales (TokenSource)."""
        return [k for lcd in self.lcds.values() for k in lcd.keys if k not in self.direct]

    def forward(self, tokens: Mapping[str, torch.Tensor], **head_inputs: Any) -> torch.Tensor:
        if self.direct:
            head_inputs["tokens"] = tokens
        return self.head({m: lcd(tokens) for m, lcd in self.lcds.items()}, **head_inputs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
