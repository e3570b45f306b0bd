"""Frame readers: one RGB frame per segment from a frame folder or a video file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import MediaError, open_container
from .select import frame_indices

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
_DIGITS = re.compile(r"(\d+)")


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


def decode_video_frames(clip_id: str, path: Path, num_segments: int, rule: str) -> np.ndarray:
    """Pick ``num_segments`` frames of a video with PyAV; returns ``(T, H, W, 3)`` uint8 RGB.

    The frames are chosen as from an extracted-frame folder: ``linspace`` over all frames in
    presentation order; ``first`` (LLP's first files of a 1-fps folder) takes the first frame at or
    after each whole second, which is what 1-fps extraction keeps. A first pass demuxes packet timestamps without decoding; the second
    decodes and converts only the chosen frames, so long videos cost no memory. A corrupt packet
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
            if rule == "first":  # a 1-fps frame folder's first T files = the frame starting each second
                picks = _first_per_second(pts, float(stream.time_base or 0), num_segments)
            else:
                picks = frame_indices(len(pts), num_segments, rule)
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


def _first_per_second(pts: list[int], time_base: float, num_segments: int) -> list[int]:
    """Index of the first frame at or after t = 0, 1, ..., T-1 s (sorted ``pts`` in ``time_base`` units)."""
    if not pts or time_base <= 0:
        raise ValueError("no frames with timestamps")
    times = np.asarray(pts, dtype=np.float64) * time_base
    times -= times[0]
    picks = np.searchsorted(times, np.arange(num_segments) - 1e-6)
    if picks[-1] >= len(times):
        raise ValueError(f"the video lasts {times[-1]:.2f} s, the 'first' rule needs a frame in each of "
                         f"{num_segments} seconds")
    return [int(i) for i in picks]
