"""The toy dataset in AVSBench S4 format: two objects on screen, one of them sounding, and its mask.

Each 5-s clip shows two toy objects of different classes side by side; one of them makes its
sound (in most seconds; a silent second has an empty mask). The mask of a second covers the
sounding object, so the task cannot be solved from pictures alone: which object is the source
changes from clip to clip and only the sound tells. Written exactly as AVSBench lays out S4, with
the toy classes mapped onto S4 categories (``TOY_S4_CATEGORIES``)::

    Single-source/s4_meta_data.csv                                   name,start,category,split
    Single-source/s4_data/visual_frames/<split>/<category>/<name>/<name>_<k>.png   224 x 224, k = 1..5
    Single-source/s4_data/gt_masks/<split>/<category>/<name>/<name>_<k>.png        1-bit (train: k = 1)
    Single-source/s4_data/audio_wav/<split>/<category>/<name>.wav                   16 kHz mono PCM
"""

from __future__ import annotations

import json
import logging
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np

from .._registry import register_dataset
from ..avsbench import build_s4
from ..schema import Manifest
from .generate import DONE_FILE, ToyParams, begin, split_of
from .synth import _COLOURS, TOY_CLASSES, ClipScript, render_audio

log = logging.getLogger(__name__)

TOY_S4_CATEGORIES = ("playing_glockenspiel", "ambulance_siren", "race_car", "playing_tabla")  # bell siren engine drum
SIZE = 224
SECONDS = 5
AUDIO_RATE = 16000


def object_mask(cls: int, cx: float, cy: float, size: int = SIZE, r: float = 0.14) -> np.ndarray:
    """Boolean mask of toy object ``cls`` centred at (cx, cy) (fractions of the frame)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    u, v = xx - cx, yy - cy
    if cls == 0:
        return u ** 2 + v ** 2 < r ** 2
    if cls == 1:
        return (np.abs(u) < r * 0.85) & (np.abs(v) < r * 0.85)
    if cls == 2:
        return (v > -r) & (v < r) & (np.abs(u) < (v + r) / 2)
    return (np.abs(v) < r * 0.35) & (np.abs(u) < r * 1.1)


def _clip(rng: np.random.Generator, seed: int):
    a, b = rng.choice(len(TOY_CLASSES), 2, replace=False)
    left = rng.random() < 0.5
    pos = {int(a): (0.28 if left else 0.72, 0.5 + 0.2 * (rng.random() - 0.5)),
           int(b): (0.72 if left else 0.28, 0.5 + 0.2 * (rng.random() - 0.5))}
    sounding = [int(a) if rng.random() < 0.85 else -1 for _ in range(SECONDS)]
    if all(s < 0 for s in sounding):
        sounding[0] = int(a)
    return int(a), pos, sounding


def _frames_and_masks(rng, pos, sounding):
    texture = 110 + 25 * rng.standard_normal((SIZE, SIZE, 1)).astype(np.float32)
    frames, masks = [], []
    for k in range(SECONDS):
        img = np.repeat(texture, 3, axis=2) + 6 * rng.standard_normal((SIZE, SIZE, 1)).astype(np.float32)
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        for cls, (cx, cy) in pos.items():
            shape = object_mask(cls, cx + 0.02 * np.sin(k), cy)
            img[shape] = _COLOURS[cls]
            if cls == sounding[k]:
                mask |= shape
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(mask)
    return frames, masks


def _write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def generate_toy_avs(root: str | Path, params: ToyParams = ToyParams(), overwrite: bool = False) -> Path:
    """Generate the AVSBench-S4-format toy dataset into ``root`` (skipped when a complete one is there)."""
    from PIL import Image

    root = Path(root)
    marker = begin(root, params, "avsbench-s4", "Single-source", overwrite)
    if marker is None:
        return root
    rng = np.random.default_rng(params.seed + 3_000_017)
    base = root / "Single-source"
    data = base / "s4_data"
    rows = ["name,start_time,category,split"]
    for i in range(params.num_clips):
        split = split_of(i)
        name = f"toyavs{params.seed:02d}_{i:04d}"
        cls, pos, sounding = _clip(rng, i)
        category = TOY_S4_CATEGORIES[cls]
        rows.append(f"{name},0,{category},{split}")
        frames, masks = _frames_and_masks(rng, pos, sounding)
        fdir = data / "visual_frames" / split / category / name
        mdir = data / "gt_masks" / split / category / name
        fdir.mkdir(parents=True)
        mdir.mkdir(parents=True)
        for k in range(SECONDS):
            Image.fromarray(frames[k]).save(fdir / f"{name}_{k + 1}.png")
            if split != "train" or k == 0:
                Image.fromarray(masks[k]).convert("1").save(mdir / f"{name}_{k + 1}.png")
        script = ClipScript(cls, 0, 0, tuple(sounding), tuple(sounding), params.seed * 100_057 + i)
        _write_wav(data / "audio_wav" / split / category / f"{name}.wav", render_audio(script, AUDIO_RATE), AUDIO_RATE)
    (base / "s4_meta_data.csv").write_text("\n".join(rows) + "\n")
    (root / DONE_FILE).write_text(json.dumps(marker))
    return root


@register_dataset("toy-avs", "toy dataset in AVSBench S4 format (generated on first use): sounding-object masks")
def build_toy_avs(data_root: str = "data/toy-avs", num_clips: int = 48, seed: int = 0) -> Manifest:
    """Generate the AVSBench-format toy dataset into ``data_root`` if needed, then parse it as S4."""
    root = generate_toy_avs(data_root, ToyParams(num_clips=int(num_clips), seed=int(seed)))
    m = build_s4(str(root))
    return replace(m, dataset="toy-avs", options={"num_clips": int(num_clips), "seed": int(seed)})
