"""Kaldi-compatible log-mel filterbank for the modality-shared setting (audio through the visual Swin).

The recipe of LAVisH-style shared backbones: each 1-s segment at 16 kHz; frames of 25 ms (400
samples) every 5.2 ms (83 samples; Kaldi truncates), edges snipped; per frame: remove the DC offset,
pre-emphasis 0.97 (the first sample against itself), symmetric Hann window, zero-pad to 512, power
spectrum; 192 triangular filters equally spaced on the HTK mel scale ``1127 ln(1 + f / 700)`` from
20 Hz to Nyquist; natural log floored at float32 epsilon; no dither, no energy. Then the (188, 192)
result is normalised as ``(x - mean) / (2 * std)`` with LAVisH's AVE statistics (mean -4.9848, std
3.7080), then zero-padded (or cut) to 192 frames, so that the padded frames are 0 as in LAVisH's
``_wav2fbank`` (normalising after padding, as AST does, made them 0.672), and repeated to 3
channels: a (3, 192, 192) image with time down the rows and mel across the columns.
"""

from __future__ import annotations


import numpy as np
import torch

FBANK_RATE = 16000
FRAME = 400
SHIFT = 83  # int(16000 * 0.0052)
NFFT = 512
MEL_BINS = 192
LOW_HZ = 20.0
PREEMPH = 0.97
TARGET_FRAMES = 192
NORM_MEAN, NORM_STD = -4.984795570373535, 3.7079780101776123  # LAVisH's, computed on AVE at 192 bins


def htk_mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_banks(num_bins: int = MEL_BINS, nfft: int = NFFT, rate: int = FBANK_RATE, low: float = LOW_HZ) -> torch.Tensor:
    """(num_bins, nfft // 2 + 1) triangular filters on the HTK mel scale (the Nyquist column is zero)."""
    lo, hi = htk_mel(low), htk_mel(rate / 2)
    delta = (hi - lo) / (num_bins + 1)
    edges = lo + delta * np.arange(num_bins + 2)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    m = htk_mel(np.arange(nfft // 2) * rate / nfft)[None, :]
    up, down = (m - left) / (centre - left), (right - m) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))
    return torch.from_numpy(np.pad(banks, ((0, 0), (0, 1)))).float()


def kaldi_fbank(wave: torch.Tensor) -> torch.Tensor:
    """(B, samples) at 16 kHz -> (B, frames, 192) log mel energies; frames = 1 + (samples - 400) // 83."""
    frames = wave.float().unfold(-1, FRAME, SHIFT)  # (B, T, 400)
    frames = frames - frames.mean(-1, keepdim=True)
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - PREEMPH * prev) * torch.hann_window(FRAME, periodic=False, dtype=frames.dtype)
    power = torch.fft.rfft(frames, n=NFFT).abs().square()  # (B, T, 257)
    mel = power @ mel_banks().T.to(power.dtype)
    return torch.log(torch.clamp(mel, min=float(np.finfo(np.float32).eps)))


def spectrogram_images(segments: np.ndarray, rate: int = 32000) -> torch.Tensor:
    """(T, rate) float32 1-s segments -> (T, 3, 192, 192) normalised fbank images."""
    wave = resample(np.asarray(segments, dtype=np.float32), rate, FBANK_RATE)
    fb = kaldi_fbank(torch.from_numpy(np.ascontiguousarray(wave)))
    fb = (fb - NORM_MEAN) / (2 * NORM_STD)  # before padding: the padded frames are 0, as the reference's
    t = fb.shape[1]
    img = torch.nn.functional.pad(fb, (0, 0, 0, TARGET_FRAMES - t)) if t < TARGET_FRAMES else fb[:, :TARGET_FRAMES]
    return img[:, None].expand(-1, 3, -1, -1).contiguous()


def resample(segments: np.ndarray, rate: int, target: int) -> np.ndarray:
    """(T, n) float32 -> (T, ceil(n * target / rate)) float32, row by row with the media readers' resampler
    (:func:`mettle.extract.media.audio.resample`: ``librosa.resample``'s numbers); non-finite samples are
    refused with the fix."""
    from ..media.audio import resample as resample_wave

    if not np.isfinite(segments).all():
        raise ValueError(f"audio has non-finite samples ({int((~np.isfinite(segments)).sum())} of {segments.size}). "
                         "Fix: check the clip's audio decodes, or re-encode it")
    out = np.zeros((segments.shape[0], int(np.ceil(segments.shape[-1] * target / rate))), np.float32)
    for row, wave in zip(out, segments):
        row[:] = resample_wave(wave, rate, target)
    return out
