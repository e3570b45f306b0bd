"""The cache format: budgets, dtypes, both storages, the reader's checks and laziness."""

import json
import shutil

import numpy as np
import pytest
import torch

from mettle.cache import (BackboneRecord, BlockLayout, CacheError, Float16Overflow, ShardBuffer, ShardStatus,
                          create_cache, describe, open_cache, plan_cache)
from mettle.cache.dtypes import decode, encode, get_dtype
from mettle.cache.format import FORMAT_VERSION, CacheMeta


def _layout(grids_dims_depths):
    blocks, i = [], 0
    for stage, (grid, dim, depth) in enumerate(grids_dims_depths):
        for b in range(depth):
            blocks.append(BlockLayout(i, f"stage{stage}.block{b}", grid * grid, dim, (grid, grid), stage))
            i += 1
    return tuple(blocks)


VISUAL = BackboneRecord("fake_swin", "visual", "random-init", {"resize": [192, 192]},
                        _layout([(8, 4, 1), (4, 8, 1), (2, 16, 2)]))
AUDIO = BackboneRecord("fake_htsat", "audio", "abc123", {"tile": 10}, _layout([(4, 6, 2), (2, 12, 1)]))


@pytest.fixture(scope="module")
def manifest(toy_manifest):
    return toy_manifest.subset(range(5))


def _fill(manifest, root, storage="zarr", dtype="float32", tokens="full", shard_clips=2, seed=0):
    """Write a cache of random tokens; return (meta, {key: float32 array written})."""
    meta = plan_cache(manifest, {"visual": VISUAL, "audio": AUDIO}, storage=storage, dtype=dtype, tokens=tokens,
                      shard_clips=shard_clips)
    writer = create_cache(root, meta, manifest)
    rng = np.random.default_rng(seed)
    truth = {a.key: (rng.standard_normal(meta.shape(a)) * 3).astype(np.float32) for a in meta.arrays}
    for k in writer.pending_shards():
        buf = ShardBuffer(meta, k)
        for local, row in enumerate(meta.shard_rows(k)):
            for key, arr in truth.items():
                buf.put(key, local, slice(None), arr[row])
        clips = {manifest.clips[r].clip_id: "ok" for r in meta.shard_rows(k)}
        writer.write_shard(buf, ShardStatus(k, clips))
    writer.finish({"seconds": 1.0})
    return meta, truth


def test_dtype_codecs():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 7, 33)) * 10).astype(np.float32)
    codes, scale = encode(x, get_dtype("float32"))
    assert scale is None and np.array_equal(decode(codes, scale), x)
    codes, _ = encode(x, get_dtype("float16"))
    assert codes.dtype == np.float16 and np.abs(decode(codes, None) - x).max() <= np.abs(x).max() * 2 ** -10
    codes, scale = encode(x, get_dtype("int8"))
    assert codes.dtype == np.int8 and scale.shape == (4, 7)
    err = np.abs(decode(codes, scale) - x)
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    assert np.linalg.norm(decode(codes, scale) - x) / np.linalg.norm(x) < 0.02
    with pytest.raises(Float16Overflow, match="--dtype float32"):
        encode(np.array([[1e5]], np.float32), get_dtype("float16"))
    with pytest.raises(CacheError, match="NaN"):
        encode(np.array([[np.nan]], np.float32), get_dtype("float32"))


@pytest.mark.parametrize("storage", ["zarr", "hdf5"])
def test_round_trip_float32_exact(manifest, tmp_path, storage):
    meta, truth = _fill(manifest, tmp_path / "c", storage=storage)
    cache = open_cache(tmp_path / "c")
    assert cache.complete and cache.meta == meta and cache.manifest == manifest
    for key, arr in truth.items():
        assert np.array_equal(cache.read(key, slice(None)), arr)
        assert np.array_equal(cache.read(key, [4, 0, 2]), arr[[4, 0, 2]])  # any order, across shards
        assert np.array_equal(cache.read(key, [1, 2, 3]), arr[1:4])


@pytest.mark.parametrize("dtype,bound", [("float16", 2e-3), ("int8", 2e-2)])
def test_round_trip_bounded_and_storages_agree(manifest, tmp_path, dtype, bound):
    _, truth = _fill(manifest, tmp_path / "z", storage="zarr", dtype=dtype, tokens="last-grid")
    _, truth_h = _fill(manifest, tmp_path / "h", storage="hdf5", dtype=dtype, tokens="last-grid")
    z, h = open_cache(tmp_path / "z"), open_cache(tmp_path / "h")
    assert z.meta.tokens == "last-grid" and all(a.grid == (2, 2) for a in z.meta.arrays if a.modality == "visual")
    for key, arr in truth.items():
        got = z.read(key, slice(None))
        assert np.linalg.norm(got - arr) / np.linalg.norm(arr) < bound
        assert np.array_equal(got, h.read(key, slice(None)))  # same bytes through either storage


def test_metadata_describes_the_cache(manifest, tmp_path):
    meta, _ = _fill(manifest, tmp_path / "c", dtype="int8")
    d = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert d["format"] == "mettle-cache" and d["format_version"] == FORMAT_VERSION
    assert d["manifest_sha256"] == manifest.sha256() and d["vocabularies"]["event"]
    assert d["backbones"]["audio"]["weights_id"] == "abc123" and d["backbones"]["visual"]["preprocess"]
    assert {a["key"] for a in d["arrays"]} == set(meta.keys())
    assert CacheMeta.from_dict(d) == meta
    assert meta.bytes_per_clip() == 10 * sum(a.tokens * a.dim + 4 * a.tokens for a in meta.arrays)
    lines = "\n".join(describe(tmp_path / "c"))
    assert "ok 5, failed 0" in lines and "visual/stage2.block1" in lines and "int8" in lines


def test_reading_some_blocks_of_some_clips_touches_nothing_else(manifest, tmp_path):
    _, truth = _fill(manifest, tmp_path / "c", shard_clips=2)
    root = tmp_path / "c" / "tokens.zarr"
    keep = root / "visual" / "stage0.block0" / "c" / "0"  # shard 0 (clips 0-1) of one array
    corrupted = 0
    for f in root.rglob("*"):
        if f.is_file() and f.name != "zarr.json" and keep not in f.parents:
            f.write_bytes(b"garbage" * 10)
            corrupted += 1
    assert corrupted >= 10
    cache = open_cache(tmp_path / "c")
    ds = cache.dataset(None, keys=["visual/stage0.block0"])
    assert np.array_equal(ds[1]["tokens"]["visual/stage0.block0"].numpy(), truth["visual/stage0.block0"][1])
    with pytest.raises(Exception):  # control: the corrupted parts really are unreadable
        cache.read("visual/stage0.block0", [4])


def test_dataset_batches_and_workers(manifest, tmp_path):
    _, truth = _fill(manifest, tmp_path / "c")
    cache = open_cache(tmp_path / "c")
    keys = ["visual/stage1.block0", "audio/stage1.block0"]
    ds = cache.dataset(None, keys=keys)
    assert len(ds) == 5
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        for i, row in enumerate(batch["row"].tolist()):
            seen.append(row)
            for k in keys:
                assert np.array_equal(batch["tokens"][k][i].numpy(), truth[k][row])
    assert sorted(seen) == list(range(5))
    batches = [[4, 1], [0, 2], [3]]  # the training path: whole batches read by threads in worker processes
    for rows, batch in zip(batches, cache.iterate(batches, keys, workers=2)):
        assert batch["row"].tolist() == rows
        for k in keys:
            assert np.array_equal(batch["tokens"][k].numpy(), truth[k][rows].astype(batch["tokens"][k].numpy().dtype))


@pytest.mark.parametrize("dtype,budget", [("float16", 1 << 30), ("float16", 0), ("float32", 1 << 30)])
def test_iterate_stacks_batches_in_the_stored_precision(manifest, tmp_path, dtype, budget):
    """Training batches: given order, repeated rows, kept rows mixed with fresh ones, no collation."""
    _fill(manifest, tmp_path / "c", dtype=dtype)
    cache = open_cache(tmp_path / "c")
    cache.memory_budget = budget
    keys = ["visual/stage0.block0", "audio/stage1.block0"]
    batches = [[3, 1], [1, 1, 4], [0, 2, 3, 4], [4, 0]]
    for epoch in range(2):  # the second epoch comes from kept rows (when the budget allows)
        for rows, batch in zip(batches, cache.iterate(batches, keys, seed=epoch)):
            assert batch["row"].tolist() == rows
            for k in keys:
                got = batch["tokens"][k]
                assert got.dtype == getattr(torch, dtype) and got.shape[0] == len(rows)
                want = np.stack([cache.read(k, [r], dtype)[0] for r in rows])
                assert np.array_equal(got.numpy(), want)
    assert (cache._datasets[(tuple(keys), ())]._kept_bytes > 0) == (budget > 0)


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_batch_memory_is_reused_only_when_nothing_holds_it(manifest, tmp_path, budget):
    """Also with a batch's arrays read by several threads (two keys: one thread each)."""
    truth = _fill(manifest, tmp_path / "c", dtype="float16")[1]
    cache = open_cache(tmp_path / "c")
    cache.memory_budget = budget
    keys = ["visual/stage2.block1", "audio/stage0.block0"]
    batches = [[3, 1], [0, 2], [4, 1], [2, 0], [1, 3], [0, 4]]
    held = list(cache.iterate(batches, keys, seed=1))  # every batch kept: none may be overwritten
    for rows, batch in zip(batches, held):
        for key in keys:
            assert np.array_equal(batch["tokens"][key].numpy(), truth[key][rows].astype(np.float16))
    del held
    cache = open_cache(tmp_path / "c")
    cache.memory_budget = budget
    pointers = {key: set() for key in keys}
    for rows, batch in zip(batches, cache.iterate(batches, keys, seed=1)):  # each dropped after use
        for key in keys:
            assert np.array_equal(batch["tokens"][key].numpy(), truth[key][rows].astype(np.float16))
            pointers[key].add(batch["tokens"][key].data_ptr())
    if budget == 0:  # a few arrays serve every batch (with a budget, kept rows hold on to theirs)
        assert all(len(p) <= 3 for p in pointers.values())
        del batch  # the last batch of an epoch, dropped
        for b in cache.iterate(batches, keys, seed=2):  # the next epoch reuses them too: no fresh pages
            assert all(b["tokens"][key].data_ptr() in pointers[key] for key in keys)
    import pickle

    pool = cache._datasets[(tuple(keys), ())].batch_arrays
    assert pool._arrays and not pickle.loads(pickle.dumps(pool))._arrays  # a worker's copy starts empty


def test_open_cache_refusals(manifest, tmp_path):
    _fill(manifest, tmp_path / "c")
    with pytest.raises(CacheError, match="backbone.visual = fake_swin, but other is required"):
        open_cache(tmp_path / "c", expect={"backbone.visual": "other"})
    with pytest.raises(CacheError, match="no cache.json"):
        open_cache(tmp_path)
    with pytest.raises(CacheError, match="does not exist"):
        open_cache(tmp_path / "nope")
    bad = tmp_path / "v"
    shutil.copytree(tmp_path / "c", bad)
    d = json.loads((bad / "cache.json").read_text())
    d["format_version"] = FORMAT_VERSION + 1
    (bad / "cache.json").write_text(json.dumps(d))
    with pytest.raises(CacheError, match="format version .*--overwrite"):
        open_cache(bad)
    other = tmp_path / "m"
    shutil.copytree(tmp_path / "c", other)
    (other / "manifest.json").write_text(manifest.subset([1, 0, 2, 3, 4]).to_json())
    with pytest.raises(CacheError, match="not the manifest this cache was built from"):
        open_cache(other)
    (other / "done.json").unlink()
    (other / "manifest.json").write_text(manifest.to_json())
    with pytest.raises(CacheError, match="not finished"):
        open_cache(other)
    assert not open_cache(other, allow_incomplete=True).complete


def test_create_cache_resume_refuse_overwrite(manifest, tmp_path):
    meta, _ = _fill(manifest, tmp_path / "c")
    again = create_cache(tmp_path / "c", meta, manifest)
    assert again.pending_shards() == [] and again.done
    other = plan_cache(manifest, {"visual": VISUAL, "audio": AUDIO}, dtype="float16", tokens="full", shard_clips=2)
    with pytest.raises(CacheError, match="dtype: cache has float32, this run has float16.*--overwrite"):
        create_cache(tmp_path / "c", other, manifest)
    fresh = create_cache(tmp_path / "c", other, manifest, overwrite=True)
    assert fresh.pending_shards() == [0, 1, 2] and not fresh.done
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a mettle cache"):
        create_cache(junk, meta, manifest, overwrite=True)
    assert (junk / "notes.txt").exists()
    half = tmp_path / "half"  # killed between the manifest copy and cache.json
    half.mkdir()
    (half / ".mettle-creating").touch()  # the marker a creation writes first
    (half / "manifest.json").write_text("{")
    assert create_cache(half, meta, manifest).pending_shards() == [0, 1, 2]


@pytest.mark.parametrize("storage,dtype", [("zarr", "float16"), ("zarr", "int8"), ("hdf5", "float16"),
                                           ("zarr-general", "float32")])
def test_reads_into_a_given_array(manifest, tmp_path, storage, dtype, monkeypatch):
    """``into`` (how training reads batches into page-locked memory) holds what a plain read returns."""
    _fill(manifest, tmp_path / "c", storage=storage.split("-")[0], dtype=dtype)
    cache = open_cache(tmp_path / "c")
    if storage == "zarr-general":  # zarr's own read path, not the direct shard reader
        monkeypatch.setattr(cache.store, "_fast", lambda name: None)
    out = cache.batch_dtype
    for key in ("visual/stage2.block1", "audio/stage0.block0"):
        for rows in ([4, 0, 2], [1, 2, 3], [3]):
            want = cache.read(key, rows, out)
            into = np.full(want.shape, np.nan, dtype=out)
            got = cache.read(key, rows, out, into=into)
            assert got is into and np.array_equal(got, want), (key, rows)
    with pytest.raises(ValueError):
        cache.read("audio/stage0.block0", [0, 1], out, into=np.empty((3, 1), out))
    with pytest.raises(ValueError, match="into is float64, the tokens are asked for as"):
        cache.read("audio/stage0.block0", [0, 1], out, into=np.empty((2, 1), np.float64))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_direct_shard_reads_equal_zarr(manifest, tmp_path, dtype):
    import zarr

    from mettle.cache.store import stored_arrays
    from mettle.cache.zarr_fast import FastShardReader

    meta, _ = _fill(manifest, tmp_path / "c", dtype=dtype, shard_clips=2)  # 5 clips: the last shard is partial
    root = tmp_path / "c" / "tokens.zarr"
    cache = open_cache(tmp_path / "c")
    rng = np.random.default_rng(3)
    names = [n for n, _, _ in stored_arrays(meta)]
    for name in names:
        assert cache.store._fast(name) is not None, name
        arr = zarr.open_array(str(root / name), mode="r")
        for _ in range(4):
            rows = rng.permutation(5)[: rng.integers(1, 6)]
            want = arr.oindex[np.sort(rows)][np.argsort(np.argsort(rows))]
            assert np.array_equal(cache.store.read(name, rows), want), name
    with pytest.raises(FileNotFoundError):
        FastShardReader(tmp_path / "nope")
    assert cache.store._fast("targets/none") is None  # anything unreadable falls back to zarr


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_direct_shard_writes_equal_zarr(manifest, tmp_path, dtype, monkeypatch):
    """Shard files written straight (``zarr_fast.write_shard_file``) are byte for byte what zarr writes
    (no row here is all zeros, which zarr would leave out), and zarr reads them back as the rows
    written (the last shard is partial: 5 clips, 2 per shard)."""
    import zarr

    from mettle.cache import store as store_module
    from mettle.cache.store import stored_arrays

    meta, truth = _fill(manifest, tmp_path / "direct", dtype=dtype, shard_clips=2)
    monkeypatch.setattr(store_module.ZarrStore, "_layout", lambda self, name: None)  # zarr's own writer
    _fill(manifest, tmp_path / "zarr", dtype=dtype, shard_clips=2)
    names = [n for n, _, _ in stored_arrays(meta)]
    assert len(names) > 4
    for name in names:
        files = sorted(p.relative_to(tmp_path / "zarr") for p in (tmp_path / "zarr" / "tokens.zarr" / name).rglob("*")
                       if p.is_file())
        assert len(files) == 1 + meta.num_shards, (name, files)  # zarr.json + one file per shard
        for f in files:
            assert (tmp_path / "direct" / f).read_bytes() == (tmp_path / "zarr" / f).read_bytes(), f
    for key, want in truth.items():
        got = zarr.open_array(str(tmp_path / "direct" / "tokens.zarr" / key), mode="r")[:]
        scale = zarr.open_array(str(tmp_path / "direct" / "tokens.zarr" / (key + ".scale")), mode="r")[:] \
            if dtype == "int8" else None
        assert np.allclose(decode(got, scale), want, rtol=2e-3, atol=np.abs(want).max() / 127), key
    layout = store_module.ShardLayout.of(tmp_path / "direct" / "tokens.zarr" / names[0])
    with pytest.raises(ValueError, match="holds rows of shape"):
        store_module.write_shard_file(layout, 2, np.zeros((2, *layout.shape[1:]), layout.dtype))  # shard 2 has 1 row


def test_a_failed_direct_shard_write_leaves_no_file(manifest, tmp_path, monkeypatch):
    """A write that fails (disk full) leaves neither a shard file nor its temporary behind, and the
    writer reports it with the fix (the rerun redoes the shard)."""
    from mettle.cache import zarr_fast

    meta = plan_cache(manifest, {"visual": VISUAL, "audio": AUDIO}, dtype="int8", shard_clips=2)
    writer = create_cache(tmp_path / "c", meta, manifest)
    buf = ShardBuffer(meta, 0)

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zarr_fast.os, "replace", full)
    with pytest.raises(CacheError, match="No space left on device.*free disk space"):
        writer.write_shard(buf, ShardStatus(0, {}))
    assert not [p for p in (tmp_path / "c" / "tokens.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert writer.pending_shards() == [0, 1, 2]
    with pytest.raises(ValueError, match="need their per-token scales"):
        buf.put_codes(meta.arrays[0].key, 0, slice(None), np.zeros(meta.shape(meta.arrays[0])[1:], np.int8), None)


@pytest.mark.parametrize("storage", ["zarr", "hdf5"])
def test_int8_codes_and_scales_read_as_stored(manifest, tmp_path, storage):
    """An int8 cache read as ``int8`` gives its codes (straight into ``into`` too), ``read_scales`` the
    per-token scales; codes x scales are the decoded tokens, bit for bit. Batches of ``codes`` keys
    come that way from ``iterate``, the other keys decoded; other dtypes refuse ``int8`` reads."""
    from mettle.cache import SCALE

    _fill(manifest, tmp_path / "c", storage=storage, dtype="int8")
    cache = open_cache(tmp_path / "c")
    key, rows = "visual/stage2.block1", [4, 0, 2]
    codes, scales = cache.read(key, rows, "int8"), cache.read_scales(key, rows)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == codes.shape[:-1]
    assert np.array_equal(codes.astype(np.float32) * scales[..., None], cache.read(key, rows))
    into = np.zeros(codes.shape, np.int8)
    assert cache.read(key, rows, "int8", into=into) is into and np.array_equal(into, codes)
    for workers in (0, 1):
        batch = next(iter(cache.iterate([rows], [key, "audio/stage0.block0"], workers, codes=[key])))
        tokens = batch["tokens"]
        assert set(tokens) == {key, key + SCALE, "audio/stage0.block0"}
        assert tokens[key].dtype == torch.int8 and np.array_equal(tokens[key].numpy(), codes)
        assert np.array_equal(tokens[key + SCALE].numpy(), scales)
        assert np.array_equal(tokens["audio/stage0.block0"].numpy(), cache.read("audio/stage0.block0", rows))
    second = next(iter(cache.iterate([rows], [key, "audio/stage0.block0"], codes=[key])))  # rows kept in memory
    assert np.array_equal(second["tokens"][key].numpy(), codes)
    with pytest.raises(ValueError, match="no scales"):
        _fill(manifest, tmp_path / "f", storage=storage, dtype="float16")
        open_cache(tmp_path / "f").read_scales(key, rows)
    with pytest.raises(ValueError, match="float32 or float16, not int8"):
        open_cache(tmp_path / "f").read(key, rows, "int8")
    plain = next(iter(open_cache(tmp_path / "f").iterate([rows], [key], codes=[key])))  # floats: codes ignored
    assert set(plain["tokens"]) == {key} and plain["tokens"][key].dtype == torch.float16


def test_int8_decoding_in_one_pass_equals_the_two_step_form():
    """``decode`` multiplies codes by their scales in one pass (into a given array or a new one): the
    same numbers as converting to float32, multiplying and rounding to the output dtype."""
    from mettle.cache.dtypes import decode

    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (3, 10, 9, 16), dtype=np.int8)
    scale = (rng.random((3, 10, 9)) * 0.1).astype(np.float32)
    for out in ("float32", "float16"):
        want = (codes.astype(np.float32) * scale[..., None]).astype(out)
        into = np.full(codes.shape, np.nan, dtype=out)
        assert decode(codes, scale, out, into) is into and np.array_equal(into, want), out
        got = decode(codes, scale, out)
        assert got.dtype == np.dtype(out) and np.array_equal(got, want), out
    halves = rng.standard_normal((2, 4)).astype(np.float16)
    assert decode(halves, None, "float16") is halves  # nothing to do: the array itself
