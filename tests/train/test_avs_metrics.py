"""AVSBench metrics on hand-built masks."""

import numpy as np
import pytest

from mettle.train.metrics import fscore_per_frame, fscore_reference, mask_iou


def _square(y0, y1, x0, x1, size=16):
    m = np.zeros((size, size))
    m[y0:y1, x0:x1] = 1
    return m


def test_iou_cases():
    gt = np.stack([_square(2, 8, 2, 8), _square(2, 8, 2, 8), _square(0, 4, 0, 4), np.zeros((16, 16))])
    probs = np.stack([gt[0] * 0.9,                  # perfect
                      np.zeros((16, 16)),           # empty prediction
                      _square(8, 12, 8, 12),        # disjoint
                      _square(0, 4, 0, 4) * 0.9])   # empty ground truth: 16 false pixels of 256
    iou = mask_iou(probs, gt)
    assert iou[0] == pytest.approx(1.0) and iou[1] == 0.0 and iou[2] == 0.0
    assert iou[3] == pytest.approx(240 / 256)
    assert mask_iou(np.zeros((1, 16, 16)), np.zeros((1, 16, 16)))[0] == pytest.approx(1.0)
    assert mask_iou(np.full((1, 16, 16), 0.5), gt[:1])[0] == 0.0  # 0.5 is not > 0.5
    with pytest.raises(ValueError, match="frames, H, W"):
        mask_iou(probs[:, :8], gt)


def test_fscore_cases():
    gt = _square(2, 8, 2, 8)[None]
    assert fscore_per_frame(gt * 0.8, gt) == pytest.approx(1.0)
    # disjoint: only threshold 0 (every pixel positive) finds the object: P = 36/256, R = 1
    p = 36 / 256
    assert fscore_per_frame(_square(8, 12, 8, 12)[None], gt) == pytest.approx(1.3 * p / (0.3 * p + 1))
    # half of the true pixels found, nothing else: P = 1, R = 0.5 -> 1.3 * 0.5 / (0.3 + 0.5)
    half = _square(2, 5, 2, 8)[None] * 0.9
    assert fscore_per_frame(half, gt) == pytest.approx(1.3 * 0.5 / 0.8)
    assert fscore_per_frame(np.zeros((1, 16, 16)), np.zeros((1, 16, 16))) == 0.0  # empty GT frames are skipped


def test_reference_fscore_depends_on_batching():
    gt = np.stack([_square(2, 8, 2, 8), _square(2, 8, 2, 8)])
    probs = np.stack([gt[0] * 0.3, gt[1] * 0.9])  # each frame is perfect at its own threshold
    assert fscore_per_frame(probs, gt) == pytest.approx(1.0)
    assert fscore_reference(probs, gt, batch_frames=1) == pytest.approx(1.0)
    assert fscore_reference(probs, gt, batch_frames=2) == pytest.approx(1.0)  # a threshold <= 0.3 fits both
    probs = np.stack([gt[0] * 0.3 + (1 - gt[0]) * 0.2, gt[1] * 0.9 + (1 - gt[1]) * 0.5])
    assert fscore_per_frame(probs, gt) == pytest.approx(1.0)
    assert fscore_reference(probs, gt, batch_frames=2) < 0.99  # no single threshold separates both frames
