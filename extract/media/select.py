"""Which frames and which audio windows stand for a clip's 1-s segments (the reference protocols)."""

from __future__ import annotations

import numpy as np

FRAME_RULES = ("linspace", "first")


def frame_indices(num_frames: int, num_segments: int, rule: str) -> np.ndarray:
    """0-based indices of the frames kept, one per segment.

    ``linspace``: ``np.linspace(1, n, T, dtype=int) - 1``, evenly spaced over all frames (the AVE and
    MUSIC-AVQA loaders). ``first``: frames ``0 .. T-1`` (the LLP loader reads files 1..10).
    Raises ValueError when there are no frames, or fewer than ``T`` for ``first``.
    """
    if num_frames < 1:
        raise ValueError("no frames")
    if rule == "linspace":
        return np.linspace(1, num_frames, num=num_segments, dtype=int) - 1
    if rule == "first":
        if num_frames < num_segments:
            raise ValueError(f"{num_frames} frames, the 'first' rule needs {num_segments}")
        return np.arange(num_segments)
    raise ValueError(f"unknown frame rule {rule!r}; use one of {FRAME_RULES}")


def segment_starts(duration: float, num_segments: int, segment_seconds: float = 1.0) -> np.ndarray:
    """Start times (s) of the 1-s audio windows: back to back when the clip is exactly
    ``num_segments`` seconds long (AVE, LLP, AVS), else evenly spread so the last window ends at the
    clip's end (the 10 segments of a 60-s MUSIC-AVQA video)."""
    if duration <= num_segments * segment_seconds:
        return np.arange(num_segments) * segment_seconds
    return np.linspace(0.0, duration - segment_seconds, num_segments)


def cut_segments(wave: np.ndarray, sample_rate: int, starts: np.ndarray, segment_seconds: float = 1.0
                 ) -> tuple[np.ndarray, int]:
    """Cut ``(T, sample_rate * segment_seconds)`` windows at ``starts`` from a mono waveform.

    Windows running past the end are zero-padded; returns the windows and the number of padded
    samples (0 when the waveform covered every window).
    """
    n = int(round(sample_rate * segment_seconds))
    need = int(round(starts[-1] * sample_rate)) + n
    padded = max(0, need - len(wave))
    if padded:
        wave = np.concatenate([wave, np.zeros(padded, dtype=wave.dtype)])
    out = np.stack([wave[int(round(s * sample_rate)):int(round(s * sample_rate)) + n] for s in starts])
    return out.astype(np.float32, copy=False), padded
