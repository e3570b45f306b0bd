"""LLP / AVVP evaluation, the protocol of the AVVP reference code (Tian et al., ECCV 2020).

Per video (C classes x T one-second segments, binary):

* predictions: a second is positive for class c in a modality when its frame probability is
  >= 0.5 *and* the video-level probability of c is >= 0.5 (:func:`parse_predictions`);
  audio-visual = audio and visual both positive; ground truth likewise (GT_av = GT_a * GT_v).
* segment level: per class, TP/FP/FN over the T seconds; F = 2TP / (2TP + FP + FN) for every
  class with a prediction or a ground-truth positive, averaged over those classes; a video with
  neither scores 1.0 (all true negatives). "Event@AV" pools the audio and visual counts per class
  (TP = TP_a + TP_v, ...) before the same F.
* event level: events are runs of consecutive positive seconds of one class. A predicted event
  is a TP when some ground-truth event of its class overlaps it with IoU >= 0.5, else a FP; a
  ground-truth event with no predicted event at IoU >= 0.5 is a FN (no one-to-one matching).
  Then the same per-class F, averaging and 1.0 rule.

Reported: 100 x the mean over videos of each score; Type@AV = mean of audio, visual and
audio-visual; Event@AV as above. Data contract: arrays are (C, T) of 0/1 (any integer or bool
dtype), predictions and ground truth alike.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

AVVP_KEYS = ("seg_a", "seg_v", "seg_av", "seg_type", "seg_event", "evt_a", "evt_v", "evt_av", "evt_type", "evt_event")


def parse_predictions(video_prob: np.ndarray, audio_prob: np.ndarray, visual_prob: np.ndarray,
                      threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(C,) video and (T, C) frame probabilities -> binary (C, T) audio and visual predictions."""
    keep = (np.asarray(video_prob) >= threshold)[None, :]
    pa = (np.asarray(audio_prob) >= threshold) & keep
    pv = (np.asarray(visual_prob) >= threshold) & keep
    return pa.T.astype(np.int64), pv.T.astype(np.int64)


def extract_events(row: np.ndarray) -> list[np.ndarray]:
    """Runs of consecutive ones of a (T,) binary row, each as a (T,) 0/1 mask."""
    row = np.asarray(row).astype(bool)
    events, t = [], 0
    while t < len(row):
        if row[t]:
            end = t
            while end < len(row) and row[end]:
                end += 1
            mask = np.zeros(len(row), dtype=np.int64)
            mask[t:end] = 1
            events.append(mask)
            t = end
        else:
            t += 1
    return events


def _matches(x: np.ndarray, y: np.ndarray) -> bool:
    inter = float(np.sum(x * y))
    return inter >= 0.5 * float(np.sum(x + y - x * y))  # IoU >= 0.5, as the reference writes it


def _event_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    p, g = extract_events(pred), extract_events(gt)
    tp = sum(any(_matches(x, y) for y in g) for x in p)
    fp = len(p) - tp
    fn = sum(not any(_matches(x, y) for y in p) for x in g)
    return tp, fp, fn


def _f(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    active = (tp + fp != 0) | (tp + fn != 0)
    if not active.any():
        return 1.0
    return float(np.mean(2 * tp[active] / (2 * tp[active] + fn[active] + fp[active])))


def avvp_video_scores(pred_a: np.ndarray, pred_v: np.ndarray, gt_a: np.ndarray, gt_v: np.ndarray) -> dict[str, float]:
    """The segment- and event-level scores of one video (each in [0, 1]; see the module docstring)."""
    arrays = [np.asarray(x).astype(np.int64) for x in (pred_a, pred_v, gt_a, gt_v)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(arrays[0].shape) != 2:
        raise ValueError(f"predictions and ground truth must all be (classes, seconds); got {sorted(shapes)}")
    pa, pv, ga, gv = arrays
    pav, gav = pa * pv, ga * gv
    out = {}
    seg = {}
    for name, p, g in (("a", pa, ga), ("v", pv, gv), ("av", pav, gav)):
        seg[name] = ((p * g).sum(1), (p * (1 - g)).sum(1), ((1 - p) * g).sum(1))
        out[f"seg_{name}"] = _f(*seg[name])
    out["seg_event"] = _f(*(seg["a"][i] + seg["v"][i] for i in range(3)))
    evt = {}
    for name, p, g in (("a", pa, ga), ("v", pv, gv), ("av", pav, gav)):
        counts = np.array([_event_counts(p[c], g[c]) for c in range(p.shape[0])]).reshape(-1, 3)
        evt[name] = (counts[:, 0], counts[:, 1], counts[:, 2])
        out[f"evt_{name}"] = _f(*evt[name])
    out["evt_event"] = _f(*(evt["a"][i] + evt["v"][i] for i in range(3)))
    out["seg_type"] = (out["seg_a"] + out["seg_v"] + out["seg_av"]) / 3
    out["evt_type"] = (out["evt_a"] + out["evt_v"] + out["evt_av"]) / 3
    return {k: out[k] for k in AVVP_KEYS}


def avvp_scores(videos: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean over videos of each score, in percent (the reported figures)."""
    if not videos:
        raise ValueError("no videos to score")
    return {k: 100.0 * float(np.mean([v[k] for v in videos])) for k in AVVP_KEYS}


def avvp_table(scores: Mapping[str, float]) -> list[str]:
    """The standard 10-number table (segment level and event level x A, V, AV, Type, Event)."""
    lines = ["| level | audio | visual | audio-visual | Type@AV | Event@AV |", "| --- | --- | --- | --- | --- | --- |"]
    for level, prefix in (("segment", "seg"), ("event", "evt")):
        lines.append(f"| {level} | " + " | ".join(f"{scores[f'{prefix}_{k}']:.2f}" for k in ("a", "v", "av", "type",
                                                                                           "event")) + " |")
    return lines
