"""The LLP protocol on hand-built videos (2 classes x 10 seconds)."""

import numpy as np
import pytest

from mettle.train.metrics import avvp_scores, avvp_table, avvp_video_scores, extract_events, parse_predictions


def _row(*spans, c=0, classes=2, t=10):
    x = np.zeros((classes, t), dtype=int)
    for on, off in spans:
        x[c, on:off] = 1
    return x


Z = np.zeros((2, 10), dtype=int)


def test_extract_events_runs():
    assert [list(np.flatnonzero(e)) for e in extract_events([1, 1, 0, 1, 0, 0, 1, 1, 1, 1])] == \
        [[0, 1], [3], [6, 7, 8, 9]]
    assert extract_events(np.zeros(10)) == []
    whole = extract_events(np.ones(10))
    assert len(whole) == 1 and whole[0].sum() == 10


def test_perfect_and_all_true_negative_videos_score_one():
    gt_a, gt_v = _row((0, 4)), _row((2, 10), c=1)
    s = avvp_video_scores(gt_a, gt_v, gt_a, gt_v)
    assert all(v == 1.0 for v in s.values())  # AV ground truth is empty and so is the AV prediction
    s = avvp_video_scores(Z, Z, Z, Z)
    assert all(v == 1.0 for v in s.values())  # nothing predicted, nothing annotated


def test_empty_prediction_against_events_scores_zero():
    s = avvp_video_scores(Z, Z, _row((0, 10)), _row((0, 10)))  # an event spanning the whole clip
    assert s["seg_a"] == s["seg_v"] == s["seg_av"] == s["evt_a"] == s["evt_av"] == 0.0
    s = avvp_video_scores(_row((0, 10)), _row((0, 10)), _row((0, 10)), _row((0, 10)))
    assert s["seg_av"] == s["evt_av"] == s["evt_event"] == 1.0


def test_segment_f_counts():
    # audio: predicted 0-4, true 2-6 -> TP 2, FP 2, FN 2 -> F 0.5; visual: perfect on class 1
    s = avvp_video_scores(_row((0, 4)), _row((5, 8), c=1), _row((2, 6)), _row((5, 8), c=1))
    assert s["seg_a"] == pytest.approx(0.5) and s["seg_v"] == 1.0
    assert s["seg_av"] == 1.0  # no class is both heard and seen, in prediction or truth
    assert s["seg_event"] == pytest.approx(np.mean([2 * 2 / (4 + 4), 1.0]))  # pooled per class, then averaged
    assert s["seg_type"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_event_iou_threshold_is_inclusive():
    exact_half = avvp_video_scores(_row((0, 4)), Z, _row((2, 4)), Z)  # IoU = 2 / 4 = 0.5 exactly: a match
    assert exact_half["evt_a"] == 1.0
    below = avvp_video_scores(_row((0, 5)), Z, _row((3, 5)), Z)  # IoU = 2 / 5
    assert below["evt_a"] == 0.0  # one FP and one FN
    # one long prediction over two true events: it matches the first (IoU 6/10), the second
    # (IoU 3/10) is missed: TP 1, FP 0, FN 1
    long = avvp_video_scores(_row((0, 10)), Z, _row((0, 6), (7, 10)), Z)
    assert long["evt_a"] == pytest.approx(2 / 3)
    two = avvp_video_scores(_row((0, 3), (4, 10)), Z, _row((0, 3), (4, 10)), Z)
    assert two["evt_a"] == 1.0


def test_parse_predictions_masks_frames_by_the_video_prediction():
    video = np.array([0.9, 0.2])
    audio = np.full((10, 2), 0.7)
    visual = np.zeros((10, 2))
    visual[:3, 0] = 0.5  # exactly the threshold counts
    pa, pv = parse_predictions(video, audio, visual)
    assert pa.shape == (2, 10) and pa[0].all() and not pa[1].any()  # class 1 is masked by its video prob
    assert list(pv[0]) == [1, 1, 1] + [0] * 7


def test_mean_over_videos_and_table():
    good = avvp_video_scores(_row((0, 4)), Z, _row((0, 4)), Z)
    bad = avvp_video_scores(Z, Z, _row((0, 4)), Z)
    scores = avvp_scores([good, bad])
    assert scores["seg_a"] == pytest.approx(50.0) and scores["seg_v"] == pytest.approx(100.0)
    table = avvp_table(scores)
    assert len(table) == 4 and table[2].startswith("| segment | 50.00 | 100.00")
    with pytest.raises(ValueError, match="classes, seconds"):
        avvp_video_scores(Z, Z, Z[:1], Z)
