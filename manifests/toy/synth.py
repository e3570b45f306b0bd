"""Pictures and sounds of the toy dataset, as arrays (no files here).

Each of the four toy events is a visual pattern and a matching sound. A clip's script says, per
second, which event's picture is on screen and which event's sound is audible; the AVE label of a
second is the event only when both its picture and its sound are present, so a model needs both
modalities (distractor seconds carry one without the other).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOY_CLASSES = ("bell", "siren", "engine", "drum")
# RGB colour of each event's shape; the background is grey texture.
_COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 240], [240, 220, 40]], dtype=np.float32)


@dataclass(frozen=True)
class ClipScript:
    """What happens in one toy clip, second by second.

    Attributes:
        event: class index of the clip's event (one per clip, as in AVE).
        start, end: the labelled event covers seconds ``start .. end-1``.
        visible: per second, the class whose picture is shown (-1: none).
        audible: per second, the class whose sound plays (-1: none).
        seed: seed of the clip's texture and noise.
    """

    event: int
    start: int
    end: int
    visible: tuple[int, ...]
    audible: tuple[int, ...]
    seed: int

    def labels(self) -> list[int]:
        """Per-second AVE label: the event where picture and sound coincide, else background."""
        bg = len(TOY_CLASSES)
        return [v if v == a and v >= 0 else bg for v, a in zip(self.visible, self.audible)]


def make_script(rng: np.random.Generator, event: int, seconds: int, seed: int) -> ClipScript:
    """Draw a clip: an event span plus distractors (the event's sound alone, its picture alone, or
    another class's picture or sound) in the background seconds."""
    if rng.random() < 0.25:
        start, end = 0, seconds
    else:
        length = int(rng.integers(2, seconds))
        start = int(rng.integers(0, seconds - length + 1))
        end = start + length
    visible, audible = [-1] * seconds, [-1] * seconds
    others = [c for c in range(len(TOY_CLASSES)) if c != event]
    for t in range(seconds):
        if start <= t < end:
            visible[t] = audible[t] = event
            continue
        r = rng.random()
        if r < 0.3:
            audible[t] = event
        elif r < 0.6:
            visible[t] = event
        elif r < 0.8:
            if rng.random() < 0.5:
                audible[t] = int(rng.choice(others))
            else:
                visible[t] = int(rng.choice(others))
    script = ClipScript(event, start, end, tuple(visible), tuple(audible), seed)
    assert script.labels() == [event if start <= t < end else len(TOY_CLASSES) for t in range(seconds)]
    return script


def make_parse_script(rng: np.random.Generator, seconds: int, seed: int) -> ClipScript:
    """Draw a clip with independent sound and picture events (the LLP and AVQA toy variants).

    Each modality gets one or two events (class, onset, offset) at random places, so a clip mixes
    audio-only, visual-only and audio-visual seconds; a later event overwrites an earlier one where
    they overlap (one picture and one sound at a time). ``event`` is the first sound's class.
    """
    tracks = []
    shared = int(rng.integers(len(TOY_CLASSES)))
    for _ in range(2):
        track = [-1] * seconds
        for k in range(int(rng.integers(1, 3))):
            cls = shared if k == 0 and rng.random() < 0.6 else int(rng.integers(len(TOY_CLASSES)))
            length = int(rng.integers(2, seconds + 1))
            on = int(rng.integers(0, seconds - length + 1))
            track[on:on + length] = [cls] * length
        tracks.append(track)
    audible, visible = tracks
    first = next((c for c in audible if c >= 0), 0)
    return ClipScript(first, 0, 0, tuple(visible), tuple(audible), seed)


def make_qa_script(rng: np.random.Generator, seconds: int, seed: int) -> ClipScript:
    """Draw a clip for the AVQA toy: one or two objects on screen, each heard while it is shown with
    probability 0.75 (as instruments in a music video), and sometimes a sound from off screen."""
    visible, audible = [-1] * seconds, [-1] * seconds
    for _ in range(int(rng.integers(1, 3))):
        cls = int(rng.integers(len(TOY_CLASSES)))
        length = int(rng.integers(3, seconds + 1))
        on = int(rng.integers(0, seconds - length + 1))
        visible[on:on + length] = [cls] * length
        audible[on:on + length] = [cls if rng.random() < 0.75 else -1] * length
    if rng.random() < 0.3:  # an off-screen sound in the silent seconds
        cls = int(rng.integers(len(TOY_CLASSES)))
        audible = [cls if a < 0 and rng.random() < 0.5 else a for a in audible]
    if all(a < 0 for a in audible):
        audible[int(rng.integers(seconds))] = visible[0] if visible[0] >= 0 else 0
    return ClipScript(next(c for c in audible if c >= 0), 0, 0, tuple(visible), tuple(audible), seed)


def runs(track: tuple[int, ...] | list[int]) -> list[tuple[int, int, int]]:
    """Events of a per-second class track: (class, onset, offset) for each run of one class."""
    out, start = [], 0
    for t in range(1, len(track) + 1):
        if t == len(track) or track[t] != track[start]:
            if track[start] >= 0:
                out.append((int(track[start]), start, t))
            start = t
    return out


def render_frames(script: ClipScript, size: int, fps: int) -> np.ndarray:
    """Frames of the clip, ``(seconds * fps, size, size, 3)`` uint8 RGB."""
    rng = np.random.default_rng(script.seed)
    seconds = len(script.visible)
    texture = 110 + 25 * rng.standard_normal((size, size, 1)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = np.empty((seconds * fps, size, size, 3), dtype=np.uint8)
    for k in range(seconds * fps):
        time = k / fps
        img = np.repeat(texture, 3, axis=2) + 6 * rng.standard_normal((size, size, 1)).astype(np.float32)
        cls = script.visible[k // fps]
        if cls >= 0:
            mask = _shape_mask(cls, time, xx, yy)
            img[mask] = _COLOURS[cls]
        frames[k] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def _shape_mask(cls: int, time: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Boolean mask of event ``cls``'s moving shape at ``time`` seconds (coordinates in [0, 1))."""
    phase = 0.5 + 0.3 * np.sin(2 * np.pi * time / 2.5)
    if cls == 0:  # red disc sliding left-right
        return (xx - phase) ** 2 + (yy - 0.5) ** 2 < 0.17 ** 2
    if cls == 1:  # green square sliding up-down
        return (np.abs(xx - 0.5) < 0.15) & (np.abs(yy - phase) < 0.15)
    if cls == 2:  # blue triangle moving along the diagonal
        u, v = xx - phase + 0.18, yy - phase + 0.18
        return (u >= 0) & (v >= 0) & (u + v <= 0.36)
    # yellow bar pulsing in length
    half = 0.12 + 0.25 * (0.5 + 0.5 * np.sin(2 * np.pi * time * 1.5))
    return (np.abs(yy - 0.5) < 0.07) & (np.abs(xx - 0.5) < half)


LEVEL = 2 ** 0.5  # see render_audio


def render_audio(script: ClipScript, sample_rate: int) -> np.ndarray:
    """Mono waveform of the clip, ``(seconds * sample_rate,)`` float32 in [-1, 1]."""
    rng = np.random.default_rng(script.seed + 7919)
    seconds = len(script.audible)
    n = sample_rate
    t = np.arange(n, dtype=np.float64) / sample_rate
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
    out = 0.01 * rng.standard_normal(seconds * n)
    for s, cls in enumerate(script.audible):
        if cls >= 0:
            out[s * n:(s + 1) * n] += 0.5 * fade * _sound(cls, t, rng)
    # mixed 3 dB up (events peak near 0.7): the random-init tiny backbones the tests use tell the toy sounds
    # apart far better at this level than 3 dB lower (toy AVVP, 35 epochs, seeds 0-2: audio segment F 41.5-55.0
    # against 28.3-29.3, 2026-11-28), which is where the sound track sat once mettle decoded videos as librosa
    # does (the channels' mean: the video's channels are this waveform and 0.9 of it, so 0.95 of it comes back)
    return np.clip(LEVEL * out, -1, 1).astype(np.float32)


def _sound(cls: int, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One second of event ``cls``'s sound (peak about 1)."""
    if cls == 0:  # bell: 880 Hz with a harmonic, struck twice a second
        env = np.exp(-6 * (t % 0.5))
        return env * (0.7 * np.sin(2 * np.pi * 880 * t) + 0.3 * np.sin(2 * np.pi * 2640 * t))
    if cls == 1:  # siren: chirp sweeping 500 -> 1500 Hz and back
        freq = 1000 + 500 * np.sin(2 * np.pi * t)
        return np.sin(2 * np.pi * np.cumsum(freq) / len(t))
    if cls == 2:  # engine: noise bursts four times a second
        gate = ((t * 4) % 1.0) < 0.6
        return 0.6 * gate * rng.standard_normal(len(t))
    # drum: low thumps, 120 Hz decaying, four a second
    return np.exp(-25 * ((t * 4) % 1.0) / 4) * np.sin(2 * np.pi * 120 * t)
