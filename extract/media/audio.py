"""Audio readers: 32 kHz mono float32 waveforms from ``.npy`` files or anything FFmpeg decodes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import MediaError, open_container

log = logging.getLogger(__name__)

AUDIO_RATE = 32000


def read_wave_npy(clip_id: str, path: Path) -> np.ndarray:
    """A waveform saved with ``np.save`` at 32 kHz (the AVE/LLP/AVQA ``wave/<id>.npy`` layout).

    Accepts 1-D arrays or ``(segments, 32000)`` rows (flattened), float or int16 (scaled to
    [-1, 1]). Pickled objects are refused. Returns ``(samples,)`` float32.
    """
    try:
        wave = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MediaError(clip_id, path, "file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise MediaError(clip_id, path, f"not a readable .npy array ({e})", "re-create the waveform file") from None
    if wave.dtype == np.int16:
        wave = wave.astype(np.float32) / 32768.0
    if not np.issubdtype(wave.dtype, np.floating) or wave.ndim not in (1, 2) or wave.size == 0:
        raise MediaError(clip_id, path, f"expected a 1-D or 2-D float waveform, found {wave.dtype} {wave.shape}",
                         "save 32 kHz mono samples with np.save")
    wave = np.ascontiguousarray(wave.reshape(-1), dtype=np.float32)
    if not np.isfinite(wave).all():
        raise MediaError(clip_id, path, "waveform holds NaN or inf", "re-create the waveform file")
    return wave


def decode_audio(clip_id: str, path: Path, rate: int = AUDIO_RATE) -> np.ndarray:
    """Decode the first audio stream of ``path`` with PyAV: ``rate`` Hz mono float32, as ``librosa.load(path,
    sr=rate)`` gives it (the channels' mean, then soxr's high-quality resampler).

    Why not FFmpeg's own resampler and mono layout: its stereo downmix is 0.707 (L + R), 3 dB louder in
    every mel bin than the mean that librosa (and so the reference pipelines' waveform files) takes, and
    its default resampler leaks up to -26 dB into the empty band above a 16-kHz source's 8 kHz
    (AVSBench's wav files), where soxr leaves -100 dB. Decodes packet by packet so that a corrupt packet
    (often the truncated last one) costs only its own samples; they are logged, not fatal. Raises
    MediaError when the file cannot be opened or has no audio stream.
    """
    import av

    container = open_container(clip_id, path)
    runs: list[tuple[int, list[np.ndarray]]] = []  # (sample rate, mono chunks): a stream may change its rate
    bad = 0
    with container:
        if not container.streams.audio:
            raise MediaError(clip_id, path, "no audio stream", "give a file with a sound track, or a wave/*.npy")
        stream = container.streams.audio[0]
        # the stream's own layout and rate, as float32 planes; a converter is set up by its first frame, so a new
        # one starts wherever the stream changes its rate, sample format or layout
        planar, setup = None, None

        def add(frames) -> None:
            for out in frames:
                if not runs or runs[-1][0] != out.sample_rate:
                    runs.append((out.sample_rate, []))
                runs[-1][1].append(out.to_ndarray().mean(0))
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                bad += 1
                continue
            for frame in frames:
                if (frame.sample_rate, frame.format.name, frame.layout.name) != setup:
                    if planar is not None:
                        add(planar.resample(None))
                    planar = av.AudioResampler(format="fltp")
                    setup = (frame.sample_rate, frame.format.name, frame.layout.name)
                add(planar.resample(frame))
        if planar is not None:
            add(planar.resample(None))
    if bad:
        log.warning("clip %s: %s: skipped %d undecodable audio packet(s)", clip_id, path, bad)
    if not any(len(c) for _, chunks in runs for c in chunks):
        raise MediaError(clip_id, path, "the audio stream decoded to no samples")
    return np.concatenate([resample(np.concatenate(chunks), source, rate) for source, chunks in runs if chunks])


def resample(wave: np.ndarray, source: int, rate: int) -> np.ndarray:
    """``(n,)`` samples at ``source`` Hz -> ``(ceil(n * rate / source),)`` float32 at ``rate`` Hz, the numbers
    ``librosa.resample`` gives with its defaults (tested): soxr's high-quality resampler, the result cut or
    zero-padded to that length; without importing librosa's core, whose first call compiled numba kernels
    for 27 s in a fresh environment."""
    import soxr

    wave = wave.astype(np.float32, copy=False)
    if source == rate:
        return wave
    size = int(np.ceil(len(wave) * rate / source))
    out = soxr.resample(wave, source, rate, quality="soxr_hq").astype(np.float32, copy=False)[:size]
    return np.pad(out, (0, size - len(out))) if len(out) < size else out
