"""Frame readers: one RGB frame per segment from a frame folder or a video file."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from .errors import MediaError, open_container
from .select import frame_indices

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
_DIGITS = re.compile(r"(\d+)")
log = logging.getLogger(__name__)


def _frame_key(path: Path) -> tuple[int, str]:
    """Sort frame files by their last number (``00000012.jpg``, ``name_3.png``, ``id.mp4_5.png``)."""
    numbers = _DIGITS.findall(path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


def read_frame_folder(clip_id: str, folder: Path, num_segments: int, rule: str) -> np.ndarray:
    """Pick ``num_segments`` frames from a folder of images; returns ``(T, H, W, 3)`` uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise MediaError(clip_id, folder, "frame folder not found")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_frame_key)
    try:
        picks = frame_indices(len(files), num_segments, rule)
    except ValueError as e:
        raise MediaError(clip_id, folder, str(e), "extract the clip's frames again") from None
    frames = []
    for k in picks:
        try:
            with Image.open(files[k]) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise MediaError(clip_id, files[k], f"unreadable image ({e})", "extract the clip's frames again") from None
    if len({f.shape for f in frames}) > 1:
        raise MediaError(clip_id, folder, f"frames differ in size {sorted({f.shape for f in frames})}",
                         "extract all frames of a clip at one resolution")
    return np.stack(frames)


def decode_video_frames(clip_id: str, path: Path, num_segments: int, rule: str, seconds: float | None = None
                        ) -> np.ndarray:
    """Pick ``num_segments`` frames of a video with PyAV; returns ``(T, H, W, 3)`` uint8 RGB.

    The frames are the ones a reference pipeline would read from its frame folder: the folder a 1-fps
    extraction writes (one frame per second, the one nearest the middle of the second; MUSIC-AVQA's
    extraction script and ffmpeg's ``fps=1`` filter each keep one within a frame interval of it),
    ``seconds`` of them (the clip's duration; default: the video's, rounded), then ``rule``
    over that folder as :func:`read_frame_folder` applies it (``linspace``: evenly spaced; ``first``:
    its first T files, LLP's loader). A video shorter than ``seconds`` repeats its last second, as that
    script pads short videos (logged). A first pass demuxes packet timestamps without decoding; the
    second decodes and converts only the chosen frames, so long videos cost no memory. A corrupt packet
    is skipped; a video whose chosen frames cannot all be decoded raises MediaError.
    """
    import av

    container = open_container(clip_id, path)
    with container:
        if not container.streams.video:
            raise MediaError(clip_id, path, "no video stream")
        stream = container.streams.video[0]
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
        try:
            picks = _one_per_second(clip_id, pts, float(stream.time_base or 0), num_segments, rule, seconds)
        except ValueError as e:
            raise MediaError(clip_id, path, str(e)) from None
        wanted: dict[int, list[int]] = {}
        for slot, k in enumerate(picks):
            wanted.setdefault(pts[k], []).append(slot)
        out: list[np.ndarray | None] = [None] * num_segments
        container.seek(0, stream=stream)
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue
            for frame in frames:
                for slot in wanted.get(frame.pts, ()):
                    out[slot] = frame.to_ndarray(format="rgb24")
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        raise MediaError(clip_id, path, f"could not decode the frames of segments {missing}",
                         "re-encode or re-download the video")
    return np.stack(out)


def _one_per_second(clip_id: str, pts: list[int], time_base: float, num_segments: int, rule: str,
                    seconds: float | None) -> list[int]:
    """Indices into sorted ``pts`` (``time_base`` units) of the frames :func:`decode_video_frames` keeps.

    Second i of the 1-fps folder is the frame nearest ``i + 0.5`` s (ties: the earlier); past the video's
    end, time wraps into its last second (the last whole second, or the partial one after it).
    """
    if not pts or time_base <= 0:
        raise ValueError("no frames with timestamps")
    times = np.asarray(pts, dtype=np.float64) * time_base
    times -= times[0]
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
    end = times[-1] + step  # the video's length: its last frame lasts one frame interval
    folder = max(1, int(round(seconds if seconds is not None else end)))
    wanted = frame_indices(folder, num_segments, rule) + 0.5  # seconds of the folder's chosen files
    if wanted.max() > end:
        log.warning("clip %s: the video lasts %.2f s, shorter than the clip's %d s; its last second is repeated "
                    "for the segments after it", clip_id, end, folder)
        last = np.ceil(end - 1e-6) - 1.0  # start of the last second (whole or partial; 30.000000000000004 is 30)
        wanted = np.where(wanted > end, last + np.mod(wanted - last, end - last), wanted)
    after = np.clip(np.searchsorted(times, wanted), 1, len(times) - 1)
    # ties (a frame boundary exactly mid-second) go to the earlier frame, whatever float rounding says
    nearer = np.where(np.abs(times[after - 1] - wanted) <= np.abs(times[after] - wanted) + 1e-9, after - 1, after)
    return [int(i) for i in (nearer if len(times) > 1 else np.zeros(len(wanted), int))]
