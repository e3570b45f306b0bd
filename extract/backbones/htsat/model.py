"""HTS-AT (Chen et al., ICASSP 2022), our implementation, loadable from the official AudioSet checkpoint.

Data contract: input waveforms (B, samples) float32 at 32 kHz, at most 10.24 s (each 1-s segment is
tiled to 10 s before it gets here, as the reference protocol does). Block taps are (B, tokens, dim)
with token grids 64x64x96, 32x32x192, 16x16x384, 8x8x768 in the AudioSet configuration (2+2+6+2 = 12
blocks); stage outputs are the last block of each stage as (B, C, H, W) maps.

State-dict names follow the official ``HTSAT_Swin_Transformer`` after its ``sed_model.`` prefix, so
``load_official_checkpoint`` is a strict load, except for the front-end tensors, which are checked
against our definition (see ``frontend.py``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mettle.manifests.errors import first_line

from .frontend import MEL_BINS, LogMel, expected_frontend_tensors, fold_to_image
from .swin import PatchEmbed, SwinStage

IMAGE = 256
PATCH = 4
CKPT_PREFIX = "sed_model."


@dataclass(frozen=True)
class HTSATConfig:
    """Architecture hyper-parameters (the defaults are the official AudioSet model, 31.3 M parameters)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (4, 8, 16, 32)
    window: int = 8
    num_classes: int = 527


class HTSAT(nn.Module):
    """Frozen HTS-AT audio backbone with per-block token taps."""

    def __init__(self, cfg: HTSATConfig = HTSATConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.logmel = LogMel()
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        self.patch_embed = PatchEmbed(PATCH, 1, cfg.embed_dim)
        grid = IMAGE // PATCH
        self.layers = nn.ModuleList()
        self.block_dims: list[int] = []
        self.block_grids: list[tuple[int, int]] = []
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.heads)):
            dim = cfg.embed_dim * 2 ** i
            last = i == len(cfg.depths) - 1
            self.layers.append(SwinStage(dim, grid, depth, heads, cfg.window, merge=not last))
            self.block_dims += [dim] * depth
            self.block_grids += [(grid, grid)] * depth
            if not last:
                grid //= 2
        final = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.norm = nn.LayerNorm(final)
        # AudioSet head of the official model (token-semantic CAM); `head` exists there but its forward
        # never uses it: both are kept so that the checkpoint loads strictly.
        self.tscam_conv = nn.Conv2d(final, cfg.num_classes, kernel_size=(2, 3), padding=(0, 1))
        self.head = nn.Linear(cfg.num_classes, cfg.num_classes)
        self.eval()

    @property
    def num_blocks(self) -> int:
        return len(self.block_dims)

    def spectrogram_image(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, 1, 256, 256) normalised log-mel image."""
        x = self.logmel(wave)  # (B, T, 64)
        x = self.bn0(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return fold_to_image(x)

    def run_blocks(self, wave: torch.Tensor, take: set[int], stop: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run blocks 0..stop; return the outputs of the blocks in ``take`` and the last hidden state."""
        x = self.patch_embed(self.spectrogram_image(wave))
        out, k = [], 0
        for stage in self.layers:
            for block in stage.blocks:
                x = block(x)
                if k in take:
                    out.append(x)
                if k == stop:
                    return out, x
                k += 1
            if stage.downsample is not None:
                x = stage.downsample(x)
        return out, x

    def forward_features(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, 64, 768): the final tokens after ``norm``."""
        _, x = self.run_blocks(wave, set(), self.num_blocks - 1)
        return self.norm(x)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """AudioSet clip-wise probabilities (B, 527), as the official model computes them."""
        x = self.forward_features(wave)
        b, n, c = x.shape
        g = int(n ** 0.5)
        fmap = x.transpose(1, 2).reshape(b, c, g, g)  # rows: (time chunk, frequency) as in the image
        chunks = self.spectrogram_chunks()
        rows = g // chunks  # frequency rows per chunk
        # unfold the time chunks back along time: (B, C, rows, chunks * g)
        fmap = fmap.reshape(b, c, chunks, rows, g).permute(0, 1, 3, 2, 4).reshape(b, c, rows, chunks * g)
        logits = self.tscam_conv(fmap).flatten(2)  # (B, classes, time)
        return torch.sigmoid(logits.mean(-1))

    @staticmethod
    def spectrogram_chunks() -> int:
        return IMAGE // MEL_BINS


def load_official_checkpoint(model: HTSAT, path: str | Path) -> dict[str, str]:
    """Load ``HTSAT_AudioSet_Saved_1.ckpt`` (or any checkpoint in its layout) strictly.

    Accepts a Lightning checkpoint (``{"state_dict": {"sed_model.<key>": tensor}}``) or a bare
    state dict with or without the prefix. Read with ``weights_only=True``. The three front-end
    tensors must equal our definition; every other key must match a parameter or buffer of ours
    and vice versa. Returns a short report. Raises ValueError naming the offending keys.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad or non-tensor file
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):  # a pickled object; torch's text
            # advises weights_only=False: not ours to take (other unpickling errors: damaged or no checkpoint)
            why, hint = "it holds pickled objects besides tensors, which mettle does not load", \
                " (if it is the official file, please report it)"
        elif isinstance(e, pickle.UnpicklingError):  # torch's text (weights_only advice) would mislead here too
            why, hint = "damaged, or not a checkpoint at all (a failed download's page?)", ""
        else:
            why, hint = f"{e.__class__.__name__}: {first_line(e)[:200]}", ""
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({why}). Fix: pass the official "
                         "HTSAT_AudioSet_Saved_1.ckpt or a state dict saved with torch.save" + hint) from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no state dict inside. Fix: pass the official HTS-AT checkpoint")
    state = {k[len(CKPT_PREFIX):] if k.startswith(CKPT_PREFIX) else k: v for k, v in state.items()}

    front = {}
    for key, ours in expected_frontend_tensors().items():
        theirs = state.pop(key, None)
        if theirs is None:
            raise ValueError(f"{path}: front-end tensor {key} is missing. Fix: pass the official HTS-AT checkpoint")
        if theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours, atol=1e-4, rtol=1e-4):
            raise ValueError(f"{path}: {key} differs from the HTS-AT front end (32 kHz, n_fft 1024, 64 mel "
                             "50-14000 Hz). Fix: this checkpoint was trained with another front end; use the "
                             "AudioSet checkpoint")
        front[key] = theirs.float()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{path}: does not match the HTS-AT architecture ({'; '.join(parts)}). "
                         "Fix: pass the official HTS-AT AudioSet checkpoint, or the matching --audio-backbone preset")
    model.load_state_dict(state, strict=True)
    # the mel matrix the reference code multiplies by is the checkpoint's own (torchlibrosa stores it): use it, so
    # that a librosa version's rounding of the filterbank cannot shift the tokens (the STFT kernels are the
    # periodic Hann window times the DFT, which torch.stft computes from the same definition); copied in only
    # once the whole checkpoint has loaded, so a refused one leaves the model as it was
    model.logmel.mel.copy_(front["logmel_extractor.melW"])
    return {"keys": str(len(state) + 3), "frontend": "checked"}
