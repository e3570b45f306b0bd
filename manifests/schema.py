"""The manifest: the ordered, validated list of a dataset's clips, and its JSON form.

A manifest is what stage one extracts and what stage two trains on. Row ``i`` of every cache
array is ``manifest.clips[i]``, so the order is part of the contract and its sha256 identifies it.

Label contract (``Clip.labels``; keys present depend on the dataset, indices refer to
``Manifest.vocabularies``):

* ``segment_labels``: list[int], one class index per segment (AVE; background = last index of
  ``vocabularies["event"]``).
* ``event_class``: int, the clip's annotated event (AVE).
* ``video_labels``: list[int], sorted class indices present in the clip (LLP weak labels).
* ``audio_events`` / ``visual_events``: list of ``[class, onset, offset]`` with the event covering
  segments ``onset .. offset-1`` (LLP evaluation annotations, val/test only).
* ``category``: int index into ``vocabularies["category"]`` (AVSBench S4).
* ``masks``: list of relative paths of the ground-truth masks, frame order (AVSBench).

Media contract (``Clip.media``): relative paths under the user's data root. ``frames`` is a folder
of images, ``audio`` an audio file (``.npy`` waveform at 32 kHz, or any format PyAV decodes),
``video`` a path *without* extension (the reader tries the usual container extensions).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import ManifestError
from .paths import check_relative

SPLITS = ("train", "val", "test")
FRAME_RULES = ("linspace", "first")
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Clip:
    """One clip (one row of the cache).

    Attributes:
        clip_id: unique key of the clip inside the manifest.
        splits: the splits that use this clip (one for clip-level datasets; MUSIC-AVQA splits
            questions, so a video can serve several).
        num_segments: number of 1-s segments extracted from it (AVE 10, AVS 5, ...).
        duration: seconds of source media the segments are spread over.
        media: relative media paths, see the module docstring.
        labels: task labels, see the module docstring.
    """

    clip_id: str
    splits: tuple[str, ...]
    num_segments: int
    duration: float
    media: Mapping[str, str]
    labels: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Question:
    """A MUSIC-AVQA question about clip ``clip_index``.

    ``template`` keeps the official placeholders (``<Object>``, ``<LR>``, ...) and ``values`` their
    fill-in words in order; ``qtype`` is ``(modality, kind)``, e.g. ``("Audio-Visual", "Counting")``;
    ``answer`` is an index into ``vocabularies["answer"]``.
    """

    question_id: int
    clip_index: int
    split: str
    qtype: tuple[str, str]
    template: str
    values: tuple[str, ...]
    answer: int

    def words(self) -> list[str]:
        """The question as the reference loaders tokenise it.

        Split on spaces, drop the question mark of the last word, and replace each ``<...>``
        placeholder in order by its value. Surrounding whitespace is stripped first, as the reference
        loaders do (``rstrip()``): a few hundred official templates end in ``"? "``, which a bare
        ``split(" ")`` would turn into the out-of-vocabulary word ``"sound?"``.
        """
        words = self.template.strip().split(" ")
        if words[-1][-1:] in ("?", "\uff1f"):
            words[-1] = words[-1][:-1]
        values = iter(self.values)
        return [next(values) if w.startswith("<") and w.endswith(">") else w for w in words]


@dataclass(frozen=True)
class Manifest:
    """A dataset's clips in cache-row order, with everything needed to interpret their labels.

    Attributes:
        dataset: registry name (``ave``, ``llp``, ...).
        clips: the clips, in cache-row order.
        vocabularies: label name lists by role (``event``, ``answer``, ``question_word``, ...).
        frame_rule: how one frame per segment is picked from a frame folder or a decoded video:
            ``linspace`` (evenly spaced over all frames, as the AVE/AVQA loaders) or ``first``
            (the first ``num_segments`` frames, as the LLP loader).
        questions: MUSIC-AVQA questions (empty elsewhere).
        source: annotation file name -> sha256 of its bytes.
        options: the builder options that produced the manifest.
    """

    dataset: str
    clips: tuple[Clip, ...]
    vocabularies: Mapping[str, tuple[str, ...]]
    frame_rule: str = "linspace"
    questions: tuple[Question, ...] = ()
    source: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.clips)

    def indices(self, split: str | None = None) -> list[int]:
        """Cache rows of the clips used by ``split`` (all rows for None)."""
        if split is None:
            return list(range(len(self.clips)))
        if split not in SPLITS:
            raise ManifestError(f"unknown split {split!r}. Fix: use one of {', '.join(SPLITS)}")
        return [i for i, c in enumerate(self.clips) if split in c.splits]

    def split_sizes(self) -> dict[str, int]:
        """Clips per split (questions per split for question datasets)."""
        if self.questions:
            return {s: sum(q.split == s for q in self.questions) for s in SPLITS}
        return {s: sum(s in c.splits for c in self.clips) for s in SPLITS}

    def subset(self, rows: "list[int] | range") -> "Manifest":
        """A manifest of the clips at ``rows`` (in that order), keeping only their questions.

        Used by ``--limit``: the subset is a manifest in its own right (its own sha256), so a
        cache built from it never passes for one built from the full dataset.
        """
        rows = list(rows)
        new_index = {old: new for new, old in enumerate(rows)}
        if len(new_index) != len(rows) or any(not 0 <= r < len(self.clips) for r in rows):
            raise ManifestError(f"subset rows must be distinct and within 0..{len(self.clips) - 1}")
        questions = tuple(replace(q, clip_index=new_index[q.clip_index])
                          for q in self.questions if q.clip_index in new_index)
        options = {**self.options, "subset": f"{len(rows)} of {len(self.clips)} clips"}
        return replace(self, clips=tuple(self.clips[r] for r in rows), questions=questions, options=options)

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = MANIFEST_FORMAT
        return _plain(d)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal manifests give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("ascii")).hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        fmt = d.get("format")
        if fmt != MANIFEST_FORMAT:
            raise ManifestError(
                f"manifest format {fmt!r} is not supported (this mettle reads format {MANIFEST_FORMAT}). "
                "Fix: rebuild it with this version (mettle-manifest --dataset NAME --out FILE)"
            )
        try:
            clips = tuple(
                Clip(c["clip_id"], tuple(c["splits"]), int(c["num_segments"]), float(c["duration"]),
                     dict(c["media"]), dict(c["labels"]))
                for c in d["clips"]
            )
            questions = tuple(
                Question(int(q["question_id"]), int(q["clip_index"]), q["split"], tuple(q["qtype"]),
                         q["template"], tuple(q["values"]), int(q["answer"]))
                for q in d.get("questions", ())
            )
            m = cls(d["dataset"], clips, {k: tuple(v) for k, v in d["vocabularies"].items()},
                    d["frame_rule"], questions, dict(d["source"]), dict(d["options"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(
                f"manifest is missing or mistypes a field ({e!r}). Fix: rebuild it with mettle-manifest"
            ) from None
        m.validate()
        return m

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest is not valid JSON ({e}). Fix: rebuild it with mettle-manifest") from None

    # ----------------------------------------------------------------------------- checks
    def validate(self) -> "Manifest":
        """Check structure, ids, paths and label ranges; raise ManifestError naming the clip."""
        if self.frame_rule not in FRAME_RULES:
            raise ManifestError(f"frame_rule {self.frame_rule!r} is not one of {FRAME_RULES}")
        seen: set[str] = set()
        for i, c in enumerate(self.clips):
            where = f"{self.dataset} clip {i} ({c.clip_id!r})"
            if c.clip_id in seen:
                raise ManifestError(f"{where}: duplicate clip id. Fix: clip ids must be unique in a manifest")
            seen.add(c.clip_id)
            if not c.splits or any(s not in SPLITS for s in c.splits):
                raise ManifestError(f"{where}: splits {c.splits!r} must be a non-empty subset of {SPLITS}")
            if not self.questions and len(c.splits) != 1:
                raise ManifestError(f"{where}: belongs to splits {c.splits}; clip-level splits must be disjoint")
            if c.num_segments < 1 or c.duration <= 0:
                raise ManifestError(f"{where}: needs num_segments >= 1 and duration > 0")
            for p in c.media.values():
                check_relative(p, source=where)
            for p in c.labels.get("masks", ()):
                check_relative(p, source=where)
            self._check_labels(where, c)
        for j, q in enumerate(self.questions):
            where = f"{self.dataset} question {j} (id {q.question_id})"
            if not 0 <= q.clip_index < len(self.clips):
                raise ManifestError(f"{where}: clip_index {q.clip_index} out of range")
            if q.split not in self.clips[q.clip_index].splits:
                raise ManifestError(f"{where}: split {q.split!r} not among its clip's splits")
            _check_index(where, "answer", q.answer, self.vocabularies.get("answer", ()))
            if q.template.count("<") != len(q.values):
                raise ManifestError(f"{where}: {q.template.count('<')} placeholders but {len(q.values)} values")
        return self

    def _check_labels(self, where: str, c: Clip) -> None:
        lab = c.labels
        if "segment_labels" in lab:
            seg = lab["segment_labels"]
            if len(seg) != c.num_segments:
                raise ManifestError(f"{where}: {len(seg)} segment labels for {c.num_segments} segments")
            for v in seg:
                _check_index(where, "segment label", v, self.vocabularies["event"])
        if "event_class" in lab:
            _check_index(where, "event_class", lab["event_class"], self.vocabularies["event"])
        for v in lab.get("video_labels", ()):
            _check_index(where, "video label", v, self.vocabularies["event"])
        for key in ("audio_events", "visual_events"):
            for cls_, on, off in lab.get(key, ()):
                _check_index(where, key, cls_, self.vocabularies["event"])
                if not 0 <= on < off <= c.num_segments:
                    raise ManifestError(f"{where}: {key} [{on}, {off}) outside 0..{c.num_segments}")
        if "category" in lab:
            _check_index(where, "category", lab["category"], self.vocabularies["category"])


def _check_index(where: str, what: str, value: Any, vocab: tuple[str, ...]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(vocab):
        raise ManifestError(f"{where}: {what} {value!r} is not an index into a vocabulary of {len(vocab)}")


def _plain(x: Any) -> Any:
    """Tuples -> lists and mappings -> dicts, recursively, so that JSON round trips compare equal."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest JSON file written by :func:`save_manifest`."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest file {p} does not exist. Fix: build it with mettle-manifest --out {p}")
    return Manifest.from_json(p.read_text(encoding="ascii"))


def save_manifest(manifest: Manifest, path: str | Path) -> None:
    """Write the canonical JSON of ``manifest`` to ``path``."""
    Path(path).write_text(manifest.to_json(), encoding="ascii")
