"""MUSIC-AVQA (Li et al., CVPR 2022): questions about ~60-s music videos, 42 answers, 9 question types.

The val and test questions ship with the package in both official releases: ``json`` (the original,
used by MUSIC-AVQA, LAVISH and DG-SCT; 4595 / 9185 questions) and ``json_update`` (duplicates removed
and 26 answers corrected, used by AVMoE; 4568 / 9129). The training questions (``avqa-train.json``,
32087) are too large to ship: pass ``train_json=PATH``. Questions keep their file order, duplicates
included, because the reference evaluation walks the file by position.

The unit of split is the question: a video may serve val and test questions (2296 do), so a clip's
``splits`` lists every split that asks about it. Rows are videos in order of first appearance
(train, val, test). Ten 1-s segments are spread evenly over each 60-s video; a waveform file of the
reference layout (``audio_wave/<id>.npy``, 10 s) holds the ten audio segments back to back.
Media: ``frames/<video_id>/``, ``audio_wave/<video_id>.npy``, ``videos/<video_id>.<ext>``.
Vocabularies: ``answer`` (42, the loaders' first-appearance order) and ``question_word`` (93,
index 0 = ``<pad>``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ._registry import register_dataset
from .annotations import find_file, packaged, read_text, sha256_file
from .errors import AnnotationError, ManifestError
from .paths import check_media_id
from .schema import Clip, Manifest, Question

log = logging.getLogger(__name__)

AVQA_VERSIONS = ("json", "json_update")
AVQA_TYPES = {
    ("Audio", "Counting"), ("Audio", "Comparative"), ("Visual", "Counting"), ("Visual", "Location"),
    ("Audio-Visual", "Existential"), ("Audio-Visual", "Counting"), ("Audio-Visual", "Location"),
    ("Audio-Visual", "Comparative"), ("Audio-Visual", "Temporal"),
}
NUM_SEGMENTS = 10
VIDEO_SECONDS = 60.0
_PLACEHOLDER = re.compile(r"<[^<>]+>")


@register_dataset("music-avqa", "MUSIC-AVQA question answering: 42 answers, 9 question types")
def build_music_avqa(train_json: str | None = None, version: str = "json", annotations: str | None = None
                     ) -> Manifest:
    """Manifest of MUSIC-AVQA: packaged val/test questions of ``version`` plus the user's train JSON."""
    if version not in AVQA_VERSIONS:
        raise ManifestError(f"version {version!r} is unknown. Fix: use one of {', '.join(AVQA_VERSIONS)}")
    folder = Path(annotations) if annotations else packaged("music-avqa")
    if train_json is None:
        log.warning("music-avqa: no train_json given, so the manifest has val and test questions only "
                    "(pass train_json=PATH to avqa-train.json to train)")
    return parse_avqa_folder(folder, version, train_json, "music-avqa", VIDEO_SECONDS)


def parse_avqa_folder(folder: Path, version: str, train_json: str | Path | None, dataset: str,
                      seconds: float = VIDEO_SECONDS) -> Manifest:
    """Parse MUSIC-AVQA-format files (vocabularies, ``<version>/avqa-{val,test}.json``, a train JSON)."""
    fix = f"give a folder with the MUSIC-AVQA annotation files ({folder} is incomplete)"
    answers = _vocab(folder / "ans_vocab.txt", fix)
    words = _vocab(folder / "ques_vocab.txt", fix)[:93]
    answer_index = {a: i for i, a in enumerate(answers)}
    word_set = set(words)

    sources: dict[str, Path] = {}
    if train_json is not None:
        sources["train"] = Path(train_json)
    for split in ("val", "test"):
        sources[split] = find_file(folder / version, f"avqa-{split}.json", fix)

    clip_of: dict[str, int] = {}
    clip_splits: list[set[str]] = []
    questions: list[Question] = []
    for split, path in sources.items():
        for k, rec in enumerate(_records(path)):
            q = _question(rec, path, k, split, answer_index, word_set, clip_of, clip_splits)
            questions.append(q)
    clips = tuple(
        Clip(clip_id=vid, splits=tuple(s for s in ("train", "val", "test") if s in clip_splits[i]),
             num_segments=NUM_SEGMENTS, duration=float(seconds),
             media={"frames": f"frames/{vid}", "audio": f"audio_wave/{vid}.npy", "video": f"videos/{vid}"})
        for vid, i in clip_of.items()
    )
    return Manifest(
        dataset=dataset, clips=clips, vocabularies={"answer": answers, "question_word": words},
        frame_rule="linspace", questions=tuple(questions),
        source={f"{s}:{p.name}": sha256_file(p) for s, p in sources.items()},
        options={"version": version, "train_json": str(train_json) if train_json else None},
    )


SYNTHETIC_FILES = tuple(f"avqa-{split}_fake.json" for split in ("train", "val", "test"))


def synthetic_videos(folder: Path | None = None) -> frozenset[str]:
    """IDs of MUSIC-AVQA's synthetic videos (pieced together from solo recordings; 1866 of them): every
    ``video_id`` of the official ``json/avqa-{train,val,test}_fake.json`` in ``folder`` (default: the
    packaged copies).

    Why: the reference grounding pre-training (``grounding_gen`` of MUSIC-AVQA, reused by LAVISH and
    DG-SCT) trains and validates on the real videos only (``avqa-{train,val}_real.json``), and the same
    video IDs hold in both releases.
    """
    folder = Path(folder) if folder is not None else packaged("music-avqa") / "json"
    fix = "reinstall mettle (its packaged MUSIC-AVQA files are incomplete)"
    return frozenset(str(rec["video_id"]) for name in SYNTHETIC_FILES
                     for rec in _records(find_file(folder, name, fix)))


def _vocab(path: Path, fix: str) -> tuple[str, ...]:
    return tuple(ln.strip() for ln in read_text(path, fix).splitlines() if ln.strip())


def _records(path: Path) -> list[dict]:
    text = read_text(path, f"give the path of the MUSIC-AVQA question file {path.name}")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(path, e.lineno, f"invalid JSON ({e.msg})", "give the official question file") from None
    if not isinstance(records, list):
        raise AnnotationError(path, None, "top level is not a list of questions", "give the official question file")
    return records


def _question(rec: dict, path: Path, k: int, split: str, answer_index: dict[str, int], words: set[str],
              clip_of: dict[str, int], clip_splits: list[set[str]]) -> Question:
    """One validated Question; errors name the record (0-based position in the file)."""
    where = f"record {k}"

    def bad(problem: str, fix: str = "correct the record") -> AnnotationError:
        return AnnotationError(path, None, f"{where}: {problem}", fix)

    try:
        vid = check_media_id(str(rec["video_id"]), source=f"{path} {where}")
        qtype = tuple(json.loads(rec["type"]))
        values = tuple(json.loads(rec["templ_values"]))
        template, answer, qid = rec["question_content"], rec["anser"], int(rec["question_id"])
    except KeyError as e:
        raise bad(f"missing field {e}", "keep the seven official fields") from None
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise bad(f"malformed field ({e})", "type and templ_values must be JSON lists in strings") from None
    if qtype not in AVQA_TYPES:
        raise bad(f"unknown question type {list(qtype)}")
    if answer not in answer_index:
        raise bad(f"answer {answer!r} is not in the 42-answer vocabulary")
    if len(_PLACEHOLDER.findall(template)) != len(values):
        raise bad(f"{len(_PLACEHOLDER.findall(template))} placeholders but {len(values)} template values")
    if vid not in clip_of:
        clip_of[vid] = len(clip_splits)
        clip_splits.append(set())
    clip_splits[clip_of[vid]].add(split)
    q = Question(qid, clip_of[vid], split, qtype, template, tuple(str(v) for v in values), answer_index[answer])
    unknown = [w for w in q.words() if w not in words]
    if unknown:
        raise bad(f"word {unknown[0]!r} is not in the question vocabulary")
    return q
