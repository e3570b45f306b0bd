"""AVSBench-object (Zhou et al., ECCV 2022) S4 and MS3 segmentation, from the user's metadata.

AVSBench's metadata and masks are distributed on request only, so nothing ships here: pass
``data_root`` = the AVSBench data folder holding ``Single-source/`` and/or ``Multi-sources/``.

* S4: ``Single-source/s4_meta_data.csv`` (header; columns by position: 0 name, 1 start time,
  2 category, 3 split); frames ``Single-source/s4_data/visual_frames/<split>/<category>/<name>/<name>_<k>.png``,
  masks ``.../gt_masks/<split>/<category>/<name>/<name>_<k>.png`` (k = 1..5; train has k = 1 only),
  audio ``.../audio_wav/<split>/<category>/<name>.wav``. 23 categories.
* MS3: ``Multi-sources/ms3_meta_data.csv`` (0 video id, 1 split); frames
  ``Multi-sources/ms3_data/visual_frames/<id>/<id>.mp4_<k>.png``, masks
  ``.../gt_masks/<split>/<id>/<id>_<k>.png`` (5 in every split), audio ``.../audio_wav/<split>/<id>.wav``.

Clips are 5 s with one frame per second (5 segments). Media paths in the manifest are relative to
``data_root``; files are checked when extracted, not here, so a manifest can be built from the CSV alone.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ._registry import register_dataset
from .annotations import read_text, sha256_file
from .errors import AnnotationError
from .paths import check_media_id
from .schema import SPLITS, Clip, Manifest

S4_CATEGORIES = (
    "baby_laughter", "female_singing", "male_speech", "dog_barking", "cat_meowing", "lions_roaring",
    "horse_clip-clop", "coyote_howling", "mynah_bird_singing", "playing_acoustic_guitar", "playing_tabla",
    "playing_violin", "playing_piano", "playing_ukulele", "playing_glockenspiel", "helicopter", "race_car",
    "driving_buses", "ambulance_siren", "typing_on_computer_keyboard", "chainsawing_trees", "cap_gun_shooting",
    "lawn_mowing",
)
NUM_FRAMES = 5


@register_dataset("avsbench-s4", "AVSBench S4 single-source segmentation (user-supplied metadata and masks)")
def build_s4(data_root: str, meta_csv: str | None = None) -> Manifest:
    root = Path(data_root)
    meta = Path(meta_csv) if meta_csv else root / "Single-source" / "s4_meta_data.csv"
    cat_index = {c: i for i, c in enumerate(S4_CATEGORIES)}
    clips = []
    for n, row in _rows(meta, 4):
        name = check_media_id(row[0].strip(), source=f"{meta}:{n}")
        category, split = row[2].strip(), _split(row[3], meta, n)
        if category not in cat_index:
            raise AnnotationError(meta, n, f"unknown category {category!r}",
                                  f"use one of the 23 S4 categories: {', '.join(S4_CATEGORIES)}")
        base = f"Single-source/s4_data/{{}}/{split}/{category}/{name}"
        frames = base.format("visual_frames")
        masks = [f"{base.format('gt_masks')}/{name}_{k}.png" for k in (1,) if split == "train"] or \
                [f"{base.format('gt_masks')}/{name}_{k}.png" for k in range(1, NUM_FRAMES + 1)]
        clips.append(Clip(
            clip_id=name, splits=(split,), num_segments=NUM_FRAMES, duration=float(NUM_FRAMES),
            media={"frames": frames, "audio": f"Single-source/s4_data/audio_wav/{split}/{category}/{name}.wav"},
            labels={"category": cat_index[category], "masks": masks},
        ))
    return Manifest("avsbench-s4", tuple(clips), {"category": S4_CATEGORIES}, "linspace",
                    source={meta.name: sha256_file(meta)}, options={"meta_csv": str(meta)})


@register_dataset("avsbench-ms3", "AVSBench MS3 multi-source segmentation (user-supplied metadata and masks)")
def build_ms3(data_root: str, meta_csv: str | None = None) -> Manifest:
    root = Path(data_root)
    meta = Path(meta_csv) if meta_csv else root / "Multi-sources" / "ms3_meta_data.csv"
    clips = []
    for n, row in _rows(meta, 2):
        vid = check_media_id(row[0].strip(), source=f"{meta}:{n}")
        split = _split(row[1], meta, n)
        clips.append(Clip(
            clip_id=vid, splits=(split,), num_segments=NUM_FRAMES, duration=float(NUM_FRAMES),
            media={"frames": f"Multi-sources/ms3_data/visual_frames/{vid}",
                   "audio": f"Multi-sources/ms3_data/audio_wav/{split}/{vid}.wav"},
            labels={"masks": [f"Multi-sources/ms3_data/gt_masks/{split}/{vid}/{vid}_{k}.png"
                              for k in range(1, NUM_FRAMES + 1)]},
        ))
    return Manifest("avsbench-ms3", tuple(clips), {}, "linspace",
                    source={meta.name: sha256_file(meta)}, options={"meta_csv": str(meta)})


def _rows(path: Path, min_columns: int):
    """(line number, fields) of a comma-separated metadata file, header skipped."""
    text = read_text(path, "pass data_root = the AVSBench data folder (or meta_csv = the metadata CSV) "
                           "obtained from the AVSBench authors")
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2:
        raise AnnotationError(path, None, "no clips below the header", "give the official metadata CSV")
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < min_columns:
            raise AnnotationError(path, n, f"expected at least {min_columns} columns, found {len(row)}",
                                  "keep the official column order")
        yield n, row


def _split(value: str, path: Path, n: int) -> str:
    split = value.strip()
    if split not in SPLITS:
        raise AnnotationError(path, n, f"split {split!r} is not train, val or test", "correct the split column")
    return split
