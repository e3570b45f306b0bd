import shutil

import pytest

from mettle.manifests import AnnotationError, build_manifest
from mettle.manifests.annotations import packaged
from mettle.manifests.llp import LLP_CLASSES


@pytest.fixture(scope="module")
def llp():
    return build_manifest("llp")


def test_counts(llp):
    assert len(llp) == 11849
    assert llp.split_sizes() == {"train": 10000, "val": 649, "test": 1200}
    assert len(llp.vocabularies["event"]) == 25 and llp.frame_rule == "first"


def test_known_clips(llp):
    by_id = {c.clip_id: c for c in llp.clips}
    c = by_id["BjCEufrlXm4_20_30"]  # train: Speech,Dog
    assert c.splits == ("train",) and c.labels == {"video_labels": [0, 3]}
    assert c.media["frames"] == "frames/BjCEufrlXm4" and c.media["video"] == "videos/BjCEufrlXm4_20_30"
    t = by_id["4YdbENYcIyE_23_33"]  # test: audio 0-4 and visual 0-10 Baby_cry_infant_cry
    cry = LLP_CLASSES.index("Baby_cry_infant_cry")
    assert t.splits == ("test",)
    assert [cry, 0, 4] in t.labels["audio_events"]
    assert [cry, 0, 10] in t.labels["visual_events"]
    assert llp.clips[0].clip_id == "BjCEufrlXm4_20_30"  # rows keep the file order (train, val, test)
    assert llp.clips[10000].splits == ("val",) and llp.clips[10649].clip_id == "4YdbENYcIyE_23_33"


def test_eval_rows_and_old_copy(llp):
    new = llp.options
    old = build_manifest("llp", eval_audio="dgsct").options
    assert new["unmatched_eval_rows"] == {"audio_events": 13, "visual_events": 11}
    assert new["empty_eval_rows"] == {"audio_events": 6, "visual_events": 0}
    # the older copy loses three rows to corrupted filenames (two Speech rows and one Cat row)
    assert old["unmatched_eval_rows"]["audio_events"] == 16
    n_events = sum(len(c.labels.get("audio_events", ())) for c in llp.clips)
    assert n_events == 4131 - 13 - 6


def test_bad_class_is_named(tmp_path):
    dst = tmp_path / "llp"
    shutil.copytree(packaged("llp"), dst)
    path = dst / "AVVP_val_pd.csv"
    path.chmod(0o644)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].split("\t")[0] + "\tSpeech,Doggo"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"AVVP_val_pd.csv:3: unknown class 'Doggo'. Fix: use one of"):
        build_manifest("llp", annotations=str(dst))
