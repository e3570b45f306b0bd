"""Media readers: decode a clip's frames and 32 kHz mono audio, one of each per 1-s segment.

Two layouts are read: the extracted layout of the original projects (``frames/<id>/*.jpg`` +
``wave/<id>.npy``, AVSBench frame PNGs + wavs) and raw videos decoded with PyAV.
"""

from .audio import AUDIO_RATE, decode_audio, read_wave_npy
from .clip import ClipMedia, find_video, read_clip
from .errors import MediaError
from .masks import MASK_SIZE, MISSING, read_masks
from .select import cut_segments, frame_indices, segment_starts
from .video import decode_video_frames, read_frame_folder

__all__ = [
    "MASK_SIZE", "MISSING", "read_masks",
    "AUDIO_RATE", "ClipMedia", "MediaError", "cut_segments", "decode_audio", "decode_video_frames",
    "find_video", "frame_indices", "read_clip", "read_frame_folder", "read_wave_npy", "segment_starts",
]
