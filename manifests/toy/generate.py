"""Write the toy dataset to disk in AVE's exact on-disk format.

Layout under ``root`` (the same as a real AVE download, so the same code paths read it)::

    Annotations.txt            Category&VideoID&Quality&StartTime&EndTime (with header)
    categories.txt             the 4 toy classes; index 4 is background
    {train,val,test}Set.txt    split rows, no header
    {train,val,test}_order.h5  dataset `order`: rows of Annotations.txt
    videos/<id>.mp4            MPEG-4 video (8 fps, 112x112) + AAC stereo audio at 44.1 kHz
    frames/<id>/%08d.jpg       (optional) 1 fps, the middle frame of each second, as 1-fps frame extraction writes
    wave/<id>.npy              (optional) 10 s mono float32 at 32 kHz
    toy.json                   generator parameters; written last, it marks the folder complete

Generation is deterministic: the same parameters give the same annotation files, the same
pixels and samples, and (with the same PyAV build) the same video bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import h5py
import numpy as np

from ..errors import ManifestError
from .synth import TOY_CLASSES, ClipScript, make_script, render_audio, render_frames

log = logging.getLogger(__name__)

DONE_FILE = "toy.json"
SPLIT_FRACTIONS = {"train": 4, "val": 1, "test": 1}  # 4:1:1 -> 32/8/8 clips for 48


@dataclass(frozen=True)
class ToyParams:
    """Parameters of a toy dataset; equal parameters give an identical dataset."""

    num_clips: int = 48
    seed: int = 0
    seconds: int = 10
    fps: int = 8
    size: int = 112
    audio_rate: int = 44100
    frames: bool = False

    def check(self) -> "ToyParams":
        if self.num_clips < 6 or self.num_clips % 6:
            raise ManifestError(f"num_clips={self.num_clips}: use a multiple of 6 (>= 6) so that the 4:1:1 "
                             "train/val/test split and the 4 classes stay balanced")
        if self.size % 16 or self.size < 32:
            raise ManifestError(f"size={self.size}: use a multiple of 16, at least 32")
        return self


def generate_toy(root: str | Path, params: ToyParams = ToyParams(), overwrite: bool = False,
                 processes: int = 1) -> Path:
    """Generate the toy dataset into ``root`` unless a complete one with the same parameters is there.

    Returns ``root``. A folder holding something else (another dataset, other parameters) is
    refused unless ``overwrite``. ``processes`` > 1 renders clips in that many processes (the same
    bytes: each clip depends only on its own script).
    """
    params.check()
    root = Path(root)
    if not prepare_folder(root, asdict(params), overwrite, "Annotations.txt"):
        return root
    log.info("generating the toy dataset (%d clips) in %s", params.num_clips, root)
    done = root / DONE_FILE

    rng = np.random.default_rng(params.seed)
    scripts = [make_script(rng, i % len(TOY_CLASSES), params.seconds, params.seed * 100_003 + i)
               for i in range(params.num_clips)]
    ids = [f"toy{params.seed:03d}_{i:04d}" for i in range(params.num_clips)]
    _write_annotations(root, ids, scripts, params)
    write_media(root, params, [(script, f"videos/{vid}.mp4", f"frames/{vid}", f"wave/{vid}.npy", params.fps)
                               for vid, script in zip(ids, scripts)], processes)
    done.write_text(json.dumps(asdict(params)))
    return root


MediaJob = tuple[ClipScript, str, str, str, int]  # write_clip_media's script, video, frames_dir, wave, frame_step


def write_media(root: Path, params: ToyParams, jobs: list[MediaJob], processes: int = 1) -> None:
    """Render and write every clip of ``jobs`` (see :func:`write_clip_media`), in ``processes`` processes.

    Why processes: rendering and encoding a clip (about 0.3 s of one core) holds Python's lock in
    PyAV, so threads would not help; a benchmark that wants hundreds of clips uses every core.
    Spawned, not forked: the caller may hold torch's threads, which a fork does not survive."""
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            write_clip_media(root, params, *job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            for done in [pool.submit(write_clip_media, root, params, *job) for job in jobs]:
                done.result()  # re-raises a clip's failure here
        except BaseException:  # a failure or Ctrl-C: drop the clips not started rather than render them first
            pool.shutdown(cancel_futures=True)
            raise


def write_clip_media(root: Path, params: ToyParams, script: ClipScript, video: str, frames_dir: str, wave: str,
                     frame_step: int = 1) -> None:
    """Render one clip and write its video; with ``params.frames`` also its frame folder (every
    ``frame_step``-th frame, from the middle of the first step: with ``frame_step`` = fps, the frame in the
    middle of each second, as a 1-fps extraction keeps) and its 32-kHz ``.npy`` wave, at the given paths
    under ``root``."""
    frames = render_frames(script, params.size, params.fps)
    write_video(root / video, frames, params.fps, render_audio(script, params.audio_rate), params.audio_rate)
    if params.frames:
        write_frame_folder(root / frames_dir, frames[frame_step // 2::frame_step])
        (root / wave).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / wave, render_audio(script, 32000), allow_pickle=False)


def begin(root: Path, params: ToyParams, fmt: str, signature_file: str, overwrite: bool) -> dict | None:
    """Start generating a toy variant in format ``fmt``: the done marker to write last, or None when a
    complete dataset with these parameters is already in ``root``."""
    params.check()
    marker = {"format": fmt, **asdict(params)}
    if not prepare_folder(root, marker, overwrite, signature_file):
        return None
    log.info("generating the %s-format toy dataset (%d clips) in %s", fmt, params.num_clips, root)
    return marker


def split_of(i: int) -> str:
    """Split of the i-th toy clip: blocks of 6 go 4 train, 1 val, 1 test (classes cycle through blocks)."""
    return "train" if i % 6 < 4 else "val" if i % 6 == 4 else "test"


def prepare_folder(root: Path, marker: dict, overwrite: bool, signature_file: str) -> bool:
    """True when ``root`` must be (re)generated; False when a complete dataset with ``marker`` is there.

    A complete toy dataset with other parameters, or a non-empty folder that holds no toy dataset
    (no ``signature_file``), is refused unless ``overwrite``.
    """
    done = root / DONE_FILE
    if done.is_file() and not overwrite:
        found = json.loads(done.read_text())
        if found == marker:
            return False
        raise FileExistsError(f"{root} holds a toy dataset with other parameters ({found}). "
                              "Fix: choose another folder, or delete this one to generate it again")
    if root.exists() and any(root.iterdir()):
        if not overwrite and not (root / signature_file).is_file():
            raise FileExistsError(f"{root} is not empty and holds no toy dataset. Fix: choose an empty folder")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    return True


def _write_annotations(root: Path, ids: list[str], scripts: list[ClipScript], params: ToyParams) -> None:
    rows = [f"{TOY_CLASSES[s.event]}&{vid}&good&{s.start}&{s.end}" for vid, s in zip(ids, scripts)]
    (root / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(rows) + "\n")
    (root / "categories.txt").write_text("\n".join(TOY_CLASSES) + "\n")
    # Splits: consecutive blocks of 6 clips go 4 train, 1 val, 1 test (classes cycle through blocks).
    order: dict[str, list[int]] = {s: [] for s in SPLIT_FRACTIONS}
    for i in range(len(ids)):
        order[split_of(i)].append(i)
    for split, rows_of_split in order.items():
        (root / f"{split}Set.txt").write_text("".join(rows[i] + "\n" for i in rows_of_split))
        with h5py.File(root / f"{split}_order.h5", "w") as f:
            f.create_dataset("order", data=np.asarray(rows_of_split, dtype=np.int64))


def write_video(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None, audio_rate: int) -> None:
    """Encode ``frames`` (N, H, W, 3) uint8 and optional mono ``audio`` into a video file.

    Video: MPEG-4 part 2 (always present in FFmpeg builds), single-threaded for determinism.
    Audio: AAC (FFmpeg's fast coder), stereo (the right channel slightly quieter), so readers must downmix.
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:  # container from the suffix (.mp4, .mkv, .avi)
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.bit_rate = 150_000
        vs.codec_context.thread_count = 1
        vs.codec_context.time_base = Fraction(1, fps)
        astream = None
        if audio is not None:
            astream = out.add_stream("aac", rate=audio_rate, layout="stereo")
            astream.bit_rate = 96_000
            # FFmpeg's fast AAC coder: the default (twoloop) took three quarters of the toy dataset's
            # generation time (0.35 s a 10-s clip); toy sounds need no better, and it is as deterministic
            astream.codec_context.options = {"aac_coder": "fast"}
        video_frames = []
        for k, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = k, Fraction(1, fps)
            video_frames.append(vf)
        _encode_all(out, vs, video_frames)
        if astream is not None:
            stereo = np.stack([audio, 0.9 * audio]).astype(np.float32)
            audio_frames = []
            for start in range(0, stereo.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, start:start + 1024]),
                                                format="fltp", layout="stereo")
                af.sample_rate, af.pts, af.time_base = audio_rate, start, Fraction(1, audio_rate)
                audio_frames.append(af)
            _encode_all(out, astream, audio_frames)


def _encode_all(out, stream, frames) -> None:
    """Encode ``frames`` on ``stream``, flush the encoder, and mux every packet into ``out``."""
    for frame in [*frames, None]:
        for packet in stream.encode(frame):
            out.mux(packet)


def write_frame_folder(folder: Path, frames: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(frames, start=1):
        Image.fromarray(img).save(folder / f"{k:08d}.jpg", quality=95)
