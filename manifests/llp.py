"""LLP (Look, Listen and Parse; AVVP, Tian et al., ECCV 2020): 11849 clips of 10 s, 25 classes.

Training clips carry weak video-level labels only; val and test clips also carry the
segment-level audio and visual events of ``AVVP_eval_audio.csv`` / ``AVVP_eval_visual.csv``
(tab-separated ``filename onset offset event_labels``, event covers segments onset..offset-1).

Eval rows are matched to clips by exact filename, as the official evaluation does, so rows whose
filename matches no clip (truncated ids upstream; the corrupted rows of the older copy) are
dropped, and so are rows with ``offset <= onset`` (they mark no segment in the official
evaluation: ``GT[c, onset:offset]`` is empty); both counts are kept in ``Manifest.options``. ``eval_audio="upstream"`` (default) is the
2024-fixed file, ``"dgsct"`` the older copy the DG-SCT/AVMoE results were computed with.

Clip ids are the filenames ``<YouTube id>_<start>_<end>``; frames and waves are keyed by the
11-character YouTube id as the reference loaders do; raw videos by the full filename.
"""

from __future__ import annotations

from pathlib import Path

from ._registry import register_dataset
from .annotations import packaged, read_text, sha256_file
from .errors import AnnotationError, ManifestError
from .paths import check_media_id
from .schema import Clip, Manifest

LLP_CLASSES = (
    "Speech", "Car", "Cheering", "Dog", "Cat", "Frying_(food)", "Basketball_bounce", "Fire_alarm",
    "Chainsaw", "Cello", "Banjo", "Singing", "Chicken_rooster", "Violin_fiddle", "Vacuum_cleaner",
    "Baby_laughter", "Accordion", "Lawn_mower", "Motorcycle", "Helicopter", "Acoustic_guitar",
    "Telephone_bell_ringing", "Baby_cry_infant_cry", "Blender", "Clapping",
)
LLP_SPLIT_FILES = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}
LLP_SPLIT_SIZES = {"train": 10000, "val": 649, "test": 1200}
EVAL_AUDIO = {"upstream": "AVVP_eval_audio.csv", "dgsct": "dgsct_avmoe_copy/AVVP_eval_audio.csv"}
NUM_SEGMENTS = 10


@register_dataset("llp", "LLP audio-visual video parsing: 11849 clips, 25 classes, weak labels + eval events")
def build_llp(annotations: str | None = None, eval_audio: str = "upstream") -> Manifest:
    """Manifest of LLP; rows are the train, val and test files in their own order.

    The packaged files must give the official split sizes; a user folder in the same format may
    hold any subset or re-split (the toy LLP variant is one).
    """
    if eval_audio not in EVAL_AUDIO:
        raise ManifestError(f"eval_audio {eval_audio!r} is unknown. Fix: use one of {', '.join(EVAL_AUDIO)}")
    if annotations is None:
        return parse_llp_folder(packaged("llp"), "llp", EVAL_AUDIO[eval_audio], LLP_SPLIT_SIZES,
                                {"eval_audio": eval_audio})
    return parse_llp_folder(Path(annotations), "llp", EVAL_AUDIO[eval_audio], None, {"eval_audio": eval_audio})


def parse_llp_folder(folder: Path, dataset: str, eval_audio_file: str = EVAL_AUDIO["upstream"],
                     expected_sizes: dict[str, int] | None = None, options: dict | None = None) -> Manifest:
    """Parse an LLP-format annotation folder (split CSVs + segment-level eval CSVs) into a manifest."""
    fix = f"give a folder with the LLP annotation files ({folder} is incomplete)"
    class_index = {c: i for i, c in enumerate(LLP_CLASSES)}

    clips: list[Clip] = []
    where: dict[str, int] = {}
    for split, name in LLP_SPLIT_FILES.items():
        path = folder / name
        for n, fields in _tsv(path, read_text(path, fix), 2):
            filename, labels = fields
            if filename in where:
                raise AnnotationError(path, n, f"{filename} is already listed (clip {where[filename]})",
                                      "splits must be disjoint and list each video once")
            vid = check_media_id(filename[:11], source=f"{path}:{n}")
            check_media_id(filename, source=f"{path}:{n}")
            video_labels = sorted({_class(class_index, c, path, n) for c in labels.split(",")})
            where[filename] = len(clips)
            clips.append(Clip(
                clip_id=filename, splits=(split,), num_segments=NUM_SEGMENTS, duration=float(NUM_SEGMENTS),
                media={"frames": f"frames/{vid}", "audio": f"wave/{vid}.npy", "video": f"videos/{filename}"},
                labels={"video_labels": video_labels},
            ))
        if expected_sizes and sum(c.splits == (split,) for c in clips) != expected_sizes[split]:
            raise AnnotationError(path, None, f"{sum(c.splits == (split,) for c in clips)} clips, "
                                  f"expected {expected_sizes[split]}", "use the official split file")

    events: dict[str, dict[int, list[list[int]]]] = {}
    unmatched: dict[str, int] = {}
    empty: dict[str, int] = {}
    for key, name in (("audio_events", eval_audio_file), ("visual_events", "AVVP_eval_visual.csv")):
        path = folder / name
        per_clip: dict[int, list[list[int]]] = {}
        unmatched[key] = empty[key] = 0
        for n, (filename, onset, offset, label) in _tsv(path, read_text(path, fix), 4):
            try:
                on, off = int(onset), int(offset)
            except ValueError:
                raise AnnotationError(path, n, f"onset/offset {onset!r}/{offset!r} are not integers",
                                      "use whole seconds") from None
            if not (0 <= on <= NUM_SEGMENTS and 0 <= off <= NUM_SEGMENTS):
                raise AnnotationError(path, n, f"event [{on}, {off}) outside 0..{NUM_SEGMENTS}",
                                      "use 0 <= onset < offset <= 10")
            cls = _class(class_index, label, path, n)
            if off <= on:
                empty[key] += 1
                continue
            if filename not in where:
                unmatched[key] += 1
                continue
            per_clip.setdefault(where[filename], []).append([cls, on, off])
        events[key] = per_clip

    for i, c in enumerate(clips):
        if c.splits[0] != "train":
            c.labels["audio_events"] = events["audio_events"].get(i, [])
            c.labels["visual_events"] = events["visual_events"].get(i, [])
        elif i in events["audio_events"] or i in events["visual_events"]:
            raise ManifestError(f"{c.clip_id}: a training clip has segment-level eval events. "
                                "Fix: use the official eval files (they cover val and test only)")

    files = list(LLP_SPLIT_FILES.values()) + [eval_audio_file, "AVVP_eval_visual.csv"]
    return Manifest(
        dataset=dataset, clips=tuple(clips), vocabularies={"event": LLP_CLASSES}, frame_rule="first",
        source={f: sha256_file(folder / f) for f in files},
        options={**(options or {}), "unmatched_eval_rows": unmatched, "empty_eval_rows": empty},
    )


def _tsv(path: Path, text: str, width: int):
    """(line number, fields) of a tab-separated file with one header line."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("filename"):
        raise AnnotationError(path, 1, "missing the header line starting with 'filename'",
                              "give the official tab-separated file")
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != width:
            raise AnnotationError(path, n, f"expected {width} tab-separated fields, found {len(fields)}",
                                  "keep the official columns")
        yield n, fields


def _class(class_index: dict[str, int], name: str, path: Path, n: int) -> int:
    try:
        return class_index[name]
    except KeyError:
        raise AnnotationError(path, n, f"unknown class {name!r}", f"use one of the 25 LLP classes: "
                              f"{', '.join(LLP_CLASSES)}") from None
