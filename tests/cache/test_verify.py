"""``mettle-extract --verify``: each shard's arrays read back against the checksums its status recorded.
Rows zeroed or changed inside a shard file keep its length and index, so reads alone hand them out."""

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from mettle.cache import CacheError, CacheWriter, open_cache, verify_cache
from mettle.cache.format import data_checksum
from mettle.extract.cli import main as extract_cli
from test_cache import _fill  # tests/ holds no packages: the module is found by its folder


@pytest.fixture(scope="module")
def manifest(toy_manifest):
    return toy_manifest.subset(range(5))


def _rot(root, storage, key):
    """Change a few token values inside shard 1 of ``key`` in place, as a disk or a copy might."""
    if storage == "zarr":
        path = root / "tokens.zarr" / key / "c" / "1" / "0" / "0" / "0"
        with open(path, "r+b") as f:  # rows come first in the file; the index and its CRC stay as they were
            f.seek(64)
            f.write(bytes(32))
    else:
        with h5py.File(root / "shards" / "shard-00001.h5", "r+") as f:
            f[key][0, 0, 0, :8] = 0


@pytest.mark.parametrize("storage, dtype", [("zarr", "float16"), ("hdf5", "int8")])
def test_verify_finds_rows_changed_inside_a_shard_and_marks_it_for_extraction(manifest, tmp_path, storage, dtype):
    meta, truth = _fill(manifest, tmp_path / "c", storage=storage, dtype=dtype, shard_clips=2)
    root, key = tmp_path / "c", meta.arrays[0].key
    described = json.loads((root / "cache.json").read_text())
    described["media"] = {"frames": "as extract.media.DECODING records them"}  # a cache made since 2026-11-28
    (root / "cache.json").write_text(json.dumps(described))
    status = json.loads((root / "status" / "shard-00001.json").read_text())
    stored = {a.key for a in meta.arrays} | ({a.key + ".scale" for a in meta.arrays} if dtype == "int8" else set())
    assert set(status["checksums"]) == stored  # every array, the int8 scales too
    report = verify_cache(root)
    assert report.ok and report.matched == [0, 1, 2] and report.bytes_read > 0 and not report.damaged

    shutil.copytree(root, tmp_path / "rotten")
    _rot(tmp_path / "rotten", storage, key)
    before = open_cache(tmp_path / "rotten").read(key, [2])  # read without an error: the reason for --verify
    assert not np.array_equal(before, open_cache(root).read(key, [2]))
    report = verify_cache(tmp_path / "rotten")
    assert not report.ok and list(report.damaged) == [1] and report.matched == [0, 2]
    assert f"array {key} differs from what was written" in report.damaged[1]
    assert "Fix: rerun the mettle-extract command" in "\n".join(report.lines())
    with pytest.raises(CacheError, match="not finished"):  # no training reads it until it is extracted again
        open_cache(tmp_path / "rotten")
    assert CacheWriter(tmp_path / "rotten", meta).pending_shards() == [1]  # and only that shard is redone


def test_verify_on_the_command_line_and_on_older_or_unreadable_shards(manifest, tmp_path):
    meta, _ = _fill(manifest, tmp_path / "c", shard_clips=2)
    root, key = tmp_path / "c", meta.arrays[0].key
    r = CliRunner().invoke(extract_cli, ["--verify", str(root), "-q"])
    assert r.exit_code == 0 and "3 match their checksums" in r.output, r.output
    path = root / "status" / "shard-00002.json"  # as written before 2026-11-28: no checksums
    status = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in status.items() if k != "checksums"}))
    report = verify_cache(root)
    assert report.ok and report.unrecorded == [2] and "written without checksums" in "\n".join(report.lines())
    (root / "tokens.zarr" / key / "c" / "0" / "0" / "0" / "0").write_bytes(b"")  # cut to nothing by a copy
    r = CliRunner().invoke(extract_cli, ["--verify", str(root), "-q"])
    assert r.exit_code == 1 and "DAMAGED   shard 0: array" in r.output and "cannot be read" in r.output, r.output
    assert "before caches recorded their decoding rules" in r.output and "again with --overwrite" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(extract_cli, ["--verify", str(tmp_path / "nothing"), "-q"])
    assert r.exit_code == 2 and "Fix:" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("storage", ["zarr", "hdf5"])
def test_verify_blames_each_shard_for_its_own_file_only(manifest, tmp_path, storage):
    """An unwritten shard (an unfinished extraction) is no other shard's fault, and a deleted shard file is
    its own shard's damage (HDF5 once named whichever shard was read first, and read the missing one as zeros)."""
    meta, _ = _fill(manifest, tmp_path / "c", storage=storage, shard_clips=2)
    root = tmp_path / "c"
    data = (lambda k: root / "tokens.zarr" / meta.arrays[0].key / "c" / str(k) / "0" / "0" / "0") if storage == "zarr" \
        else (lambda k: root / "shards" / f"shard-{k:05d}.h5")
    data(2).unlink()
    (root / "status" / "shard-00002.json").unlink()  # as an extraction stopped before shard 2 leaves it
    (root / "done.json").unlink()
    report = verify_cache(root)
    assert report.ok and report.matched == [0, 1] and report.not_written == [2], report.lines()
    _fill(manifest, tmp_path / "d", storage=storage, shard_clips=2)
    root = tmp_path / "d"
    data(1).unlink()  # (data reads root when called: now the second cache's)
    report = verify_cache(root)
    assert list(report.damaged) == [1] and report.matched == [0, 2], report.lines()


def test_the_checksum_is_of_the_bytes_in_c_order():
    a = np.arange(3 * 5 * 7, dtype=np.float16).reshape(3, 5, 7)
    assert data_checksum(a) == data_checksum(np.ascontiguousarray(a)) == data_checksum(a.copy(order="F"))
    assert data_checksum(a[:, ::2]) == data_checksum(np.ascontiguousarray(a[:, ::2]))
    b = a.copy()
    b[2, 4, 6] = 1
    assert data_checksum(b) != data_checksum(a) and data_checksum(a).startswith("crc32:")
