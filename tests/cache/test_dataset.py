"""The training data path's kept rows (cache/dataset.py) where batches are page-locked."""

import multiprocessing
import pickle

import numpy as np
import pytest
import torch

from mettle.cache import CacheError, open_cache
from mettle.cache.format import MANIFEST_FILE
from mettle.cache import dataset as dataset_module

from test_cache import _fill  # tests/ holds no packages: the module is found by its folder


@pytest.fixture(scope="module")
def rows5(toy_manifest):
    return toy_manifest.subset(range(5))


def test_rows_of_page_locked_batches_are_kept_as_copies(rows5, tmp_path, monkeypatch):
    """On CUDA machines batches are read into page-locked memory; the rows kept for later epochs are copies
    in ordinary memory, not views of the batch: a view would hold the batch's page-locked block, and a forked
    loader worker reading the parent's kept rows must not touch memory CUDA allocated. Page-locked memory
    needs CUDA, so here ``torch.empty(..., pin_memory=True)`` makes ordinary memory; what is checked is that
    kept rows share no memory with the batch, and that they hold the batch's values."""
    truth = _fill(rows5, tmp_path / "c", dtype="float16")[1]
    empty = torch.empty
    monkeypatch.setattr(dataset_module.torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    cache = open_cache(tmp_path / "c")
    keys = ["visual/stage0.block0", "audio/stage1.block0"]
    ds = dataset_module.TokenDataset(cache, range(5), keys, dtype="float16")
    for pinned in (True, False):
        ds._kept.clear()
        ds._kept_bytes = 0
        batch = dataset_module.BatchedTokens(ds, pinned=pinned).__getitems__([3, 1, 4])
        for key in keys:
            got = batch["tokens"][key]
            assert np.array_equal(got.numpy(), truth[key][[3, 1, 4]].astype(np.float16))
            start, end = got.data_ptr(), got.data_ptr() + got.numel() * got.element_size()
            for pos, row in enumerate([3, 1, 4]):
                kept = ds._kept[row][key]
                assert torch.equal(kept, got[pos])
                inside = start <= kept.data_ptr() < end
                assert inside != pinned, (pinned, row, key)  # pinned: a copy; otherwise a view, no copy made


def test_loader_workers_start_from_a_forkserver_once_cuda_is_initialised(rows5, tmp_path, monkeypatch):
    """A process with CUDA initialised starts its loader workers from a forkserver, not by fork (see
    ``loader_context``). Without a GPU, torch is told CUDA is initialised: the batches must be the cache's
    rows, read by worker processes that began from a pickle of the dataset, which leaves the parent's kept
    rows behind."""
    truth = _fill(rows5, tmp_path / "c", dtype="float16")[1]
    cache = open_cache(tmp_path / "c")
    keys = ["visual/stage0.block0", "audio/stage1.block0"]
    fork_default = multiprocessing.get_all_start_methods()[0] == "fork"  # Linux before Python 3.14
    assert (dataset_module.loader_context(2, cuda=False) is None) == fork_default
    assert dataset_module.loader_context(0, cuda=True) is None
    assert dataset_module.loader_context(2, cuda=True).get_start_method() == "forkserver"
    batches = [[3, 1], [0, 4, 2]]
    first = list(cache.iterate(batches, keys))  # no workers: rows are read here and kept for later epochs
    ds = next(iter(cache._datasets.values()))
    assert sorted(ds._kept) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    started = []
    make = torch.utils.data.DataLoader.__init__

    def record(self, *args, **kwargs):
        started.append(kwargs.get("multiprocessing_context"))
        make(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", record)
    for workers in (0, 2):
        for rows, batch, before in zip(batches, cache.iterate(batches, keys, workers=workers), first):
            assert batch["row"].tolist() == rows
            for key in keys:
                assert np.array_equal(batch["tokens"][key].numpy(), truth[key][rows].astype(np.float16))
                assert torch.equal(batch["tokens"][key], before["tokens"][key])
    assert started[0] is None and started[1].get_start_method() == "forkserver"
    cache.close()  # the kept workers end here, not whenever the cache is collected
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._kept == {} and copy._kept_bytes == 0 and copy.rows == ds.rows and ds._kept  # the parent keeps its rows
    assert "manifest" not in copy.cache.__dict__ and not copy.cache._datasets  # the manifest stays behind
    again = pickle.loads(pickle.dumps(copy.cache))  # a copy of a copy that never read it
    assert copy.cache.manifest.sha256() == cache.manifest.sha256()  # ... and is read again when asked for
    assert again.manifest.sha256() == cache.manifest.sha256()
    stale = pickle.loads(pickle.dumps(cache))
    path = tmp_path / "c" / MANIFEST_FILE
    path.write_text(path.read_text().replace(cache.manifest.clips[0].clip_id, "renamed"))
    with pytest.raises(CacheError, match="changed since this cache was opened"):
        stale.manifest
    with pytest.raises(AttributeError, match="no attribute 'manifests'"):
        copy.cache.manifests
