"""Loader worker processes kept across passes (cache/loader.py, ``Cache.iterate(..., workers=N)``)."""

import gc
import multiprocessing
import os
import pickle
import signal
import time
import weakref

import numpy as np
import pytest

from mettle.cache import CacheError, open_cache
from mettle.cache.reader import Cache

from test_cache import _fill  # tests/ holds no packages: the module is found by its folder

KEYS = ["visual/stage0.block0", "audio/stage1.block0"]


@pytest.fixture(scope="module")
def cache6(toy_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("loader") / "c"
    truth = _fill(toy_manifest.subset(range(6)), root, dtype="float16")[1]
    return root, truth


def _workers() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def _check(batches, got, truth, keys=KEYS):
    got = list(got)
    assert [b["row"].tolist() for b in got] == [list(r) for r in batches]
    for rows, batch in zip(batches, got):
        assert sorted(batch["tokens"]) == sorted(keys)
        for key in keys:
            assert np.array_equal(batch["tokens"][key].numpy(), truth[key][rows].astype(np.float16)), (rows, key)


def test_workers_are_kept_across_passes_until_close(cache6):
    """Epochs and evaluations read through the same worker processes: started once, they serve every pass with
    that pass's own batches (a pass dropped half-read leaves nothing behind for the next), until close()."""
    root, truth = cache6
    before = _workers()
    with open_cache(root) as cache:
        first = [[3, 1], [0, 4, 2], [5]]
        _check(first, cache.iterate(first, KEYS, workers=2), truth)
        kept = _workers() - before
        assert len(kept) == 2  # the loader's two workers, alive after the pass
        second = [[2], [5, 0], [1, 3, 4]]
        _check(second, cache.iterate(second, KEYS, workers=2, seed=1), truth)
        part = cache.iterate(first, KEYS, workers=2)
        next(part)
        del part  # dropped after one batch, the workers still reading ahead
        _check(second, cache.iterate(second, KEYS, workers=2), truth)
        assert _workers() - before == kept  # the same processes all along
        loader = cache._kept
    assert loader.closed and cache._kept is None
    assert not (_workers() & kept)  # ended with the cache's close (``with``)
    _check(first, cache.iterate(first, KEYS, workers=2), truth)  # a closed cache starts new workers
    assert cache._kept is not None and not (_workers() & kept)
    copy = pickle.loads(pickle.dumps(cache))  # a cache sent to a worker process takes no loader with it
    assert copy._kept is None
    cache.close()


def test_a_second_pass_while_one_is_read_gets_workers_of_its_own(cache6):
    """Two passes at once (an evaluation inside a training pass): the second reads on a loader of its own,
    and neither sees the other's batches; once the first is done, passes use the kept workers again."""
    root, truth = cache6
    cache = open_cache(root)
    outer, inner = [[0, 1], [2, 3], [4, 5]], [[5], [4], [3]]
    running = cache.iterate(outer, KEYS, workers=2)
    got = [next(running)]
    kept = cache._kept
    assert kept.busy()
    _check(inner, cache.iterate(inner, KEYS, workers=2), truth)
    assert cache._kept is kept and kept.busy()  # the first pass still owns the kept workers
    got += list(running)
    _check(outer, got, truth)
    assert not kept.busy()
    _check(inner, cache.iterate(inner, KEYS, workers=2), truth)
    assert cache._kept is kept
    running = cache.iterate(outer, KEYS, workers=2)
    next(running)
    cache.close()  # closed during a pass: the pass says so instead of ending as if complete
    with pytest.raises(CacheError, match="closed during this pass"):
        next(running)
    running = cache.iterate(outer, KEYS, workers=1)  # other workers: another kept loader ...
    got = [next(running)]
    kept = cache._kept
    assert kept.workers == 1
    _check(inner, cache.iterate(inner, KEYS[:1], workers=2), truth, KEYS[:1])  # ... left alone by
    _check(inner, cache.iterate(inner, KEYS, workers=1), truth)  # passes with other keys or workers meanwhile
    assert cache._kept is kept and not kept.closed
    _check(outer, got + list(running), truth)
    cache.close()


def test_a_failed_pass_discards_the_workers_and_the_next_starts_new_ones(cache6, monkeypatch):
    """A read failing in a worker reaches the caller; the kept workers are closed, so the next pass runs on
    new ones instead of a loader left in an unknown state."""
    root, truth = cache6
    read = Cache.read

    def failing(self, key, rows, *args, **kwargs):  # workers are forked: they inherit this
        if 5 in np.asarray(rows).tolist():
            raise OSError("disk error on row 5")
        return read(self, key, rows, *args, **kwargs)

    monkeypatch.setattr(Cache, "read", failing)
    before = _workers()
    cache = open_cache(root)
    _check([[0, 1]], cache.iterate([[0, 1]], KEYS, workers=2), truth)
    first = cache._kept
    pids = _workers() - before
    with pytest.raises(OSError, match="row 5"):
        list(cache.iterate([[2], [5]], KEYS, workers=2))
    assert first.closed and not (_workers() & pids)
    _check([[3, 4], [2]], cache.iterate([[3, 4], [2]], KEYS, workers=2), truth)
    assert cache._kept is not first and not cache._kept.closed
    cache.close()


def test_a_dropped_cache_ends_its_workers_at_once(cache6):
    """No reference cycle holds a cache (its own dataset refers to it weakly), so dropping it ends its
    workers there and then; left to the cyclic garbage collector, ending them waited 5 s a worker. A cache
    used only for one pass (``open_cache(p).iterate(...)``) lives as long as the pass."""
    root, truth = cache6
    batches = [[4, 0], [1]]
    gc.disable()
    try:
        before = _workers()
        for workers in (0, 2):
            _check(batches, open_cache(root).iterate(batches, KEYS, workers=workers), truth)
            assert not (_workers() - before)  # the pass over, the cache and its workers are gone
        cache = open_cache(root)
        _check(batches, cache.iterate(batches, KEYS, workers=2), truth)
        assert len(_workers() - before) == 2
        dropped = weakref.ref(cache)
        del cache
        assert dropped() is None and not (_workers() - before)
    finally:
        gc.enable()


def test_workers_gone_between_passes_are_replaced(cache6):
    """Ctrl-C reaches the workers too, and they exit; the next pass starts new ones instead of waiting for
    the old ones and failing."""
    root, truth = cache6
    # as in a terminal: a job started in the background (CI's) ignores SIGINT, and so would the forked workers
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = _workers()
        with open_cache(root) as cache:
            _check([[0, 1]], cache.iterate([[0, 1]], KEYS, workers=2), truth)
            old, pids = cache._kept, _workers() - before
            for pid in pids:
                os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + 10
            while _workers() & pids and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not (_workers() & pids)
            assert not old.healthy()
            _check([[5, 2], [3]], cache.iterate([[5, 2], [3]], KEYS, workers=2), truth)
            assert cache._kept is not old and old.closed and len(_workers() - before) == 2
    finally:
        signal.signal(signal.SIGINT, saved)
