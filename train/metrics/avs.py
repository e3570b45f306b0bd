"""AVSBench metrics: the Jaccard "mIoU" and the F-score (beta^2 = 0.3), as AVSBench computes them.

* ``mask_iou``: per frame, the prediction is ``sigmoid(logit) > 0.5``; IoU = intersection / union,
  except for a frame whose ground truth is empty, which scores the fraction of pixels correctly
  left empty (intersection of the complements over the frame area). mIoU = mean over frames.
* F-score: 255 thresholds ``linspace(0, 1 - 1e-10, 255)`` on the sigmoid map (a pixel is positive
  at ``prob >= threshold``); precision and recall per threshold, ``F = 1.3 P R / (0.3 P + R)``
  (NaN -> 0); frames with empty ground truth are skipped. The reference code averages the F
  curves over the frames of each *test batch*, takes the maximum over thresholds, and averages over
  batches, so its figure depends on the batch size and on which frames share a batch
  (:func:`fscore_reference`, :func:`fscore_batched`). We report both: the per-frame definition
  (:func:`fscore_per_frame`: each frame's maximum over thresholds, averaged over frames), which
  depends on neither, and the reference figure at the test batch sizes of the published code
  (:data:`REFERENCE_BATCHES`).

Data contract: probabilities ``(N, H, W)`` float in [0, 1]; ground truth ``(N, H, W)`` with 0/1
values (anything > 0 counts as foreground).
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.linspace(0.0, 1.0 - 1e-10, 255)
# the reference F-score's test batch, in videos: AVSBench's and DG-SCT's test scripts read 4 videos (20
# frames) a batch, AVMoE's one; metric name -> (videos a batch, whose test script)
REFERENCE_BATCHES = {"fscore_avsbench": (4, "AVSBench and DG-SCT"), "fscore_avmoe": (1, "AVMoE")}
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
    """F-score curves ``(N, 255)`` over the thresholds, and which frames count (non-empty GT).

    The curves are all the F-scores need: a split's are computed chunk by chunk from the exact
    probabilities, and no split-sized probability map is kept.
    """
    probs, gt = np.asarray(probs), np.asarray(gts) > 0
    n = len(probs)
    curves = np.zeros((n, len(THRESHOLDS)))
    valid = gt.reshape(n, -1).any(1)
    # counts of pixels at or above each threshold, through a histogram over the threshold bins
    edges = np.append(THRESHOLDS, np.inf)
    for i in np.flatnonzero(valid):
        p, g = probs[i].astype(np.float64).ravel(), gt[i].ravel()
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
    """Mean over frames with non-empty ground truth of each frame's best F (batch-free)."""
    return best_per_frame(*f_curves(probs, gts))


def best_per_frame(curves: np.ndarray, valid: np.ndarray) -> float:
    """:func:`fscore_per_frame` from :func:`f_curves`' output."""
    return float(curves[valid].max(1).mean()) if valid.any() else 0.0


def fscore_reference(probs: np.ndarray, gts: np.ndarray, batch_frames: int) -> float:
    """The reference figure: per batch of ``batch_frames`` consecutive frames, max over thresholds of the
    mean F curve of its non-empty frames (0 for a batch without any), averaged over batches."""
    curves, valid = f_curves(probs, gts)
    return fscore_batched(curves, valid, np.arange(len(curves)) // batch_frames)


def fscore_batched(curves: np.ndarray, valid: np.ndarray, batch: np.ndarray) -> float:
    """:func:`fscore_reference` from :func:`f_curves`' output, with the frames' test batches given as
    labels ``batch`` ``(N,)`` (e.g. the clip's position // videos a batch): per batch, the maximum of its
    non-empty frames' mean curve (0 if it has none), averaged over the batches present."""
    batch = np.asarray(batch)
    members = [valid & (batch == b) for b in np.unique(batch)]
    scores = [float(curves[m].mean(0).max()) if m.any() else 0.0 for m in members]
    return float(np.mean(scores)) if scores else 0.0
