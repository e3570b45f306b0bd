"""AVE (Tian et al., ECCV 2018): 4143 clips of 10 s, 28 events + background, per-second labels.

Reads the official on-disk format: ``Annotations.txt`` (``Category&VideoID&Quality&StartTime&EndTime``,
with or without the header line), ``categories.txt`` (class order), ``{split}_order.h5`` (dataset
``order``: rows of ``Annotations.txt``) cross-checked against ``{split}Set.txt``. The toy dataset is
written in the same format and parsed by :func:`parse_ave_folder`.

Labels per clip: ``segment_labels`` (one class per second, background = ``len(categories)``, set
when ``StartTime <= t < EndTime`` as the reference ``labels.h5`` does) and ``event_class``.
Media: ``frames/<VideoID>/``, ``wave/<VideoID>.npy``, or ``videos/<VideoID>.<ext>``.
46 annotation rows reuse an earlier VideoID (another event of the same video, 18 of them in
another split, as the official protocol has it); every row of such a VideoID (91 rows, the first
ones included) gets the id ``<VideoID>#<row>``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from ._registry import register_dataset
from .annotations import packaged, read_text, sha256_file
from .errors import AnnotationError, ManifestError
from .paths import check_media_id
from .schema import SPLITS, Clip, Manifest

log = logging.getLogger(__name__)

AVE_SPLIT_SIZES = {"train": 3339, "val": 402, "test": 402}
BACKGROUND = "background"


@register_dataset("ave", "AVE event localisation: 4143 clips, 28 events + background, per-second labels")
def build_ave(annotations: str | None = None) -> Manifest:
    """Manifest of AVE from the packaged official annotations, or from a folder in the same format.

    The packaged files must give the official split sizes; a user folder may hold any AVE-format
    subset or re-split (its sizes are logged), e.g. the toy dataset, which is written in AVE format.
    """
    if annotations is None:
        return parse_ave_folder(packaged("ave"), dataset="ave", expected_sizes=AVE_SPLIT_SIZES)
    manifest = parse_ave_folder(Path(annotations), dataset="ave")
    sizes = manifest.split_sizes()
    if sizes != AVE_SPLIT_SIZES:
        log.info("AVE annotations in %s: splits %s (the official AVE has %s)", annotations, sizes, AVE_SPLIT_SIZES)
    return manifest


def parse_ave_folder(
    folder: Path,
    *,
    dataset: str,
    expected_sizes: dict[str, int] | None = None,
    num_segments: int = 10,
) -> Manifest:
    """Parse an AVE-format annotation folder into a manifest (rows in ``Annotations.txt`` order)."""
    fix_missing = f"give a folder with the AVE annotation files ({folder} is incomplete)"
    cat_path = folder / "categories.txt"
    categories = [ln.strip() for ln in read_text(cat_path, fix_missing).splitlines() if ln.strip()]
    dup = [c for c, n in Counter(categories).items() if n > 1]
    if dup:
        raise AnnotationError(cat_path, None, f"category {dup[0]!r} listed twice", "list each class once")
    class_index = {c: i for i, c in enumerate(categories)}
    background = len(categories)

    ann_path = folder / "Annotations.txt"
    rows = _parse_rows(ann_path, read_text(ann_path, fix_missing), class_index, num_segments, header_allowed=True)
    if not rows:
        raise AnnotationError(ann_path, None, "no annotation rows", "give the full Annotations.txt")

    split_of: dict[int, str] = {}
    for split in SPLITS:
        order = _read_order(folder / f"{split}_order.h5", len(rows), fix_missing)
        set_path = folder / f"{split}Set.txt"
        if set_path.is_file():
            set_rows = _parse_rows(set_path, read_text(set_path, fix_missing), class_index, num_segments,
                                   header_allowed=False)
            if len(set_rows) != len(order):
                raise AnnotationError(set_path, None, f"{len(set_rows)} rows but {split}_order.h5 lists {len(order)}",
                                      "use split files from the same release")
            for k, (row, set_row) in enumerate(zip(order, set_rows)):
                if rows[row][1:] != set_row[1:]:
                    raise AnnotationError(set_path, set_row[0], f"differs from Annotations.txt row {row}",
                                          "use split files from the same release")
        for row in order:
            if row in split_of:
                raise AnnotationError(folder / f"{split}_order.h5", None,
                                      f"row {row} is also in the {split_of[row]} split", "splits must be disjoint")
            split_of[row] = split
        if expected_sizes and len(order) != expected_sizes[split]:
            raise AnnotationError(folder / f"{split}_order.h5", None,
                                  f"{len(order)} clips, expected {expected_sizes[split]}", "use the official split files")
    missing = [i for i in range(len(rows)) if i not in split_of]
    if missing:
        raise AnnotationError(ann_path, rows[missing[0]][0], f"row {missing[0]} is in no split",
                              "every annotation row must appear in one *_order.h5")

    seen = Counter(r[2] for r in rows)
    clips = []
    for i, (_line, cls, vid, start, end) in enumerate(rows):
        clip_id = vid if seen[vid] == 1 else f"{vid}#{i}"
        seg = [cls if start <= t < end else background for t in range(num_segments)]
        clips.append(Clip(
            clip_id=clip_id, splits=(split_of[i],), num_segments=num_segments, duration=float(num_segments),
            media={"frames": f"frames/{vid}", "audio": f"wave/{vid}.npy", "video": f"videos/{vid}"},
            labels={"segment_labels": seg, "event_class": cls},
        ))
    files = ["Annotations.txt", "categories.txt"] + [f"{s}_order.h5" for s in SPLITS]
    return Manifest(
        dataset=dataset, clips=tuple(clips), vocabularies={"event": tuple(categories) + (BACKGROUND,)},
        frame_rule="linspace", source={f: sha256_file(folder / f) for f in files},
        options={"num_segments": num_segments},
    )


def _parse_rows(path: Path, text: str, class_index: dict[str, int], num_segments: int,
                header_allowed: bool) -> list[tuple[int, int, str, int, int]]:
    """Rows as (line number, class index, VideoID, start, end); errors name the line and the fix."""
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("&")
        if n == 1 and header_allowed and fields[:2] == ["Category", "VideoID"]:
            continue
        if len(fields) != 5:
            raise AnnotationError(path, n, f"expected 5 '&'-separated fields, found {len(fields)}",
                                  "use the format Category&VideoID&Quality&StartTime&EndTime")
        cat, vid, _quality, start, end = fields
        if cat not in class_index:
            raise AnnotationError(path, n, f"category {cat!r} is not in categories.txt",
                                  "add it to categories.txt or correct the row")
        try:
            vid = check_media_id(vid)
        except ManifestError as err:
            problem, _, fix = str(err).partition(". Fix: ")
            raise AnnotationError(path, n, problem.removeprefix("annotation: "), fix) from None
        try:
            s, e = int(start), int(end)
        except ValueError:
            raise AnnotationError(path, n, f"StartTime/EndTime {start!r}/{end!r} are not integers",
                                  "StartTime/EndTime must be whole seconds") from None
        if not 0 <= s <= e <= num_segments:
            raise AnnotationError(path, n, f"event [{s}, {e}) is outside 0..{num_segments} s",
                                  f"use 0 <= StartTime <= EndTime <= {num_segments}")
        rows.append((n, class_index[cat], vid, s, e))
    return rows


def _read_order(path: Path, num_rows: int, fix: str) -> list[int]:
    if not path.is_file():
        raise AnnotationError(path, None, "file not found", fix)
    try:
        with h5py.File(path, "r") as f:
            if not isinstance(f.get("order"), h5py.Dataset):
                raise KeyError("'order' is missing or not a dataset")
            order = np.asarray(f["order"][()])
    except (OSError, KeyError) as e:
        raise AnnotationError(path, None, f"cannot read dataset 'order' ({e})", "give the official *_order.h5") from None
    if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
        raise AnnotationError(path, None, f"'order' has shape {order.shape} and dtype {order.dtype}",
                              "it must be a 1-D integer array of row indices")
    bad = order[(order < 0) | (order >= num_rows)]
    if bad.size:
        raise AnnotationError(path, None, f"row index {int(bad[0])} outside 0..{num_rows - 1}",
                              "use the order file that belongs to this Annotations.txt")
    if len(set(order.tolist())) != len(order):
        raise AnnotationError(path, None, "lists a row twice", "use the official order file")
    return [int(i) for i in order]
