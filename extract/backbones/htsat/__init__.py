"""HTS-AT audio backbone: our implementation of the official AudioSet model, with block taps."""

from __future__ import annotations

import numpy as np
import torch

from ..base import RANDOM_INIT, Backbone, BackboneError, BlockInfo
from .model import HTSAT, HTSATConfig, load_official_checkpoint

SEGMENT_SAMPLES = 32000
TILE = 10  # each 1-s segment is repeated to 10 s, as the reference loaders do (5 s for AVSBench)
MAX_TILE = 10  # HTS-AT's input window is 10.24 s


def check_tile(tile, what: str = "--audio-tile") -> int:
    """``tile`` if HTS-AT can take it (an int, 1 to 10 seconds), else a BackboneError naming ``what``."""
    if not isinstance(tile, int) or isinstance(tile, bool) or not 1 <= tile <= MAX_TILE:
        raise BackboneError(f"{what} {tile!r}: HTS-AT takes 1 to {MAX_TILE} seconds. Fix: pass e.g. --audio-tile 10 "
                            "(AVE, LLP, MUSIC-AVQA) or 5 (AVSBench)")
    return tile


class HTSATBackbone(Backbone):
    """Frozen HTS-AT. Input batch: (B, 32000) 1-s segments at 32 kHz, each tiled to ``tile`` seconds
    (10; the AVS reference uses 5) on the model's device (tiling there moves a tenth of the bytes to
    the GPU and keeps queued inputs small). ``tile`` is part of the preprocessing the cache records."""

    tile = TILE

    modality = "audio"

    def __init__(self, name: str, cfg: HTSATConfig = HTSATConfig()) -> None:
        super().__init__()
        self.name = name
        self.model = HTSAT(cfg)
        self.blocks = []
        k = 0
        for s, depth in enumerate(cfg.depths):
            for b in range(depth):
                grid = self.model.block_grids[k]
                self.blocks.append(BlockInfo(f"stage{s}.block{b}", grid[0] * grid[1], self.model.block_dims[k], grid))
                k += 1
        self.stage_ends = [int(i) for i in np.cumsum(cfg.depths) - 1]
        self.weights_id = RANDOM_INIT
        self.freeze()

    def preprocess_spec(self) -> dict:
        from . import frontend as fe

        return {"input": "1-s mono segments at 32 kHz", "tile": self.tile, "sample_rate": fe.SAMPLE_RATE,
                "n_fft": fe.N_FFT, "hop": fe.HOP, "mel_bins": fe.MEL_BINS, "fmin": fe.FMIN, "fmax": fe.FMAX,
                "frames": fe.TARGET_FRAMES, "image": "4 time chunks of 256 stacked along frequency, 256 x 256"}

    def set_preprocess(self, spec: dict) -> None:
        """``tile``: the seconds each 1-s segment is repeated to (1 to 10)."""
        self.tile = check_tile(spec.get("tile", self.tile), f"{self.name}: audio tile")

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """(T, 32000) float32 segments, checked (the model tiles each second to ten)."""
        wave = torch.as_tensor(np.asarray(media, dtype=np.float32))
        if wave.ndim != 2 or wave.shape[1] != SEGMENT_SAMPLES:
            raise ValueError(f"expected (segments, {SEGMENT_SAMPLES}) audio at 32 kHz, got {tuple(wave.shape)}")
        return wave.contiguous()

    def _run(self, x: torch.Tensor, take: list[int], stop: int) -> list[torch.Tensor]:
        if x.shape[-1] == SEGMENT_SAMPLES:
            x = x.repeat(1, self.tile)
        out, _ = self.model.run_blocks(x, set(take), stop)
        return out


__all__ = ["HTSAT", "HTSATBackbone", "HTSATConfig", "load_official_checkpoint"]
