"""The typed error of the media readers."""

from __future__ import annotations

from pathlib import Path


class MediaError(RuntimeError):
    """A clip's media is missing or unreadable.

    Attributes:
        clip_id: the manifest clip.
        path: the file or folder at fault.
        reason: what went wrong; ``str(error)`` also says what to do.
    """

    def __init__(self, clip_id: str, path: str | Path, reason: str, fix: str = "check or re-download the file"):
        self.clip_id, self.path, self.reason, self.fix = clip_id, Path(path), reason, fix
        super().__init__(f"clip {clip_id}: {path}: {reason}. Fix: {fix}")

    def __reduce__(self):  # rebuilt from its fields: it travels back from decode worker processes
        return type(self), (self.clip_id, self.path, self.reason, self.fix)


def open_container(clip_id: str, path: Path):
    """Open a media file with PyAV; a missing or unreadable file raises MediaError naming the clip."""
    import av

    try:
        return av.open(str(path))
    except FileNotFoundError:
        raise MediaError(clip_id, path, "file not found") from None
    except av.FFmpegError as e:
        raise MediaError(clip_id, path, f"cannot open ({e})") from None
