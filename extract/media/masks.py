"""Ground-truth segmentation masks (AVSBench): PNG files -> one (H, W) uint8 mask per segment."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mettle.manifests import Clip, ManifestError
from mettle.manifests.paths import resolve_under

from .errors import MediaError

MASK_SIZE = 224  # AVSBench's ground-truth resolution
MISSING = 255  # a segment without a mask (S4 training clips annotate frame 1 only)
_INDEX = re.compile(r"_(\d+)\.png$")


def read_masks(clip: Clip, data_root: str | Path, size: int = MASK_SIZE) -> np.ndarray:
    """``(T, size, size)`` uint8: 1 = sounding object, 0 = not, ``MISSING`` = no mask for that segment.

    Masks are placed by the ``_<k>.png`` suffix of their file names (k = 1..T), as AVSBench names
    them; any non-zero pixel is foreground (S4 masks are 1-bit, MS3 palette images). Masks of
    another size are resized with nearest-neighbour sampling.
    """
    from PIL import Image, UnidentifiedImageError

    paths = clip.labels.get("masks") or []
    out = np.full((clip.num_segments, size, size), MISSING, dtype=np.uint8)
    for rel in paths:
        m = _INDEX.search(rel)
        k = int(m.group(1)) - 1 if m else paths.index(rel)
        if not 0 <= k < clip.num_segments:
            raise MediaError(clip.clip_id, rel, f"mask index {k + 1} is outside 1..{clip.num_segments}",
                             "name masks <name>_<k>.png with k = 1..5")
        try:
            path = resolve_under(Path(data_root), rel)
        except ManifestError as e:
            raise MediaError(clip.clip_id, rel, str(e).split(". Fix")[0], "rebuild the manifest") from None
        try:
            with Image.open(path) as img:
                mask = img.convert("L")
                if mask.size != (size, size):
                    mask = mask.resize((size, size), Image.NEAREST)
                out[k] = (np.asarray(mask) > 0).astype(np.uint8)
        except FileNotFoundError:
            raise MediaError(clip.clip_id, path, "mask file missing", "check --data-root and the AVSBench layout") \
                from None
        except (UnidentifiedImageError, OSError) as e:
            raise MediaError(clip.clip_id, path, f"unreadable mask ({e})", "restore the mask file") from None
    return out
