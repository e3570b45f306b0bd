"""The modality-shared audio input: Kaldi fbank images, checked against a plain-numpy computation."""

import numpy as np
import torch

from mettle.extract.backbones import create_backbone
from mettle.extract.backbones.fbank import kaldi_fbank


def _reference_fbank(x: np.ndarray) -> np.ndarray:
    """Kaldi's fbank definition, written out frame by frame in float64 (no shared code with ours)."""
    rate, size, shift, nfft, bins = 16000, 400, 83, 512, 192
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    centres = [lo + (hi - lo) * m / (bins + 1) for m in range(bins + 2)]  # edges of the 192 triangles
    weights = np.zeros((bins, nfft // 2 + 1))
    for m in range(bins):
        left, mid, right = centres[m], centres[m + 1], centres[m + 2]
        for k in range(nfft // 2):  # the Nyquist bin gets no weight
            v = mel(k * rate / nfft)
            if left < v <= mid:
                weights[m, k] = (v - left) / (mid - left)
            elif mid < v < right:
                weights[m, k] = (right - v) / (right - mid)
    out = []
    for start in range(0, len(x) - size + 1, shift):
        f = x[start:start + size].astype(np.float64)
        f = f - f.mean()
        f = np.concatenate([[f[0] - 0.97 * f[0]], f[1:] - 0.97 * f[:-1]])
        f = f * np.hanning(size)
        spec = np.abs(np.fft.rfft(f, nfft)) ** 2
        out.append(np.log(np.maximum(weights @ spec, np.finfo(np.float32).eps)))
    return np.array(out)


def test_fbank_matches_reference_definition():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    ours = kaldi_fbank(torch.from_numpy(x)[None])[0].numpy()
    ref = _reference_fbank(x)
    assert ours.shape == ref.shape == (188, 192)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)


def test_shared_variant_shapes():
    b = create_backbone("test_swinv2_tiny+fbank")
    assert b.modality == "audio"
    x = b.preprocess((0.1 * np.random.default_rng(1).standard_normal((3, 32000))).astype(np.float32))
    assert x.shape == (3, 3, 192, 192)
    # 188 frames of fbank normalised, then 4 frames of zeros, as LAVisH's _wav2fbank pads after normalising
    # (padding first, as AST does, made them (0 + 4.985) / 7.416 = 0.672)
    assert not x[:, :, 188:].any() and (x[:, :, :188].abs().amax((1, 2, 3)) > 0.1).all()
    torch.testing.assert_close(x[:, 0], x[:, 2])
    taps = b.forward_tokens(x)
    assert [tuple(t.shape[1:]) for t in taps] == [(2304, 16), (576, 32), (144, 64), (144, 64), (36, 128)]


def test_resampling_is_librosas_without_librosa():
    """fbank.resample calls soxr itself (importing librosa's core compiled numba kernels for 27 s in a fresh
    environment): the same numbers as librosa.resample's defaults, lengths that do not divide included."""
    import librosa
    import pytest

    from mettle.extract.backbones.fbank import resample

    rng = np.random.default_rng(2)
    for n in (32000, 31999, 777):
        x = (0.3 * rng.standard_normal((3, n))).astype(np.float32)
        ours = resample(x, 32000, 16000)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, librosa.resample(x, orig_sr=32000, target_sr=16000, axis=-1))
    x[1, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite samples"):
        resample(x, 32000, 16000)
