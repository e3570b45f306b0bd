"""HTS-AT's audio front end: waveform -> log-mel -> BatchNorm -> 256 x 256 spectrogram image.

Written from the published definition (Chen et al., ICASSP 2022, AudioSet configuration):
32 kHz mono, STFT with a 1024-point periodic Hann window and hop 320, centred with reflect
padding, power spectrum, 64 Slaney mel bands over 50-14000 Hz, ``10 * log10(max(mel, 1e-10))``
(ref 1.0, no top_db), BatchNorm over the mel bins, then time stretched to 1024 frames (bicubic,
``align_corners``) when shorter and folded into a square image: the 1024 frames are cut into 4
chunks of 256 that are stacked along frequency (rows = chunk-major (chunk, mel bin), columns =
time within the chunk).

The official checkpoint stores its STFT as convolution kernels (``conv_real``/``conv_imag``,
window-weighted DFT rows) and its mel matrix; we compute the same transform with ``torch.stft``
and ``librosa.filters.mel``, and :func:`expected_frontend_tensors` rebuilds the stored tensors so
that loading can check them instead of trusting them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 32000
N_FFT = 1024
HOP = 320
MEL_BINS = 64
FMIN, FMAX = 50.0, 14000.0
AMIN = 1e-10
TARGET_FRAMES = 1024
FREQ_RATIO = 4  # 256-pixel image / 64 mel bins


def mel_matrix() -> np.ndarray:
    """(513, 64) float32 Slaney-normalised mel filterbank, frequency x mel (librosa's default)."""
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=MEL_BINS, fmin=FMIN, fmax=FMAX).T.astype(np.float32)


def expected_frontend_tensors() -> dict[str, torch.Tensor]:
    """The checkpoint's front-end tensors as our definition produces them.

    ``conv_real``/``conv_imag``: (513, 1, 1024), row k = periodic Hann window times cos / -sin of
    the k-th DFT frequency; ``melW``: (513, 64).
    """
    n = np.arange(N_FFT)
    k = np.arange(N_FFT // 2 + 1)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * math.pi * n / N_FFT)
    angle = 2 * math.pi * k * n / N_FFT
    return {
        "spectrogram_extractor.stft.conv_real.weight": torch.from_numpy((np.cos(angle) * window)[:, None, :]).float(),
        "spectrogram_extractor.stft.conv_imag.weight": torch.from_numpy((-np.sin(angle) * window)[:, None, :]).float(),
        "logmel_extractor.melW": torch.from_numpy(mel_matrix()),
    }


class LogMel(nn.Module):
    """Waveform (B, samples) at 32 kHz -> log-mel (B, frames, 64) in dB; frames = 1 + samples // 320.

    The STFT window and the mel matrix are fixed, non-persistent buffers: they are part of the
    definition, not learned, so they never enter our state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)
        self.register_buffer("mel", torch.from_numpy(mel_matrix()), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """In float32 under any autocast, as the reference computes it: in float16 the power spectrum of a loud
        second overflows (> 65504: inf, then NaN in the mel product), and the 1e-10 floor is 0, so a silent
        second's log is -inf."""
        device = wave.device.type
        off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
        with off:
            spec = torch.stft(wave.float(), N_FFT, HOP, window=self.window, center=True, pad_mode="reflect",
                              return_complex=True)
            power = spec.real.square() + spec.imag.square()  # (B, 513, frames)
            mel = torch.matmul(power.transpose(1, 2), self.mel)
            return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))


def fold_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, T, 64) -> (B, 1, 256, 256): stretch time to 1024 if shorter, then stack 4 time chunks along frequency."""
    b, t, f = x.shape
    if t > TARGET_FRAMES:
        raise ValueError(f"{t} frames is longer than HTS-AT's {TARGET_FRAMES}-frame (10.24 s) input")
    if t < TARGET_FRAMES:
        x = F.interpolate(x[:, None], size=(TARGET_FRAMES, f), mode="bicubic", align_corners=True)[:, 0]
    chunk = TARGET_FRAMES // FREQ_RATIO
    # (B, 1024, F) -> (B, 4 chunks, 256 time, F) -> (B, 4 chunks, F, 256 time) -> rows (chunk, F)
    img = x.reshape(b, FREQ_RATIO, chunk, f).transpose(2, 3).reshape(b, FREQ_RATIO * f, chunk)
    return img[:, None]
