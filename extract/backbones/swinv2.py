"""Swin-V2 visual backbone through timm, with per-block token taps.

timm's ``forward_intermediates`` taps stages only; we run timm's own modules block by block
(``patch_embed`` -> per stage ``downsample`` then ``blocks`` -> ``norm``), which is exactly
``forward_features`` with the block outputs kept (a test checks the equality).
Input: frames resized to 192 x 192 (bicubic, no antialias, as the reference loaders' tensor resize)
and ImageNet-normalised.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Backbone, BlockInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SwinV2Backbone(Backbone):
    """Frozen timm Swin-V2. Input batch: (B, 3, S, S) normalised images (S = 192 for the large model)."""

    modality = "visual"

    def __init__(self, name: str, model: torch.nn.Module) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.image_size = int(model.patch_embed.img_size[0])
        self.blocks, self.stage_ends = [], []
        with torch.no_grad():
            probe = self.model.patch_embed(torch.zeros(1, 3, self.image_size, self.image_size))
            for s, stage in enumerate(self.model.layers):
                probe = stage.downsample(probe)
                h, w, c = probe.shape[1:]
                for b in range(len(stage.blocks)):
                    self.blocks.append(BlockInfo(f"stage{s}.block{b}", h * w, c, (h, w)))
                self.stage_ends.append(len(self.blocks) - 1)
        self.freeze()
        from .swinv2_attention import freeze_window_attention  # imports timm's class: only where a model exists

        # weight-only terms of every block's attention computed once (swinv2_attention.py): bitwise timm's output
        self.frozen_attention = freeze_window_attention(self.model)

    def preprocess_spec(self) -> dict:
        return {"input": "one RGB frame per segment, uint8", "resize": [self.image_size, self.image_size],
                "interpolation": "bicubic, align_corners=False, no antialias", "scale": "1/255",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB frames -> (T, 3, S, S) float32, bicubic-resized and normalised."""
        frames = np.asarray(media)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected (segments, H, W, 3) uint8 frames, got {frames.dtype} {frames.shape}")
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=False)
        # plain CPU constants, not buffers: preprocessing runs on the CPU (decode threads) wherever the model is
        return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def _run(self, x: torch.Tensor, take: list[int], stop: int) -> list[torch.Tensor]:
        x = self.model.patch_embed(x)
        wanted, out, k = set(take), [], 0
        for stage in self.model.layers:
            x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x)
                if k in wanted:
                    out.append(x.flatten(1, 2))  # NHWC -> (B, H*W, C), row-major
                if k == stop:
                    return out
                k += 1
        return out

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """timm's final LayerNorm applied to the last block's tokens (= ``forward_features``)."""
        return self.model.norm(tokens)


class SwinV2SpectrogramBackbone(SwinV2Backbone):
    """The modality-shared setting: audio segments as Kaldi fbank images through the visual Swin-V2.

    Input batch: (B, 3, 192, 192) fbank images (see ``fbank.py``); taps as the visual backbone's.
    """

    modality = "audio"

    def preprocess_spec(self) -> dict:
        from . import fbank

        return {"input": "1-s mono segments at 32 kHz, resampled to 16 kHz", "features": "Kaldi fbank",
                "frame": fbank.FRAME, "shift": fbank.SHIFT, "nfft": fbank.NFFT, "mel_bins": fbank.MEL_BINS,
                "low_hz": fbank.LOW_HZ, "preemphasis": fbank.PREEMPH, "frames": fbank.TARGET_FRAMES,
                "norm": [fbank.NORM_MEAN, fbank.NORM_STD], "pad": "zeros after normalising", "channels": 3}

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """(T, 32000) float32 1-s segments at 32 kHz -> (T, 3, 192, 192) normalised fbank images."""
        from .fbank import TARGET_FRAMES, spectrogram_images

        audio = np.asarray(media, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] != 32000:
            raise ValueError(f"expected (segments, 32000) audio at 32 kHz, got {audio.shape}")
        if self.image_size != TARGET_FRAMES:
            raise ValueError(f"{self.name}: the fbank image is {TARGET_FRAMES} px, the model expects {self.image_size}")
        return spectrogram_images(audio)
