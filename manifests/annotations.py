"""Access to the official annotation files shipped inside the package, and file fingerprints."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from importlib import resources
from pathlib import Path

from .errors import AnnotationError, first_line


def packaged(dataset: str) -> Path:
    """Folder of the annotation files shipped for ``dataset`` (``ave``, ``llp``, ``music-avqa``).

    See ``annotations/SOURCES.md`` for where each file comes from.
    """
    return Path(str(resources.files("mettle.manifests") / "annotations" / dataset))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_text(path: Path, fix: str) -> str:
    """Text of ``path`` (transparently gunzipped when it ends in ``.gz``); a missing file names ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, None, "file not found", fix)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # not gzip, a bad CRC, cut short, a damaged block
            raise AnnotationError(path, None, f"damaged gzip file ({first_line(e)})",
                                  "copy the file again, or give the uncompressed file") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (some editors write one) is no part of the text
    except UnicodeDecodeError as e:
        raise AnnotationError(path, None, f"not UTF-8 text ({e.reason})", "give the original annotation file") from None


def find_file(folder: Path, name: str, fix: str) -> Path:
    """``folder/name`` or its gzipped twin ``folder/name.gz``."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise AnnotationError(folder / name, None, "file not found", fix)
