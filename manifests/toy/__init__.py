"""The embedded toy dataset: a deterministic AVE-format dataset generated on first use.

48 clips of 10 s (32/8/8), 4 events + background; an event is a coloured moving shape and a
matching sound, with distractors (sound without picture and the reverse) so both modalities are
needed. It is the default of the demo and the fixture of the tests. Variants in other datasets'
formats: ``toy-llp`` (``llp.py``), ``toy-avqa`` (``avqa.py``) and ``toy-avs`` (``avs.py``).
"""

from __future__ import annotations

from pathlib import Path

from .._registry import register_dataset
from ..ave import parse_ave_folder
from ..schema import Manifest
from .generate import ToyParams, generate_toy
from .avqa import build_toy_avqa, generate_toy_avqa  # registers toy-avqa
from .avs import TOY_S4_CATEGORIES, build_toy_avs, generate_toy_avs  # registers toy-avs
from .llp import TOY_LLP_CLASSES, build_toy_llp, generate_toy_llp  # registers toy-llp
from .synth import TOY_CLASSES

DEFAULT_ROOT = "data/toy"


@register_dataset("toy", "embedded toy dataset in AVE format (generated on first use)")
def build_toy(data_root: str = DEFAULT_ROOT, num_clips: int = 48, seed: int = 0, frames: bool = False) -> Manifest:
    """Generate the toy dataset into ``data_root`` if it is not there yet, then parse it as AVE."""
    root = generate_toy(data_root, ToyParams(num_clips=int(num_clips), seed=int(seed), frames=bool(frames)))
    m = parse_ave_folder(Path(root), dataset="toy", num_segments=10)
    return Manifest(m.dataset, m.clips, m.vocabularies, m.frame_rule, m.questions, m.source,
                    {**m.options, "num_clips": int(num_clips), "seed": int(seed)})


__all__ = ["DEFAULT_ROOT", "TOY_CLASSES", "TOY_S4_CATEGORIES", "build_toy_avs", "generate_toy_avs", "TOY_LLP_CLASSES", "ToyParams", "build_toy", "build_toy_avqa", "build_toy_llp", "generate_toy",
           "generate_toy_avqa", "generate_toy_llp"]
