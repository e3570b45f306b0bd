import shutil

import h5py
import numpy as np
import pytest

from mettle.manifests import AnnotationError, ManifestError, build_manifest
from mettle.manifests.annotations import packaged
from tests.conftest import DATA


@pytest.fixture(scope="module")
def ave():
    return build_manifest("ave")


def test_counts_and_vocabulary(ave):
    assert len(ave) == 4143
    assert ave.split_sizes() == {"train": 3339, "val": 402, "test": 402}
    assert len(ave.vocabularies["event"]) == 29 and ave.vocabularies["event"][-1] == "background"
    assert ave.vocabularies["event"][0] == "Church bell"
    sets = [set(ave.indices(s)) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(4143))


def test_known_rows(ave):
    # Annotations.txt rows 0 and 1: "Church bell&RUhOCu3LNXM&good&0&10", "Church bell&MH3m4AwEcRY&good&6&8"
    assert ave.clips[0].clip_id == "RUhOCu3LNXM"
    assert ave.clips[0].labels["segment_labels"] == [0] * 10
    assert ave.clips[1].labels["segment_labels"] == [28] * 6 + [0, 0] + [28, 28]
    assert ave.clips[1].media == {"frames": "frames/MH3m4AwEcRY", "audio": "wave/MH3m4AwEcRY.npy",
                                  "video": "videos/MH3m4AwEcRY"}
    # the one zero-length event (row 26) is background throughout
    assert ave.clips[26].labels["segment_labels"] == [28] * 10
    # train_order.h5 starts with rows 40, 30, 69; rows stay in Annotations.txt order
    assert all(ave.clips[i].splits == ("train",) for i in (40, 30, 69))
    assert ave.indices("test") == sorted(ave.indices("test"))


def test_labels_agree_with_reference_label_files(ave):
    seg = np.array([c.labels["segment_labels"] for c in ave.clips])
    with h5py.File(DATA / "ave" / "labels_closs.h5") as f:
        closs = f["avadataset"][()]
    with h5py.File(DATA / "ave" / "mil_labels.h5") as f:
        mil = f["avadataset"][()]
    np.testing.assert_array_equal(seg != 28, closs.astype(bool))
    np.testing.assert_array_equal([c.labels["event_class"] for c in ave.clips], mil.argmax(1))


def test_repeated_video_ids_get_unique_clip_ids(ave):
    ids = [c.clip_id for c in ave.clips]
    assert len(set(ids)) == 4143
    repeated = [c for c in ave.clips if "#" in c.clip_id]
    assert len(repeated) == 91  # 45 VideoIDs used by two rows, one by three
    assert all(c.media["frames"] == "frames/" + c.clip_id.split("#")[0] for c in repeated)


@pytest.fixture()
def ave_copy(tmp_path):
    dst = tmp_path / "ave"
    shutil.copytree(packaged("ave"), dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _edit_line(path, n, new):
    lines = path.read_text().splitlines()
    lines[n - 1] = new
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("line, problem", [
    ("Church bel&RUhOCu3LNXM&good&0&10", "category 'Church bel' is not in categories.txt"),
    ("Church bell&RUhOCu3LNXM&good&0&11", "outside 0..10"),
    ("Church bell&RUhOCu3LNXM&good&5&3", "outside 0..10"),
    ("Church bell&../etc&good&0&10", "cannot be used as a file name"),
    ("Church bell&RUhOCu3LNXM&good&0", "expected 5 '&'-separated fields"),
    ("Church bell&RUhOCu3LNXM&good&zero&10", "whole seconds"),
])
def test_bad_annotation_line_is_named(ave_copy, line, problem):
    _edit_line(ave_copy / "Annotations.txt", 2, line)
    with pytest.raises(AnnotationError) as e:
        build_manifest("ave", annotations=str(ave_copy))
    msg = str(e.value)
    assert problem in msg and "Fix:" in msg
    assert "Annotations.txt:2" in msg or "Set.txt" in msg


def test_overlapping_splits_refused(ave_copy):
    with h5py.File(ave_copy / "val_order.h5", "r+") as f:
        order = f["order"][()]
        with h5py.File(ave_copy / "train_order.h5") as g:
            order[0] = g["order"][0]
        f["order"][...] = order
    (ave_copy / "valSet.txt").unlink()
    with pytest.raises(AnnotationError, match="also in the train split"):
        build_manifest("ave", annotations=str(ave_copy))


def test_split_file_mismatch_refused(ave_copy):
    _edit_line(ave_copy / "testSet.txt", 3, "Church bell&RUhOCu3LNXM&good&0&10")
    with pytest.raises(AnnotationError, match=r"testSet.txt:3: differs from Annotations.txt row"):
        build_manifest("ave", annotations=str(ave_copy))


def test_an_order_file_without_an_order_array_is_named(ave_copy):
    (ave_copy / "val_order.h5").unlink()
    with h5py.File(ave_copy / "val_order.h5", "w") as f:
        f.create_group("order")  # a group where the array should be: was a TypeError traceback
    with pytest.raises(AnnotationError, match=r"val_order.h5: cannot read dataset 'order' .*Fix: give the official"):
        build_manifest("ave", annotations=str(ave_copy))


def test_a_byte_order_mark_is_no_part_of_the_first_class(ave, ave_copy):
    path = ave_copy / "categories.txt"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as some editors save UTF-8
    again = build_manifest("ave", annotations=str(ave_copy))
    assert again.vocabularies == ave.vocabularies and [c.labels for c in again.clips] == [c.labels for c in ave.clips]


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(AnnotationError, match="categories.txt: file not found. Fix"):
        build_manifest("ave", annotations=str(tmp_path))


def test_unknown_option_refused():
    with pytest.raises(ManifestError, match="has no option segments. Fix: use only annotations"):
        build_manifest("ave", segments=5)
