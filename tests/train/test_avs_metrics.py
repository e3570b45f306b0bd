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


def _logit(p):
    return float(np.log(p / (1 - p)))


def test_the_avs_task_reports_the_reference_fscores_batched_by_clip():
    """The task's F-scores equal the metric functions on the same frames: per frame, and per test batch of
    4 clips (AVSBench, DG-SCT) or 1 (AVMoE), a batch being whole clips even when a clip lacks masks."""
    import torch

    from mettle.train.metrics import REFERENCE_BATCHES
    from mettle.train.tasks import get_task

    rng = np.random.default_rng(0)
    clips, frames, size = 9, 5, 16
    gts = np.zeros((clips, frames, size, size), dtype=np.uint8)
    logits = torch.empty(clips, frames, size, size)
    for c in range(clips):
        for f in range(frames):
            y, x = rng.integers(0, 8, 2)
            gts[c, f, y:y + 6, x:x + 6] = 1
            fg, bg = rng.uniform(0.3, 0.95), rng.uniform(0.05, 0.6)  # calibration differs frame to frame
            logits[c, f] = torch.from_numpy(np.where(gts[c, f] == 1, _logit(fg), _logit(bg)) + rng.normal(0, 0.3, (size, size)))
    gts[2, 3] = 0  # an empty mask: skipped by the F-score, scored by mIoU
    gts[5, 1:] = 255  # a clip with one annotated frame (S4 training's layout)
    task = get_task("avs-s4")
    got = task.metrics(logits, torch.from_numpy(gts), None, list(range(clips)))
    probs = torch.sigmoid(logits).numpy()
    keep = (gts != 255).reshape(clips, frames, -1).all(-1)
    clip_of = np.repeat(np.arange(clips)[:, None], frames, 1)[keep]
    assert got["fscore"] == pytest.approx(100 * fscore_per_frame(probs[keep], gts[keep]))
    assert set(REFERENCE_BATCHES) == {"fscore_avsbench", "fscore_avmoe"}
    for name, (videos, _) in REFERENCE_BATCHES.items():
        expected = []
        for b in range(0, clips, videos):
            sel = (clip_of >= b) & (clip_of < b + videos)
            expected.append(fscore_reference(probs[keep][sel], gts[keep][sel], batch_frames=int(sel.sum())))
        assert got[name] == pytest.approx(100 * np.mean(expected))
    assert got["fscore_avmoe"] != pytest.approx(got["fscore_avsbench"])  # the batch size matters here
    assert got["fscore"] > got["fscore_avsbench"]
    rows = task.table(got)
    assert "F-score as AVSBench and DG-SCT test it (4 videos a batch" in rows[3] and "AVMoE" in rows[4]
    assert "F-score per frame" in rows[-1]  # after the published protocol's figures: it reads higher


def test_the_fscore_reads_probabilities_near_one_unrounded():
    """Object pixels at 0.9999 and background at 0.997: only the top thresholds separate them. Rounded to
    float16 (as the task kept them before), 0.9999 became 1.0 and passed the last threshold, scoring a
    perfect F that the reference (float32) does not give."""
    import torch

    from mettle.train.tasks import get_task

    gt = _square(4, 10, 4, 10)[None, None].astype(np.uint8)
    probs = np.where(gt == 1, 0.9999, 0.997)
    logits = torch.logit(torch.from_numpy(probs).float())
    got = get_task("avs-s4").metrics(logits, torch.from_numpy(gt), None, [0])
    exact = 100 * fscore_per_frame(torch.sigmoid(logits).numpy()[0], gt[0])
    assert got["fscore"] == pytest.approx(exact)
    assert exact < 50


def test_reference_fscore_batches_keep_their_place_when_a_clip_is_missing():
    """Batches are groups of 4 clips in the split's order: a clip that failed extraction leaves a gap, it does
    not pull the next clips into its batch."""
    import types

    import torch

    from mettle.train.tasks import get_task

    rng = np.random.default_rng(1)
    clips, size = 8, 16
    gts = (rng.random((clips, 1, size, size)) < 0.3).astype(np.uint8)
    logits = torch.from_numpy(rng.normal(0, 2, (clips, 1, size, size))).float()
    manifest = types.SimpleNamespace(clips=[types.SimpleNamespace(splits=("test",))] * 9, indices=lambda split: range(9))
    items = [0, 1, 2, 4, 5, 6, 7, 8]  # row 3 failed: rows 0-2 are batch 0, rows 4-7 batch 1, row 8 batch 2
    got = get_task("avs-s4").metrics(logits, torch.from_numpy(gts), manifest, items)
    probs = torch.sigmoid(logits).numpy()[:, 0]
    expected = np.mean([fscore_reference(probs[a:b], gts[a:b, 0], batch_frames=b - a) for a, b in ((0, 3), (3, 7), (7, 8))])
    assert got["fscore_avsbench"] == pytest.approx(100 * expected)
