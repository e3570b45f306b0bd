"""The one tap API every backbone exposes, and weight fingerprints."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from timm.models._features import feature_take_indices
from torch import nn

from .kept_casts import keep_casts

RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class BlockInfo:
    """One tapped block: name (``stage{s}.block{b}``), token count, width and (height, width) grid."""

    name: str
    tokens: int
    dim: int
    grid: tuple[int, int]


class Backbone(nn.Module):
    """A frozen backbone with per-block token taps.

    Subclasses set ``name``, ``modality`` (``visual`` | ``audio``), ``blocks`` (list[BlockInfo]),
    ``stage_ends`` (index of each stage's last block) and ``weights_id`` (sha256 of the weights file,
    or ``random-init``), and implement :meth:`preprocess` and :meth:`_run`.
    Always in eval mode, never requires grad.
    """

    name: str
    modality: str
    blocks: list[BlockInfo]
    stage_ends: list[int]
    weights_id: str = RANDOM_INIT

    def freeze(self) -> "Backbone":
        """Eval mode, no gradients, and linear/convolution weights cast once per autocast dtype
        (``kept_casts.py``: autocast would cast a frozen weight again in every forward)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        keep_casts(self)
        return self

    def train(self, mode: bool = True) -> "Backbone":  # frozen: BatchNorm statistics never move
        return super().train(False)

    def preprocess_spec(self) -> dict:
        """How :meth:`preprocess` turns media into model input, recorded in every cache."""
        raise NotImplementedError

    def record(self):
        """This backbone as a cache remembers it (:class:`mettle.cache.BackboneRecord`)."""
        from mettle.cache import BackboneRecord, BlockLayout

        stage_of = {}
        start = 0
        for s, end in enumerate(self.stage_ends):
            for i in range(start, end + 1):
                stage_of[i] = s
            start = end + 1
        blocks = tuple(BlockLayout(i, b.name, b.tokens, b.dim, tuple(b.grid), stage_of[i])
                       for i, b in enumerate(self.blocks))
        return BackboneRecord(self.name, self.modality, self.weights_id, self.preprocess_spec(), blocks)

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """Turn one clip's decoded media (ClipMedia.frames or .audio) into a model batch of T segments."""
        raise NotImplementedError

    def set_preprocess(self, spec: dict) -> None:
        """Adopt the adjustable options of a preprocessing spec (as :meth:`preprocess_spec` records it):
        a dataset's protocol when extracting, a cache's record when predicting on new media. The
        rest of a spec is fixed by the backbone; by default nothing is adjustable."""

    def _run(self, x: torch.Tensor, take: list[int], stop: int) -> list[torch.Tensor]:
        """Outputs (B, N, D) of blocks ``take`` (sorted), computing no block past ``stop``."""
        raise NotImplementedError

    @torch.no_grad()
    def forward_tokens(self, x: torch.Tensor, indices: int | list[int] | None = None) -> list[torch.Tensor]:
        """Token outputs of the selected blocks, each (B, tokens, dim), in block order.

        ``indices`` as timm's ``forward_intermediates``: None = all blocks, int n = the last n,
        a list = those blocks (negative counts from the end).
        """
        take, stop = feature_take_indices(len(self.blocks), indices)
        order = sorted(set(take))
        outs = dict(zip(order, self._run(x, order, stop)))
        return [outs[i] for i in take]

    @torch.no_grad()
    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each stage's last block as a (B, C, H, W) feature map."""
        maps = []
        for i, t in zip(self.stage_ends, self.forward_tokens(x, self.stage_ends)):
            h, w = self.blocks[i].grid
            maps.append(t.transpose(1, 2).reshape(t.shape[0], -1, h, w))
        return maps




class BackboneError(ValueError):
    """A backbone request cannot be met (unknown name, unusable weights); the message says the fix."""


def state_sha256(module: nn.Module) -> str:
    """Content hash of a module's weights: sha256 over (name, dtype, shape, bytes) in sorted name order.

    Independent of the file format the weights came from (safetensors, torch, hub cache), so a cache
    records which weights produced it however they were supplied.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
