"""AVSBench metrics: the Jaccard "mIoU" and the F-score (beta^2 = 0.3), as AVSBench computes them.

* ``mask_iou``: per frame, the prediction is ``sigmoid(logit) > 0.5``; IoU = intersection / union,
  except for a frame whose ground truth is empty, which scores the fraction of pixels correctly
  left empty (intersection of the complements over the frame area). mIoU = mean over frames.
* F-score: 255 thresholds ``linspace(0, 1 - 1e-10, 255)`` on the sigmoid map (a pixel is positive
  at ``prob >= threshold``); precision and recall per threshold, ``F = 1.3 P R / (0.3 P + R)``
  (NaN -> 0); frames with empty ground truth are skipped. The reference code averages the F
  curves over the frames of each *test batch*, takes the maximum over thresholds, and averages over
  batches, so its figure depends on the batch size (:func:`fscore_reference`). We report the
  per-frame definition (:func:`fscore_per_frame`): each frame's maximum over thresholds, averaged
  over frames, which does not.

Data contract: probabilities ``(N, H, W)`` float in [0, 1]; ground truth ``(N, H, W)`` with 0/1
values (anything > 0 counts as foreground).
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.linspace(0.0, 1.0 - 1e-10, 255)
BETA2 = 0.3
EPS = 1e-7


def mask_iou(probs: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """Per-frame IoU ``(N,)`` with the AVSBench convention for empty ground truth."""
    pred, gt = np.asarray(probs) > 0.5, np.asarray(gts) > 0
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"predictions {pred.shape} and masks {gt.shape} must both be (frames, H, W)")
    inter = (pred & gt).sum((1, 2)).astype(np.float64)
    union = (pred | gt).sum((1, 2)).astype(np.float64)
    empty = ~gt.any((1, 2))
    inter[empty] = (~pred[empty] & ~gt[empty]).sum((1, 2))
    union[empty] = gt.shape[1] * gt.shape[2]
    return inter / (union + EPS)


def f_curves(probs: np.ndarray, gts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F-score curves ``(N, 255)`` over the thresholds, and which frames count (non-empty GT)."""
    probs, gt = np.asarray(probs, dtype=np.float64), np.asarray(gts) > 0
    n = len(probs)
    curves = np.zeros((n, len(THRESHOLDS)))
    valid = gt.reshape(n, -1).any(1)
    # counts of pixels at or above each threshold, through a histogram over the threshold bins
    edges = np.append(THRESHOLDS, np.inf)
    for i in np.flatnonzero(valid):
        p, g = probs[i].ravel(), gt[i].ravel()
        pos = np.histogram(p[g], bins=edges)[0][::-1].cumsum()[::-1]  # gt pixels with prob >= t
        neg = np.histogram(p[~g], bins=edges)[0][::-1].cumsum()[::-1]
        tp, fp, fn = pos.astype(np.float64), neg.astype(np.float64), g.sum() - pos
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
            recall = tp / (tp + fn)
            f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
        curves[i] = np.nan_to_num(f, nan=0.0)
    return curves, valid


def fscore_per_frame(probs: np.ndarray, gts: np.ndarray) -> float:
    """Mean over frames with non-empty ground truth of each frame's best F (what mettle reports)."""
    curves, valid = f_curves(probs, gts)
    return float(curves[valid].max(1).mean()) if valid.any() else 0.0


def fscore_reference(probs: np.ndarray, gts: np.ndarray, batch_frames: int) -> float:
    """The reference figure: per batch of ``batch_frames`` frames, max over thresholds of the mean F
    curve of its non-empty frames (0 for a batch without any), averaged over batches."""
    curves, valid = f_curves(probs, gts)
    scores = []
    for s in range(0, len(curves), batch_frames):
        c, v = curves[s:s + batch_frames], valid[s:s + batch_frames]
        scores.append(float(c[v].mean(0).max()) if v.any() else 0.0)
    return float(np.mean(scores)) if scores else 0.0
