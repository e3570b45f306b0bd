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

# The rules media are decoded by, recorded in every cache (CacheMeta.media) and part of its identity: a
# change here that changes what the backbones see must change these words, so that resuming a cache
# started under the old rules is refused instead of mixing the two.
DECODING = {
    "frames": "frame folders: the manifest's frame_rule over the sorted files (linspace: AVE, MUSIC-AVQA, AVSBench; "
              "first: LLP); videos: at 1 fps the frame nearest each second's middle (exact time bases), a short "
              "video repeating its last second, then the same rule",
    "audio": "channel mean, then soxr_hq to the backbone's rate (librosa.load); a track up to the segments + 0.5 s "
             "long read back to back, a longer one on the clip's time axis, missing samples zero",
    "masks": "any non-zero pixel is foreground, nearest-neighbour resize to 224",
}

__all__ = [
    "DECODING", "MASK_SIZE", "MISSING", "read_masks",
    "AUDIO_RATE", "ClipMedia", "MediaError", "cut_segments", "decode_audio", "decode_video_frames",
    "find_video", "frame_indices", "read_clip", "read_frame_folder", "read_wave_npy", "segment_starts",
]
