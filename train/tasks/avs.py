"""AVS (AVSBench S4 / MS3): LCD at the last stage, Meta-Token Injection, a multi-scale mask decoder.

* LCD runs on the last stage of both backbones only (``lcd.layers=auto``), giving K audio and K
  visual meta-tokens per frame.
* MTI (Meta-Token Injection): each of the 4 visual stage outputs (full resolution, from the cache)
  is projected to ``head.channels``; every feature-map token attends to the frame's 2K meta-tokens
  (cross-attention, cheap: only 2K keys), and the result is added back through a learnable
  per-stage gate (``head.gate_init``).
* Decoder: FPN-style top-down fusion of the 4 injected stages (upsample, add, 3x3 conv), a mask
  head at the finest stage grid, logits upsampled (bilinear) to the ground-truth size (224 x 224).
* Loss: binary cross-entropy on frames that have a mask (S4 training clips annotate frame 1 only;
  the cache marks the others 255), plus ``head.dice_weight`` x Dice (0 by default).
* Metrics (``metrics/avs.py``): mIoU with AVSBench's empty-mask convention and the per-frame
  F-score (beta^2 = 0.3, 255 thresholds), both in percent; best checkpoint on validation mIoU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mettle.cache import CacheError, CacheMeta
from mettle.manifests import Manifest

from ..metrics.avs import REFERENCE_BATCHES, best_per_frame, f_curves, fscore_batched, mask_iou
from . import register_task
from .base import Task

MASKS = "targets/masks"
MISSING = 255


def stage_keys(meta: CacheMeta) -> list[str]:
    """The visual stage outputs (last block of each stage) as cache keys, finest first."""
    blocks = meta.backbones["visual"].blocks
    ends = [b for i, b in enumerate(blocks) if i + 1 == len(blocks) or blocks[i + 1].stage != b.stage]
    return [f"visual/{b.name}" for b in ends]


class MTIHead(nn.Module):
    """``meta {audio, visual: (B, T, K, d)}`` + ``tokens {stage key: (B, T, N_s, D_s)}`` -> logits ``(B, T, H0, W0)``
    at the finest stage grid."""

    def __init__(self, stages: Sequence[tuple[str, int, tuple[int, int]]], meta_dim: int, channels: int = 128,
                 heads: int = 4, gate_init: float = 0.1) -> None:
        super().__init__()
        self.stages = [(k, tuple(g)) for k, _, g in stages]
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, channels)) for _, dim, _ in stages)
        self.meta_proj = nn.Sequential(nn.LayerNorm(meta_dim), nn.Linear(meta_dim, channels))
        self.norm = nn.ModuleList(nn.LayerNorm(channels) for _ in stages)
        self.inject = nn.ModuleList(nn.MultiheadAttention(channels, heads, batch_first=True) for _ in stages)
        self.gate = nn.Parameter(torch.full((len(stages),), float(gate_init)))
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in stages)
        self.mask = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, meta: Mapping[str, torch.Tensor], tokens: Mapping[str, torch.Tensor], **_: Any) -> torch.Tensor:
        audio, visual = meta["audio"], meta["visual"]
        b, t = visual.shape[:2]
        m = self.meta_proj(torch.cat([audio, visual], 2).flatten(0, 1))  # (BT, 2K, c)
        maps = []
        for s, (key, grid) in enumerate(self.stages):
            x = tokens[key].float().flatten(0, 1)  # (BT, N, D)
            x = self.proj[s](x)
            injected, _ = self.inject[s](self.norm[s](x), m, m, need_weights=False)
            x = x + self.gate[s] * injected
            maps.append(x.transpose(1, 2).reshape(b * t, -1, *grid))
        p = maps[-1]
        for s in range(len(maps) - 1, -1, -1):
            if s < len(maps) - 1:
                p = maps[s] + F.interpolate(p, size=maps[s].shape[-2:], mode="bilinear", align_corners=False)
            p = F.relu(self.smooth[s](p))
        return self.mask(p).view(b, t, *p.shape[-2:])


def upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, T, h, w)`` logits -> ``(B, T, size, size)`` (bilinear)."""
    b, t = logits.shape[:2]
    return F.interpolate(logits.flatten(0, 1)[:, None], size=(size, size), mode="bilinear",
                         align_corners=False).view(b, t, size, size)


def _split_positions(manifest: Manifest | None, items: Sequence[int]) -> np.ndarray:
    """Each item's position in its split's clip order (the test CSV's order, which the reference loaders batch),
    so that clips left out (failed extraction) do not shift the clips after them into other test batches;
    the items' own order when there is no manifest."""
    if manifest is None or not len(items):
        return np.arange(len(items))
    order = {row: i for i, row in enumerate(manifest.indices(manifest.clips[items[0]].splits[0]))}
    return np.array([order.get(row, i) for i, row in enumerate(items)])


class _AVSTask(Task):
    modalities = ("visual", "audio")
    head_defaults = {"channels": 128, "heads": 4, "gate_init": 0.1, "dice_weight": 0.0}
    select_metric = "miou"
    label_key = "masks"
    default_layers = "last-stage"
    target_keys = (MASKS,)

    def extra_keys(self, meta: CacheMeta) -> list[str]:
        if "masks" not in meta.targets:
            raise CacheError(f"task {self.name} needs ground-truth masks in the cache, and this one has none. "
                             "Fix: extract an AVSBench dataset (its masks are cached with the tokens)")
        return stage_keys(meta)

    def build_head(self, head: Mapping[str, Any], meta_dim: int, meta_tokens: int, manifest: Manifest,
                   meta: Any = None) -> nn.Module:
        self.dice_weight = float(head["dice_weight"])
        by_key = {a.key: a for a in meta.arrays}
        stages = [(k, by_key[k].dim, by_key[k].grid) for k in stage_keys(meta)]
        return MTIHead(stages, meta_dim, int(head["channels"]), int(head["heads"]), float(head["gate_init"]))

    def batch_targets(self, data: Mapping[str, Any]) -> torch.Tensor:
        return data["tokens"][MASKS]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # means over the frames that have a mask, as weights rather than by selecting them: no wait for
        # the GPU (a CUDA graph cannot hold one); no frame with a mask gives 0 with zero gradients
        logits = upsample(outputs, targets.shape[-1]).flatten(2)  # (B, T, pixels)
        valid = (targets != MISSING).flatten(2).all(-1)  # (B, T) frames with a mask
        y = torch.where(valid[..., None], targets.flatten(2), 0).float()
        weight = valid.float() / valid.sum().clamp(min=1)
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1) * weight).sum()
        w = float(getattr(self, "dice_weight", 0.0))
        if w:
            p = torch.sigmoid(logits)
            dice = 1 - (2 * (p * y).sum(-1) + 1) / (p.sum(-1) + y.sum(-1) + 1)
            loss = loss + w * (dice * weight).sum()
        return loss

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, manifest: Manifest,
                items: Sequence[int]) -> dict[str, float]:
        """mIoU and the F-score per frame, and the F-score as the reference test scripts batch it
        (:data:`REFERENCE_BATCHES`: ``items`` in split order, as their loaders read the test CSV)."""
        ious, curves, nonempty, clip = [], [], [], []
        for s in range(0, len(outputs), 8):  # upsample in chunks: full-size maps of a split do not fit
            probs = torch.sigmoid(upsample(outputs[s:s + 8], targets.shape[-1])).numpy()
            gts = targets[s:s + 8].numpy()
            valid = (gts != MISSING).reshape(*gts.shape[:2], -1).all(-1)  # (clips, frames): frames with a mask
            probs, gts = probs[valid], gts[valid]
            if len(gts):
                ious.append(mask_iou(probs, gts))
                c, v = f_curves(probs, gts)  # from the float32 probabilities, chunk by chunk
                curves.append(c)
                nonempty.append(v)
                clip.append(np.nonzero(valid)[0] + s)
        if not ious:
            return {}
        c, v, k = np.concatenate(curves), np.concatenate(nonempty), np.concatenate(clip)
        k = _split_positions(manifest, items)[k]  # a clip that failed extraction still takes its place in a batch
        out = {"miou": 100.0 * float(np.concatenate(ious).mean()), "fscore": 100.0 * best_per_frame(c, v)}
        out.update({name: 100.0 * fscore_batched(c, v, k // videos) for name, (videos, _) in REFERENCE_BATCHES.items()})
        return out

    def table(self, metrics: Mapping[str, float]) -> list[str]:
        # the F-scores comparable with published figures first; the per-frame one reads higher
        rows = ["| metric | value |", "| --- | --- |", f"| mIoU | {metrics['miou']:.2f} |"]
        for name, (videos, who) in REFERENCE_BATCHES.items():
            if name in metrics:  # runs saved before these were reported lack them
                rows.append(f"| F-score as {who} test it ({videos} video{'s' * (videos > 1)} a batch, beta^2 = 0.3) | "
                            f"{metrics[name]:.2f} |")
        return rows + [f"| F-score per frame (each frame's best threshold; not the published protocol) | "
                       f"{metrics['fscore']:.2f} |"]

    def save_examples(self, outputs: torch.Tensor, targets: torch.Tensor, manifest: Manifest, items: Sequence[int],
                      folder: Path) -> list[Path]:
        """One PNG per clip, a panel per frame: green = true only, red = predicted only, yellow = both."""
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        probs = torch.sigmoid(upsample(outputs, targets.shape[-1])).numpy()
        written = []
        for k, i in enumerate(items):
            panels = []
            for f in range(probs.shape[1]):
                pred, gt = probs[k, f] > 0.5, targets[k, f].numpy()
                img = np.full((*pred.shape, 3), 40, dtype=np.uint8)
                if (gt == MISSING).all():
                    img[:] = 90  # no ground truth for this frame: prediction in red
                    img[pred] = (220, 60, 60)
                else:
                    img[(gt == 1) & ~pred] = (60, 200, 60)
                    img[pred & (gt != 1)] = (220, 60, 60)
                    img[pred & (gt == 1)] = (240, 220, 60)
                panels.append(img)
                panels.append(np.full((pred.shape[0], 4, 3), 255, dtype=np.uint8))
            path = folder / f"{manifest.clips[i].clip_id}.png"
            Image.fromarray(np.concatenate(panels[:-1], 1)).save(path)
            written.append(path)
        return written


@register_task
class AVSS4Task(_AVSTask):
    name = "avs-s4"
    summary = "AVSBench S4 single-source segmentation: mIoU and F-score (trained on the annotated frames)"


@register_task
class AVSMS3Task(_AVSTask):
    name = "avs-ms3"
    summary = "AVSBench MS3 multi-source segmentation: mIoU and F-score"
