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
        self.clip_id, self.path, self.reason = clip_id, Path(path), reason
        super().__init__(f"clip {clip_id}: {path}: {reason}. Fix: {fix}")
