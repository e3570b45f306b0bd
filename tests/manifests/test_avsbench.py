import pytest

from mettle.manifests import AnnotationError, ManifestError, build_manifest


def _s4(root, rows):
    (root / "Single-source").mkdir(parents=True, exist_ok=True)
    (root / "Single-source" / "s4_meta_data.csv").write_text(
        "name,start,category,split\n" + "".join(",".join(r) + "\n" for r in rows))


def test_s4_layout(tmp_path):
    _s4(tmp_path, [("-0aRvvS5O_w_30000", "30", "dog_barking", "train"),
                   ("abcdefghijk_1000", "1", "helicopter", "test")])
    m = build_manifest("avsbench-s4", data_root=str(tmp_path))
    tr, te = m.clips
    assert m.split_sizes() == {"train": 1, "val": 0, "test": 1}
    assert tr.num_segments == 5 and tr.labels["masks"] == [
        "Single-source/s4_data/gt_masks/train/dog_barking/-0aRvvS5O_w_30000/-0aRvvS5O_w_30000_1.png"]
    assert len(te.labels["masks"]) == 5 and te.labels["masks"][4].endswith("abcdefghijk_1000_5.png")
    assert te.media["frames"] == "Single-source/s4_data/visual_frames/test/helicopter/abcdefghijk_1000"
    assert te.media["audio"] == "Single-source/s4_data/audio_wav/test/helicopter/abcdefghijk_1000.wav"
    assert m.vocabularies["category"][te.labels["category"]] == "helicopter"


def test_ms3_layout(tmp_path):
    (tmp_path / "Multi-sources").mkdir()
    (tmp_path / "Multi-sources" / "ms3_meta_data.csv").write_text("video_id,split\nAbCdEfGh_1,val\n")
    m = build_manifest("avsbench-ms3", data_root=str(tmp_path))
    c = m.clips[0]
    assert c.splits == ("val",) and len(c.labels["masks"]) == 5
    assert c.media["frames"] == "Multi-sources/ms3_data/visual_frames/AbCdEfGh_1"
    assert c.labels["masks"][0] == "Multi-sources/ms3_data/gt_masks/val/AbCdEfGh_1/AbCdEfGh_1_1.png"


@pytest.mark.parametrize("row, problem", [
    (("x_1", "1", "unicorns", "train"), "3: unknown category 'unicorns'"),
    (("x_1", "1", "helicopter", "dev"), "3: split 'dev' is not train, val or test"),
    (("x_1", "1"), "3: expected at least 4 columns"),
])
def test_s4_errors_name_the_line(tmp_path, row, problem):
    _s4(tmp_path, [("ok_1", "1", "helicopter", "train"), row])
    with pytest.raises(AnnotationError, match=problem):
        build_manifest("avsbench-s4", data_root=str(tmp_path))


def test_s4_id_escape_and_missing_metadata(tmp_path):
    _s4(tmp_path, [("../../etc", "1", "helicopter", "train")])
    with pytest.raises(ManifestError, match="cannot be used as a file name"):
        build_manifest("avsbench-s4", data_root=str(tmp_path))
    with pytest.raises(AnnotationError, match="ms3_meta_data.csv: file not found. Fix: pass data_root"):
        build_manifest("avsbench-ms3", data_root=str(tmp_path))
    with pytest.raises(ManifestError, match="needs data_root"):
        build_manifest("avsbench-ms3")
