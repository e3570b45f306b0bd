"""AVVP on LLP: weakly supervised audio-visual video parsing (25 classes, video labels only).

Head: per second, each modality's meta-tokens are averaged over K, tagged with a modality
embedding, and the 2T tokens (audio and visual seconds) pass through a small transformer layer so
each second sees both modalities and its neighbours. Per token a linear layer gives class
probabilities (sigmoid). Attentive multiple-instance pooling then makes the video prediction: per
class, a softmax over time weights the seconds of each modality and a softmax over the two
modalities weights audio against visual (the HAN recipe), and the weighted frame probabilities sum
to the video probability. Loss: binary cross-entropy on video labels (``head.label_smoothing``
optional, toward 0.5). ``head.han_losses=true`` adds the HAN's two modality losses (AVVP-ECCV20's
``main_avvp.py``, DG-SCT's AVVP): BCE of each modality's time-pooled probability against the video
labels, the visual one smoothed to ``0.9 y + 0.05``; off by default (mettle's recipe supervises the
modalities through their attention-weighted sum), on in ``scripts/run_original.py``. Evaluation:
the LLP protocol (``metrics/avvp.py``), checkpoint chosen on validation
segment-level Type@AV, as the reference code does.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mettle.manifests import Manifest

from ..metrics.avvp import avvp_scores, avvp_table, avvp_video_scores, parse_predictions
from . import register_task
from .base import Task


class AVVPHead(nn.Module):
    """``{audio, visual: (B, T, K, d)}`` -> ``{"video": (B, C), "frame": (B, T, 2, C), "modality": (B, 2, C)}``
    probabilities (modality order audio, visual; ``modality``: each one's time-pooled probability)."""

    def __init__(self, meta_dim: int, classes: int, hidden: int = 256, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(meta_dim), nn.Linear(meta_dim, hidden))
        self.modality = nn.Parameter(torch.zeros(2, hidden))
        self.mix = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.frame = nn.Linear(hidden, classes)
        self.time_att = nn.Linear(hidden, classes)
        self.modality_att = nn.Linear(hidden, classes)

    def forward(self, meta: Mapping[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        a, v = meta["audio"].mean(2), meta["visual"].mean(2)
        b, t = a.shape[:2]
        x = self.inp(torch.cat([a, v], 1)) + self.modality.repeat_interleave(t, 0)  # (B, 2T, h)
        x = self.mix(x).view(b, 2, t, -1).transpose(1, 2)  # (B, T, 2, h)
        frame = torch.sigmoid(self.frame(x))
        time_w = torch.softmax(self.time_att(x), dim=1)
        mod_w = torch.softmax(self.modality_att(x), dim=2)
        video = (frame * time_w * mod_w).sum(dim=(1, 2)).clamp(1e-6, 1 - 1e-6)
        modality = (frame * time_w).sum(dim=1).clamp(1e-6, 1 - 1e-6)  # (B, 2, C): the HAN's a_prob, v_prob
        return {"video": video, "frame": frame, "modality": modality}


def _ground_truth(events: Sequence[Sequence[int]], classes: int, seconds: int) -> np.ndarray:
    gt = np.zeros((classes, seconds), dtype=np.int64)
    for cls, on, off in events:
        gt[cls, on:off] = 1
    return gt


@register_task
class AVVPTask(Task):
    name = "avvp"
    summary = "AVVP on LLP: weakly supervised parsing, segment/event-level F-scores (LLP protocol)"
    modalities = ("visual", "audio")
    head_defaults = {"hidden": 256, "heads": 4, "dropout": 0.1, "label_smoothing": 0.0, "han_losses": False}
    VISUAL_TARGET = 0.9  # the HAN's visual smoothing: targets 0.9 y + 0.05
    select_metric = "seg_type"
    label_key = "video_labels"

    def build_head(self, head: Mapping[str, Any], meta_dim: int, meta_tokens: int, manifest: Manifest,
                   meta: Any = None) -> nn.Module:
        self.smoothing = float(head["label_smoothing"])
        self.han_losses = bool(head.get("han_losses", False))  # configs saved before 2026-11-28 lack it
        return AVVPHead(meta_dim, len(manifest.vocabularies["event"]), int(head["hidden"]), int(head["heads"]),
                        float(head["dropout"]))

    def targets(self, manifest: Manifest, items: Sequence[int]) -> torch.Tensor:
        classes = len(manifest.vocabularies["event"])
        out = torch.zeros(len(items), classes)
        for k, i in enumerate(items):
            out[k, manifest.clips[i].labels["video_labels"]] = 1.0
        return out

    def loss(self, outputs: Mapping[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        # set by build_head on this instance (no default here: a fresh task's defaults trained silently once)
        loss = F.binary_cross_entropy(outputs["video"], targets * (1 - self.smoothing) + 0.5 * self.smoothing)
        if self.han_losses:
            v = self.VISUAL_TARGET
            loss = loss + F.binary_cross_entropy(outputs["modality"][:, 0], targets) \
                + F.binary_cross_entropy(outputs["modality"][:, 1], targets * v + (1 - v) / 2)
        return loss

    def metrics(self, outputs: Mapping[str, torch.Tensor], targets: torch.Tensor, manifest: Manifest,
                items: Sequence[int]) -> dict[str, float]:
        video, frame = outputs["video"].numpy(), outputs["frame"].numpy()
        classes, seconds = video.shape[1], frame.shape[1]
        per_video = []
        for k, i in enumerate(items):
            labels = manifest.clips[i].labels
            if "audio_events" not in labels:
                continue  # training clips have no segment-level annotation
            pa, pv = parse_predictions(video[k], frame[k, :, 0], frame[k, :, 1])
            per_video.append(avvp_video_scores(pa, pv, _ground_truth(labels["audio_events"], classes, seconds),
                                               _ground_truth(labels["visual_events"], classes, seconds)))
        return avvp_scores(per_video) if per_video else {}

    def table(self, metrics: Mapping[str, float]) -> list[str]:
        return avvp_table(metrics)
