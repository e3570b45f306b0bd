"""MUSIC-AVQA accuracies on hand-built answers, and the other release's test set mapped onto a cache."""

import pytest

from mettle.cache import TokenSource
from mettle.train.metrics import avqa_accuracies, avqa_table
from mettle.train.tasks import get_task

T = [("Audio", "Counting"), ("Audio", "Comparative"), ("Visual", "Location"), ("Audio-Visual", "Temporal"),
     ("Audio-Visual", "Existential"), ("Audio-Visual", "Existential")]


def test_accuracies_are_pooled_counts():
    acc = avqa_accuracies([0, 1, 2, 3, 4, 9], [0, 5, 2, 3, 4, 4], T)
    assert acc["Audio/Counting"] == 100.0 and acc["Audio/Comparative"] == 0.0 and acc["Audio"] == 50.0
    assert acc["Visual"] == 100.0 and "Visual/Counting" not in acc
    assert acc["Audio-Visual/Existential"] == 50.0
    assert acc["Audio-Visual"] == pytest.approx(200 / 3)  # 2 of 3 AV questions, not the mean of the types (75)
    assert acc["overall"] == pytest.approx(400 / 6)
    table = avqa_table(acc)
    assert table[0].startswith("| A-Count | A-Comp | A-Avg | V-Count") and table[2].count(" - ") == 4  # absent types
    assert avqa_accuracies([1], [1], [("Visual", "Counting")])["overall"] == 100.0
    with pytest.raises(ValueError, match="1 predictions, 2 answers"):
        avqa_accuracies([1], [1, 2], T[:2])


class _Stub(TokenSource):
    """A token source holding only a manifest (item bookkeeping needs no tokens)."""

    def __init__(self, manifest):
        self.manifest, self.clip_status, self.meta = manifest, ["ok"] * len(manifest), None

    def iterate(self, batches, keys, workers=0, seed=0, codes=()):
        raise AssertionError("not used")

    def describe(self):
        return "stub"


def test_both_music_avqa_test_sets_are_scored():
    from mettle.manifests import build_manifest

    source = _Stub(build_manifest("music-avqa", version="json"))
    task = get_task("avqa")
    test = task.items(source, "test")
    assert len(test) == 9185 and task.extra_splits(source) == ["test_json_update"]
    other = task.items(source, "test_json_update")
    assert len(other) == 9129  # every json_update test video is in the json manifest
    rows = task.item_rows(source.manifest, other[:50])
    for i, r in zip(other[:50], rows):
        assert 0 <= r < len(source.manifest) and task.questions[i].split == "test_json_update"
    assert task.head_inputs(source.manifest, other[:3])["question"].shape == (3, 14)
