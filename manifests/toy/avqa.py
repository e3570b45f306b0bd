"""The toy dataset in MUSIC-AVQA format: questions about which sound happens, how many, and when.

Clips show one or two objects, each usually heard while shown (``make_qa_script``), so sound and
picture correspond as in a music video. Each clip gets five questions of four official types,
answered from its script:

* Audio-Visual / Existential: "Is the <Object> in the video making sound?" (yes when the object's
  picture and sound are there in the same second), asked for a visible object and a random one;
* Audio / Counting: "How many kinds of sounds are there?" (one / two);
* Visual / Counting: "How many kinds of objects appear?" (one / two);
* Audio-Visual / Temporal: "Which object makes sound first?" (an object name).

Files, as MUSIC-AVQA ships them: ``ans_vocab.txt``, ``ques_vocab.txt`` (``<pad>`` first),
``json/avqa-{val,test}.json``, ``avqa-train.json``; media ``videos/<id>.mp4`` and optionally
``frames/<id>/`` and ``audio_wave/<id>.npy``. Clips are 10 s (the real videos are ~60 s; the
segment sampling spreads 10 one-second segments over whatever the clip lasts).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from .._registry import register_dataset
from ..avqa import parse_avqa_folder
from ..schema import Manifest
from .generate import DONE_FILE, ToyParams, begin, split_of, write_media
from .synth import TOY_CLASSES, ClipScript, make_qa_script

log = logging.getLogger(__name__)

NUMBERS = ("zero", "one", "two", "three", "four")
TEMPLATES = {
    "exist": (("Audio-Visual", "Existential"), "Is the <Object> in the video making sound?"),
    "sounds": (("Audio", "Counting"), "How many kinds of sounds are there?"),
    "objects": (("Visual", "Counting"), "How many kinds of objects appear?"),
    "first": (("Audio-Visual", "Temporal"), "Which object makes sound first?"),
}
ANSWERS = ("yes", "no", *NUMBERS[1:4], *TOY_CLASSES)


def questions_for(script: ClipScript, rng: np.random.Generator) -> list[tuple[str, tuple[str, ...], str]]:
    """(template key, template values, answer) of one clip's five questions."""
    visible = sorted({c for c in script.visible if c >= 0})
    audible = [c for c in script.audible if c >= 0]
    both = {v for v, a in zip(script.visible, script.audible) if v == a and v >= 0}
    pool = sorted(both) if both and rng.random() < 0.7 else visible  # keep "yes" answers common
    asked = [pool[int(rng.integers(len(pool)))] if pool else int(rng.integers(len(TOY_CLASSES))),
             int(rng.integers(len(TOY_CLASSES)))]
    out = [("exist", (TOY_CLASSES[c],), "yes" if c in both else "no") for c in asked]
    out.append(("sounds", (), NUMBERS[len(set(audible))]))
    out.append(("objects", (), NUMBERS[len(visible)]))
    out.append(("first", (), TOY_CLASSES[audible[0]]))
    return out


def generate_toy_avqa(root: str | Path, params: ToyParams = ToyParams(), overwrite: bool = False,
                      processes: int = 1) -> Path:
    """Generate the MUSIC-AVQA-format toy dataset into ``root`` (skipped when a complete one is there)."""
    root = Path(root)
    marker = begin(root, params, "music-avqa", "ans_vocab.txt", overwrite)
    if marker is None:
        return root
    rng = np.random.default_rng(params.seed + 2_000_003)
    ids = [f"toyavqa{params.seed:03d}_{i:04d}" for i in range(params.num_clips)]
    scripts = [make_qa_script(rng, params.seconds, params.seed * 100_043 + i) for i in range(params.num_clips)]
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    qid = 0
    for i, (vid, script) in enumerate(zip(ids, scripts)):
        split = split_of(i)
        for key, values, answer in questions_for(script, rng):
            qtype, template = TEMPLATES[key]
            records[split].append({"video_id": vid, "question_id": qid, "type": json.dumps(list(qtype)),
                                   "question_content": template, "templ_values": json.dumps(list(values)),
                                   "question_deleted": 0, "anser": answer})
            qid += 1
    words = ["<pad>"] + sorted({w for _, t in TEMPLATES.values() for w in t.rstrip("?").split(" ")
                                if not w.startswith("<")} | set(TOY_CLASSES))
    (root / "ans_vocab.txt").write_text("\n".join(ANSWERS) + "\n")
    (root / "ques_vocab.txt").write_text("\n".join(words) + "\n")
    (root / "json").mkdir()
    (root / "avqa-train.json").write_text(json.dumps(records["train"], indent=1))
    for split in ("val", "test"):
        (root / "json" / f"avqa-{split}.json").write_text(json.dumps(records[split], indent=1))
    write_media(root, params, [(script, f"videos/{vid}.mp4", f"frames/{vid}", f"audio_wave/{vid}.npy", params.fps)
                               for vid, script in zip(ids, scripts)], processes)
    (root / DONE_FILE).write_text(json.dumps(marker))
    return root


@register_dataset("toy-avqa", "toy dataset in MUSIC-AVQA format (generated on first use): 5 questions per clip")
def build_toy_avqa(data_root: str = "data/toy-avqa", num_clips: int = 48, seed: int = 0, frames: bool = False
                   ) -> Manifest:
    """Generate the MUSIC-AVQA-format toy dataset into ``data_root`` if needed, then parse it."""
    root = generate_toy_avqa(data_root, ToyParams(num_clips=int(num_clips), seed=int(seed), frames=bool(frames)))
    m = parse_avqa_folder(root, "json", root / "avqa-train.json", "toy-avqa", seconds=10.0)
    return replace(m, options={"version": "json", "num_clips": int(num_clips), "seed": int(seed)})
