"""Path safety: ids and relative media paths taken from annotation files never leave the data root."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from .errors import ManifestError

# Clip and media ids in the supported datasets are YouTube ids, 8-digit numbers, `va00001234`-style
# MUSIC-AVQA ids, and AVSBench names such as `-0aRvvS5O_w_30000`: letters, digits, `_`, `-`, `.`.
_SAFE_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_\-.]*\Z")


def check_media_id(media_id: str, *, source: str = "annotation") -> str:
    """Return ``media_id`` if it can be used as one path component, else raise ManifestError.

    Refuses empty ids, ``.``/``..``, separators and anything outside ``[A-Za-z0-9_.-]`` (a leading dot
    is refused too), because the id becomes a file or folder name under the user's data root.
    """
    if not isinstance(media_id, str) or not _SAFE_ID.match(media_id) or media_id in {".", ".."} or ".." in media_id:
        raise ManifestError(
            f"{source}: clip id {media_id!r} cannot be used as a file name (only letters, digits, '_', '-', "
            "'.' are allowed, and no '..'). Fix: correct the id in the annotation file"
        )
    return media_id


def check_relative(path: str, *, source: str = "manifest") -> str:
    """Return ``path`` if it is a relative POSIX path with no ``..`` component, else raise ManifestError."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or any(part in {"..", ""} for part in p.parts):
        raise ManifestError(
            f"{source}: media path {path!r} is not a plain relative path inside the data root. "
            "Fix: use a path relative to --data-root without '..'"
        )
    return path


def resolve_under(root: str | Path, relative: str) -> Path:
    """Join a relative media path from a manifest to the data root.

    The check is lexical (:func:`check_relative`): annotation files cannot name anything outside
    the root. Symbolic links inside the root are followed on purpose; they are the user's own
    layout choice (``videos -> /scratch/AVE/videos``), not input from an annotation file.
    """
    return Path(root) / check_relative(relative)
