"""Read one manifest clip's media: one frame and one 1-s audio window per segment."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mettle.manifests import Clip, ManifestError
from mettle.manifests.paths import resolve_under

from .audio import AUDIO_RATE, decode_audio, read_wave_npy
from .errors import MediaError
from .select import cut_segments, segment_starts
from .video import VIDEO_SUFFIXES, decode_video_frames, read_frame_folder

log = logging.getLogger(__name__)


@dataclass
class ClipMedia:
    """Decoded media of one clip.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8 RGB, one frame per segment (native resolution).
        audio: ``(T, 32000)`` float32 mono at 32 kHz, one 1-s window per segment.
        sources: ``{"visual": path, "audio": path}``, the files actually read.
        padded_samples: audio samples zero-padded because the sound track was short.
    """

    frames: np.ndarray
    audio: np.ndarray
    sources: dict[str, Path] = field(default_factory=dict)
    padded_samples: int = 0


def find_video(clip: Clip, data_root: Path) -> Path | None:
    """The clip's video file (``media["video"]`` plus a known container suffix), or None."""
    rel = clip.media.get("video")
    if not rel:
        return None
    for suffix in VIDEO_SUFFIXES:
        path = _resolve(clip, data_root, rel + suffix)
        if path.is_file():
            return path
    return None


def read_clip(clip: Clip, data_root: str | Path, frame_rule: str = "linspace") -> ClipMedia:
    """Decode ``clip``'s frames and audio from under ``data_root``.

    Per modality, extracted media wins over the raw video: frames come from ``media["frames"]``
    when that folder exists, else from the video; audio from ``media["audio"]`` (``.npy`` at
    32 kHz, or any file PyAV decodes, resampled) when it exists, else from the video's sound track.
    Raises MediaError (naming the clip and what was tried) when neither is there or a file is bad.
    """
    root = Path(data_root)
    video = find_video(clip, root)

    frames_rel = clip.media.get("frames")
    frames_dir = _resolve(clip, root, frames_rel) if frames_rel else None
    if frames_dir is not None and frames_dir.is_dir():
        frames = read_frame_folder(clip.clip_id, frames_dir, clip.num_segments, frame_rule)
        visual_src = frames_dir
    elif video is not None:
        frames = decode_video_frames(clip.clip_id, video, clip.num_segments, frame_rule, clip.duration)
        visual_src = video
    else:
        tried = [p for p in (frames_rel, clip.media.get("video")) if p]
        raise MediaError(clip.clip_id, root, f"no frames folder or video found (tried {', '.join(tried)}"
                         f"{' + ' + '/'.join(VIDEO_SUFFIXES) if clip.media.get('video') else ''})",
                         "check --data-root and the dataset's folder layout in the README")

    audio_rel = clip.media.get("audio")
    audio_path = _resolve(clip, root, audio_rel) if audio_rel else None
    if audio_path is not None and audio_path.is_file():
        wave = read_wave_npy(clip.clip_id, audio_path) if audio_path.suffix == ".npy" \
            else decode_audio(clip.clip_id, audio_path)
        audio_src = audio_path
    elif video is not None:
        wave = decode_audio(clip.clip_id, video)
        audio_src = video
    else:
        raise MediaError(clip.clip_id, root, f"no audio found (tried {audio_rel} and the video)",
                         "check --data-root and the dataset's folder layout in the README")

    # a track of the segments' length holds them back to back: MUSIC-AVQA's audio_wave/<id>.npy files are 10 s
    # (the reference loaders view them as (10, 32000)), though the videos last 60 s; a longer track (a video's,
    # or a .npy of all of it) is cut on the clip's time axis, as its frames are (a short one zero-padded, logged)
    seconds = len(wave) / AUDIO_RATE
    starts = segment_starts(clip.num_segments if seconds <= clip.num_segments + 0.5 else clip.duration, clip.num_segments)
    audio, padded = cut_segments(wave, AUDIO_RATE, starts)
    if padded:
        log.warning("clip %s: sound track %.2f s shorter than its %d segments; zero-padded",
                    clip.clip_id, padded / AUDIO_RATE, clip.num_segments)
    return ClipMedia(frames, audio, {"visual": visual_src, "audio": audio_src}, padded)


def _resolve(clip: Clip, root: Path, rel: str) -> Path:
    try:
        return resolve_under(root, rel)
    except ManifestError as e:
        raise MediaError(clip.clip_id, rel, str(e).split(". Fix")[0], "rebuild the manifest") from None
