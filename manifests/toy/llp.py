"""The toy dataset in LLP (AVVP) format: weak video labels for training, segment-level audio and
visual events for val/test, so the video-parsing task runs end to end on generated data.

Same pictures and sounds as the AVE toy, but sound and picture events are drawn independently
(``make_parse_script``): clips mix audio-only, visual-only and audio-visual events, which is what
AVVP has to tell apart. The four toy events carry LLP class names (``TOY_LLP_CLASSES``), so the
files are real LLP files and the ``llp`` parser reads them::

    AVVP_train.csv, AVVP_val_pd.csv, AVVP_test_pd.csv   filename<TAB>event_labels (header row)
    AVVP_eval_audio.csv, AVVP_eval_visual.csv           filename onset offset event_labels (val/test)
    videos/<filename>.mp4, frames/<id>/%08d.jpg (1 fps, optional), wave/<id>.npy (optional)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .._registry import register_dataset
from ..llp import LLP_SPLIT_FILES, parse_llp_folder
from ..schema import Manifest
from .generate import DONE_FILE, ToyParams, begin, split_of, write_media
from .synth import make_parse_script, runs

log = logging.getLogger(__name__)

TOY_LLP_CLASSES = ("Telephone_bell_ringing", "Fire_alarm", "Motorcycle", "Basketball_bounce")  # bell siren engine drum


def generate_toy_llp(root: str | Path, params: ToyParams = ToyParams(), overwrite: bool = False,
                     processes: int = 1) -> Path:
    """Generate the LLP-format toy dataset into ``root`` (skipped when a complete one is there)."""
    root = Path(root)
    marker = begin(root, params, "llp", "AVVP_train.csv", overwrite)
    if marker is None:
        return root
    rng = np.random.default_rng(params.seed + 1_000_003)
    names = [f"toyllp{params.seed % 100:02d}{i:03d}_0_{params.seconds}" for i in range(params.num_clips)]
    scripts = [make_parse_script(rng, params.seconds, params.seed * 100_019 + i) for i in range(params.num_clips)]
    splits = {"train": [], "val": [], "test": []}
    for i in range(params.num_clips):
        splits[split_of(i)].append(i)
    events = {"audio": [], "visual": []}
    for split, idx in splits.items():
        lines = ["filename\tevent_labels"]
        for i in idx:
            classes = sorted({c for c in scripts[i].audible + scripts[i].visible if c >= 0})
            lines.append(f"{names[i]}\t{','.join(TOY_LLP_CLASSES[c] for c in classes)}")
            if split != "train":
                for modality, track in (("audio", scripts[i].audible), ("visual", scripts[i].visible)):
                    events[modality] += [f"{names[i]}\t{on}\t{off}\t{TOY_LLP_CLASSES[c]}" for c, on, off in runs(track)]
        (root / LLP_SPLIT_FILES[split]).write_text("\n".join(lines) + "\n")
    for modality, rows in events.items():
        (root / f"AVVP_eval_{modality}.csv").write_text("\n".join(["filename\tonset\toffset\tevent_labels", *rows]) + "\n")
    # LLP's frame folders hold 1 fps: the middle frame of each second
    write_media(root, params, [(script, f"videos/{name}.mp4", f"frames/{name[:11]}", f"wave/{name[:11]}.npy",
                                params.fps) for name, script in zip(names, scripts)], processes)
    (root / DONE_FILE).write_text(json.dumps(marker))
    return root


@register_dataset("toy-llp", "toy dataset in LLP format (generated on first use): weak labels + eval events")
def build_toy_llp(data_root: str = "data/toy-llp", num_clips: int = 48, seed: int = 0, frames: bool = False
                  ) -> Manifest:
    """Generate the LLP-format toy dataset into ``data_root`` if needed, then parse it as LLP."""
    root = generate_toy_llp(data_root, ToyParams(num_clips=int(num_clips), seed=int(seed), frames=bool(frames)))
    return parse_llp_folder(root, "toy-llp", options={"num_clips": int(num_clips), "seed": int(seed)})
