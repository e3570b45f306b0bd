import json
from collections import Counter

import pytest

from mettle.manifests import AnnotationError, ManifestError, build_manifest


@pytest.fixture(scope="module")
def avqa():
    return build_manifest("music-avqa")


def test_sizes_and_vocabularies(avqa):
    assert avqa.split_sizes() == {"train": 0, "val": 4595, "test": 9185}
    assert len(avqa.vocabularies["answer"]) == 42 and len(avqa.vocabularies["question_word"]) == 93
    assert avqa.vocabularies["question_word"][0] == "<pad>"
    updated = build_manifest("music-avqa", version="json_update")
    assert updated.split_sizes() == {"train": 0, "val": 4568, "test": 9129}


def test_test_question_types(avqa):
    types = Counter(q.qtype for q in avqa.questions if q.split == "test")
    assert types[("Audio", "Counting")] == 1022 and types[("Audio", "Comparative")] == 601
    assert types[("Visual", "Counting")] == 1199 and types[("Visual", "Location")] == 1228
    assert types[("Audio-Visual", "Existential")] == 995 and types[("Audio-Visual", "Temporal")] == 824


def test_questions_fill_templates_and_share_videos(avqa):
    q = avqa.questions[0]
    assert q.words() == ["Is", "the", "ukulele", "in", "the", "video", "always", "playing"]
    assert avqa.vocabularies["answer"][q.answer] == "yes"
    assert avqa.clips[q.clip_index].clip_id == "00000028"
    shared = [c for c in avqa.clips if c.splits == ("val", "test")]
    assert len(shared) == 2296  # MUSIC-AVQA splits questions, not videos
    words = set(avqa.vocabularies["question_word"])
    assert all(set(q.words()) <= words for q in avqa.questions)


def test_user_train_json(tmp_path):
    records = [{"video_id": "00000093", "question_id": 1, "type": '["Audio", "Counting"]',
                "question_content": "How many instruments are sounding in the video?", "templ_values": "[]",
                "question_deleted": 0, "anser": "two"}]
    path = tmp_path / "avqa-train.json"
    path.write_text(json.dumps(records))
    m = build_manifest("music-avqa", train_json=str(path))
    assert m.split_sizes()["train"] == 1 and m.clips[0].clip_id == "00000093" and m.clips[0].splits[0] == "train"
    records[0]["anser"] = "forty-two"
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"record 0: answer 'forty-two' is not in the 42-answer vocabulary"):
        build_manifest("music-avqa", train_json=str(path))
    records[0]["anser"], records[0]["video_id"] = "two", "../../x"
    path.write_text(json.dumps(records))
    with pytest.raises(ManifestError, match="cannot be used as a file name"):
        build_manifest("music-avqa", train_json=str(path))


def test_a_damaged_gzip_question_file_is_named(tmp_path):
    import gzip

    whole = gzip.compress(json.dumps([{"video_id": "00000093"}]).encode())
    damaged = {"cut": whole[:-9], "not-gzip": b"[{}]", "bad-crc": whole[:-8] + bytes(4) + whole[-4:],
               "bad-block": whole[:12] + bytes(len(whole) - 12)}
    for name, data in damaged.items():  # were: 'Aborted!', a zlib traceback, or no path at all
        path = tmp_path / f"{name}.json.gz"
        path.write_bytes(data)
        with pytest.raises(AnnotationError, match=rf"{name}.json.gz: damaged gzip file .*Fix: copy the file again"):
            build_manifest("music-avqa", train_json=str(path))


def test_bad_version():
    with pytest.raises(ManifestError, match="version 'v3' is unknown"):
        build_manifest("music-avqa", version="v3")
