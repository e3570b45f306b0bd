"""What a task is: items, targets, a head, a loss, metrics. Tasks plug into one training loop.

An *item* is what a task predicts for: a clip for AVE / AVVP / AVS, a question for AVQA. Items map
to manifest rows (clips), which is what token sources serve.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mettle.cache import TokenSource
from mettle.manifests import Manifest


class Task:
    """Base class. Subclasses set ``name``, ``summary``, ``modalities``, ``head_defaults``,
    ``select_metric`` (validation metric that picks the best checkpoint, higher is better) and
    implement :meth:`build_head`, :meth:`targets`, :meth:`loss`, :meth:`metrics`, :meth:`table`."""

    name: str
    summary: str
    modalities: tuple[str, ...] = ("visual", "audio")
    head_defaults: Mapping[str, Any] = {}
    select_metric: str = ""
    label_key: str = ""  # the clip label the task needs (checked on the manifest)
    default_layers: str = "all"  # what lcd.layers=auto means for this task
    target_keys: tuple[str, ...] = ()  # targets read from the token source with the tokens (AVS masks)
    fraction_metrics: tuple[str, ...] = ()  # metrics that runs saved before 2026-11-28 hold as fractions

    def in_percent(self, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """``metrics`` (keys ``prefix + name``) of a run saved while this task still reported some of them
        as fractions, in percent as every task reports now (a sweep must not mix 0.90 with 90.0)."""
        return {k: 100.0 * v if k.startswith(prefix) and k[len(prefix):] in self.fraction_metrics else v
                for k, v in metrics.items()}

    def check(self, manifest: Manifest) -> None:
        """Refuse a manifest without the labels this task trains on."""
        from mettle.cache import CacheError

        if self.label_key and manifest.clips and self.label_key not in manifest.clips[0].labels:
            raise CacheError(f"task {self.name} needs clip labels {self.label_key!r}, which dataset "
                             f"{manifest.dataset} does not have. Fix: use a cache of a dataset made for {self.name}")

    def items(self, source: TokenSource, split: str) -> list[int]:
        return source.rows(split)

    def item_rows(self, manifest: Manifest, items: Sequence[int]) -> list[int]:
        return list(items)

    def extra_splits(self, source: TokenSource) -> list[str]:
        """Further test sets scored with the best weights (e.g. the other MUSIC-AVQA release)."""
        return []

    def build_head(self, head: Mapping[str, Any], meta_dim: int, meta_tokens: int, manifest: Manifest,
                   meta: Any = None) -> nn.Module:
        raise NotImplementedError

    def extra_keys(self, meta) -> list[str]:
        """Token arrays the head reads directly, besides the LCD layers (AVS: the visual stage maps)."""
        return []

    def batch_targets(self, data: Mapping[str, Any]) -> torch.Tensor | None:
        """Targets carried by a source batch (``target_keys``); None: targets come from the manifest."""
        return None

    def head_inputs(self, manifest: Manifest, items: Sequence[int]) -> dict[str, torch.Tensor]:
        """Extra per-item inputs of the head (e.g. question words); none by default."""
        return {}

    def targets(self, manifest: Manifest, items: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, manifest: Manifest,
                items: Sequence[int]) -> dict[str, float]:
        """Metrics over a whole split, from the concatenated outputs and targets."""
        raise NotImplementedError

    def table(self, metrics: Mapping[str, float]) -> list[str]:
        return [f"{k}: {v:.4f}" for k, v in metrics.items()]
