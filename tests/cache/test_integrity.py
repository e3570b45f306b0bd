"""A cache's integrity: damaged or missing shard files, damaged metadata, what creation may delete,
and the decoding rules a resume must match. Each case was once read silently (zeros, wrong rows) or
deleted what mettle did not write."""

import json
import shutil

import numpy as np
import pytest

from mettle.cache import CacheError, create_cache, open_cache, plan_cache
from mettle.cache.format import CacheMeta
from test_cache import AUDIO, VISUAL, _fill  # tests/ holds no packages: the module is found by its folder


@pytest.fixture(scope="module")
def manifest(toy_manifest):
    return toy_manifest.subset(range(5))


@pytest.mark.parametrize("storage", ["zarr", "hdf5"])
def test_a_damaged_shard_file_is_named_not_read_as_zeros(manifest, tmp_path, storage):
    """A finished cache whose shard file went missing, was cut short or had its index damaged (a crash
    after the status was written, a disk error, a stray rm) raises CacheError naming the file, on every
    read path, instead of handing out zeros or wrong rows."""
    meta, truth = _fill(manifest, tmp_path / "good", storage=storage, shard_clips=2)
    key = meta.arrays[0].key

    def damaged(how):
        root = tmp_path / how
        shutil.copytree(tmp_path / "good", root)
        path = (root / "tokens.zarr" / key / "c" / "1" / "0" / "0" / "0" if storage == "zarr"
                else root / "shards" / "shard-00001.h5")
        data = path.read_bytes()
        if how == "missing":
            path.unlink()
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "short":
            path.write_bytes(data[: len(data) // 2])
        elif how == "index":  # the second chunk's offset 4 bytes early, still inside the file: only the
            b = bytearray(data)  # CRC32C zarr keeps of the index tells (HDF5 has no such index)
            at = len(b) - 4 - 16
            b[at:at + 8] = (int.from_bytes(b[at:at + 8], "little") - 4).to_bytes(8, "little")
            path.write_bytes(bytes(b))
        return open_cache(root), path

    assert np.array_equal(open_cache(tmp_path / "good").read(key, [2, 3]), truth[key][[2, 3]])
    for how in ("missing", "empty", "short", *(["index"] if storage == "zarr" else [])):
        cache, path = damaged(how)
        with pytest.raises(CacheError, match=f"{path.name if storage == 'hdf5' else 'shard file'}.*Fix: re-extract"):
            cache.read(key, [2, 3])
        if storage == "zarr":
            assert str(path) in str(pytest.raises(CacheError, cache.read, key, [3]).value), how
        assert np.array_equal(cache.read(key, [0, 1]), truth[key][[0, 1]]) or storage == "hdf5", how
        if how == "missing":  # the batch reader opens the store first (prepare()): the check holds there too
            fresh = open_cache(cache.root)
            with pytest.raises(CacheError, match="missing|cannot be read"):
                fresh.store.prepare()
                fresh.read(key, [2, 3])
            # a shard of failed clips only: zarr's own writer (mettle before 2026-11-27) left its file out,
            # and such a cache reads its rows as zeros, as it always did
            done = json.loads((cache.root / "done.json").read_text())
            done["clip_status"][2:4] = ["decode failed", "decode failed"]
            (cache.root / "done.json").write_text(json.dumps(done))
            if storage == "zarr":
                assert not open_cache(cache.root).read(key, [2, 3]).any()


def test_damaged_or_edited_metadata_and_bad_rows_are_named(manifest, tmp_path):
    """done.json cut short or without its status, cache.json with the wrong types or a geometry that is
    not what is stored, rows outside the cache: each one error naming the file (or the rows) and the
    fix, where tracebacks, zeros or dropped rows came before."""
    meta, truth = _fill(manifest, tmp_path / "good", shard_clips=2)
    key = meta.arrays[0].key

    def edited(name, file, change):
        root = tmp_path / name
        shutil.copytree(tmp_path / "good", root)
        path = root / file
        path.write_text(change(path.read_text()))
        return root

    def meta_edit(**fields):
        return lambda text: json.dumps({**json.loads(text), **fields})

    for name, file, change, message in [
            ("cut", "done.json", lambda t: t[: len(t) // 2], r"done.json is damaged \(JSONDecodeError"),
            ("nostatus", "done.json", lambda t: json.dumps({k: v for k, v in json.loads(t).items()
                                                            if k != "clip_status"}), "done.json is damaged"),
            ("list", "done.json", lambda t: "[]", "done.json is damaged"),
            ("backbones", "cache.json", meta_edit(backbones=[]), "cache.json is damaged"),
            ("version", "cache.json", meta_edit(format_version="1"), "format version '1'")]:
        with pytest.raises(CacheError, match=message + ".*Fix: "):
            open_cache(edited(name, file, change))
    cache = open_cache(edited("segments", "cache.json", meta_edit(num_segments=meta.num_segments // 2)))
    with pytest.raises(CacheError, match=f"stores array {key} as .* but cache.json says .*Fix: restore"):
        cache.read(key, [0])
    good = open_cache(tmp_path / "good")
    for rows in ([5], [-1], [4, 5]):
        with pytest.raises(IndexError, match=r"outside 0\.\.4"):
            good.read(key, rows)
    assert np.array_equal(good.read(key, [4, 0]), truth[key][[4, 0]])
    assert np.array_equal(good.read(key, slice(3, None)), truth[key][3:])


def test_a_damaged_done_marker_or_status_file_is_rebuilt_by_a_rerun(manifest, tmp_path):
    """The writer treats a damaged done.json as absent (finish() writes it again from the status files)
    and a damaged status file as a shard not written (extracted again)."""
    from mettle.cache.writer import CacheWriter

    meta, _ = _fill(manifest, tmp_path / "c", shard_clips=2)
    writer = CacheWriter(tmp_path / "c", meta)
    assert writer.done and writer.pending_shards() == []
    (tmp_path / "c" / "done.json").write_text("{")
    (tmp_path / "c" / "status" / "shard-00001.json").write_text('{"shard": 1, "cl')
    assert not writer.done and writer.pending_shards() == [1]


def test_create_cache_deletes_only_what_mettle_wrote(manifest, tmp_path, caplog):
    """A folder whose names merely look like a cache's (a user's shards/ and manifest.json) is refused,
    untouched; only a creation marked as started by mettle is restarted; --overwrite replaces the
    cache but keeps files a user put beside it; finishing removes the temp files a killed writer left."""
    meta = plan_cache(manifest, {"visual": VISUAL, "audio": AUDIO}, dtype="float32", tokens="full", shard_clips=2)
    user = tmp_path / "user"
    (user / "shards").mkdir(parents=True)
    (user / "shards" / "notes.txt").write_text("precious")
    (user / "manifest.json").write_text("{}")
    with pytest.raises(CacheError, match="non-empty folder that is not a mettle cache"):
        create_cache(user, meta, manifest)
    assert (user / "shards" / "notes.txt").read_text() == "precious"

    started = tmp_path / "started"  # killed right after the store was created, before cache.json
    create_cache(started, meta, manifest)
    (started / "cache.json").unlink()
    (started / ".mettle-creating").touch()
    with caplog.at_level("INFO"):
        create_cache(started, meta, manifest)
    assert "interrupted cache creation" in caplog.text and (started / "cache.json").is_file()
    assert not (started / ".mettle-creating").exists()

    _fill(manifest, tmp_path / "c")
    (tmp_path / "c" / "README.txt").write_text("mine")
    orphan = tmp_path / "c" / "tokens.zarr" / meta.arrays[0].key / "c" / "0" / ".0.123.456.tmp"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half a shard")
    create_cache(tmp_path / "c", meta, manifest, overwrite=True)
    assert (tmp_path / "c" / "README.txt").read_text() == "mine"
    assert not (tmp_path / "c" / "done.json").exists() and not orphan.exists()
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half a shard")
    _fill(manifest, tmp_path / "c")  # resumes the fresh cache, writes every shard, finishes
    assert not orphan.exists() and (tmp_path / "c" / "README.txt").exists()


def test_a_resume_under_other_media_decoding_rules_is_refused(manifest, tmp_path):
    """The decoding rules are part of a cache's identity: a cache started before they were recorded, or
    under other rules, is not resumed by the current extractor (it would mix clips decoded both ways)."""
    import dataclasses

    meta = plan_cache(manifest, {"visual": VISUAL, "audio": AUDIO}, shard_clips=2, media={"audio": "rule A"})
    assert CacheMeta.from_dict(meta.to_dict()).media == {"audio": "rule A"}
    create_cache(tmp_path / "c", meta, manifest)
    assert create_cache(tmp_path / "c", meta, manifest).meta.media == {"audio": "rule A"}  # same rules: resumed
    with pytest.raises(CacheError, match="media decoding rules: the cache's were others.*--overwrite"):
        create_cache(tmp_path / "c", dataclasses.replace(meta, media={"audio": "rule B"}), manifest)
    old = dataclasses.replace(meta, media={})
    create_cache(tmp_path / "old", old, manifest)
    with pytest.raises(CacheError, match=r"not recorded \(extracted before 2026-11-28\)"):
        create_cache(tmp_path / "old", meta, manifest)
    # a backbone's preprocessing rule changed (the fbank image's padding, 2026-11-28): named, not "backbones differs"
    audio = dataclasses.replace(AUDIO, preprocess={**AUDIO.preprocess, "pad": "zeros after normalising"})
    with pytest.raises(CacheError, match=r"audio backbone preprocessing pad: cache has None, this run has zeros after"):
        create_cache(tmp_path / "c", dataclasses.replace(meta, backbones={"visual": VISUAL, "audio": audio}), manifest)
