"""AVE: supervised audio-visual event localisation, one class per second (events + background).

Head: per segment, the audio and visual meta-tokens are averaged over K, fused with their product
(``[a, v, a*v]`` -> hidden), modelled over the 10 seconds by a small bidirectional GRU (residual),
and classified. Loss: cross-entropy over every second. Metric: accuracy over all (clip, second)
pairs (the AVE protocol), best checkpoint chosen on the validation split.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mettle.manifests import Manifest

from ..metrics import segment_accuracy
from . import register_task
from .base import Task


class AVEHead(nn.Module):
    """``{visual, audio: (B, T, K, d)}`` -> logits ``(B, T, classes)``."""

    def __init__(self, meta_dim: int, classes: int, hidden: int = 256, temporal: str = "gru",
                 dropout: float = 0.1) -> None:
        super().__init__()
        if temporal not in ("gru", "none"):
            raise ValueError(f"head.temporal={temporal!r} is unknown. Fix: use gru or none")
        self.fuse = nn.Sequential(nn.LayerNorm(3 * meta_dim), nn.Linear(3 * meta_dim, hidden), nn.GELU(),
                                  nn.Dropout(dropout))
        self.temporal = nn.GRU(hidden, hidden // 2, batch_first=True, bidirectional=True) \
            if temporal == "gru" else None
        self.out = nn.Sequential(nn.LayerNorm(2 * (hidden // 2) if self.temporal else hidden), nn.Dropout(dropout),
                                 nn.Linear(2 * (hidden // 2) if self.temporal else hidden, classes))

    def forward(self, meta: Mapping[str, torch.Tensor], **_: Any) -> torch.Tensor:
        a, v = meta["audio"].mean(2), meta["visual"].mean(2)
        x = self.fuse(torch.cat([a, v, a * v], -1))
        if self.temporal is not None:
            y, _ = self.temporal(x)
            x = y + x[..., :y.shape[-1]]
        return self.out(x)


@register_task
class AVETask(Task):
    name = "ave"
    summary = "AVE event localisation: per-second class (events + background), accuracy over all seconds"
    modalities = ("visual", "audio")
    head_defaults = {"hidden": 256, "temporal": "gru", "dropout": 0.1}
    select_metric = "accuracy"
    fraction_metrics = ("accuracy",)  # in percent since 2026-11-28
    label_key = "segment_labels"

    def build_head(self, head: Mapping[str, Any], meta_dim: int, meta_tokens: int, manifest: Manifest,
                   meta: Any = None) -> nn.Module:
        return AVEHead(meta_dim, len(manifest.vocabularies["event"]), int(head["hidden"]), str(head["temporal"]),
                       float(head["dropout"]))

    def targets(self, manifest: Manifest, items: Sequence[int]) -> torch.Tensor:
        return torch.tensor([manifest.clips[i].labels["segment_labels"] for i in items], dtype=torch.long)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten())

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, manifest: Manifest,
                items: Sequence[int]) -> dict[str, float]:
        return {"accuracy": 100.0 * segment_accuracy(outputs.argmax(-1), targets)}  # percent, as every task reports

    def table(self, metrics: Mapping[str, float]) -> list[str]:
        return ["| metric | value |", "| --- | --- |", f"| AVE accuracy (all seconds) | {metrics['accuracy']:.2f} |"]
