"""A lazy torch Dataset over cache rows, with batched reads and a bounded in-memory row cache.

Contract: item ``i`` is ``{"row": int, "tokens": {key: Tensor (T, N, D)}}`` where ``row`` is the
manifest row (labels come from ``cache.manifest.clips[row]``) and keys are cache array keys; the
``codes`` keys of an int8 cache come as int8 codes with ``key + ".scale"`` float32 ``(T, N)`` beside them.
The default collate stacks these into ``{"row": (B,), "tokens": {key: (B, T, N, D)}}``.

Nothing is read before an item is asked for. ``__getitems__`` (used by DataLoader when present)
reads each array once per batch: sorted unique rows (several questions may share a clip), one
selection per array, which turns a batch of B clips into len(keys) reads instead of B * len(keys).

:class:`BatchedTokens` is the training path (``Cache.iterate``): the same reads, but a batch comes
out already stacked, ``{"row": (B,), "tokens": {key: (B, T, N, D)}}``, so no per-sample collation
runs; a batch of distinct rows not yet in memory is read straight into its order (no further copy).

Training reads the same rows every epoch, so read rows are kept in memory up to
``memory_budget`` bytes (per process; 0 disables it): a cache that fits is read from disk once,
a larger one keeps its first rows resident and streams the rest. Never more than the budget.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .dtypes import get_dtype
from .errors import CacheError
from .format import TARGETS
from .store import SCALE

DEFAULT_MEMORY_BUDGET = 1 << 30


class TokenDataset(Dataset):
    """Items of ``keys`` decoded to ``dtype``; on an int8 cache the ``codes`` keys come as their int8
    codes plus ``key + ".scale"`` (float32 ``(T, N)``) instead (see :class:`~mettle.cache.TokenSource`)."""

    def __init__(self, cache, rows: Sequence[int], keys: Sequence[str], dtype: str = "float32",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, codes: Sequence[str] = (), weak: bool = False) -> None:
        for k in keys:
            cache.meta.check_key(k)  # unknown keys fail here, naming the valid ones
        # weak: the dataset a Cache keeps for itself (Cache.iterate) refers to it weakly, so that no cycle
        # delays the Cache's collection, and with it the end of its loader workers (see cache/loader.py)
        self._cache = weakref.ref(cache) if weak else cache
        self.rows, self.keys, self.dtype = list(rows), list(keys), dtype
        scaled = get_dtype(cache.meta.dtype).scaled
        self.codes = {k for k in codes if scaled and k in self.keys and not k.startswith(TARGETS)}
        self.out_keys = list(dict.fromkeys(self.keys + [k + SCALE for k in self.keys if k in self.codes]))
        self.memory_budget = memory_budget
        self._kept: dict[int, dict[str, torch.Tensor]] = {}
        self._kept_bytes = 0
        self.batch_arrays = _Recycled()  # BatchedTokens' batch arrays: kept with the dataset, so across epochs

    @property
    def cache(self):
        cache = self._cache() if isinstance(self._cache, weakref.ref) else self._cache
        if cache is None:
            raise CacheError("the cache this dataset reads was closed and collected. Fix: keep the Cache "
                             "(open_cache(...)) referenced while its batches are read")
        return cache

    def __getstate__(self) -> dict:
        # a worker process started from a pickle (see loader_context) begins with no kept rows: sending the
        # parent's (up to memory_budget bytes) would cost more than the reads they save, and torch would
        # move them into shared memory on the way; it holds its copy of the cache itself
        return {**self.__dict__, "_cache": self.cache, "_kept": {}, "_kept_bytes": 0}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def dtype_of(self, key: str) -> str:
        return self.cache.meta.dtype if key in self.codes else self.dtype

    def read(self, key: str, rows: np.ndarray) -> np.ndarray:
        """``key`` of :attr:`out_keys` for ``rows``: tokens, codes, scales or targets."""
        if key.endswith(SCALE) and key[:-len(SCALE)] in self.codes:
            return self.cache.read_scales(key[:-len(SCALE)], rows)
        return self.cache.read(key, rows, self.dtype_of(key))

    def _keep(self, row: int, tokens: dict[str, torch.Tensor], copy: bool = False) -> None:
        """Keep ``row``'s tokens while the budget allows; ``copy``: as copies in ordinary memory (the caller's
        are views of page-locked batch arrays, see :class:`BatchedTokens`)."""
        size = sum(t.numel() * t.element_size() for t in tokens.values())
        if self._kept_bytes + size <= self.memory_budget:
            self._kept[row] = {k: t.clone() for k, t in tokens.items()} if copy else tokens
            self._kept_bytes += size

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        rows = np.asarray([self.rows[i] for i in indices], dtype=np.int64)
        unique = np.unique(rows)  # sorted; a row asked twice is read once
        missing = np.asarray([r for r in unique if r not in self._kept], dtype=np.int64)
        fresh: dict[int, dict[str, torch.Tensor]] = {}
        if len(missing):
            data = {k: self.read(k, missing) for k in self.out_keys}
            for pos, r in enumerate(missing.tolist()):
                fresh[r] = {k: torch.from_numpy(v[pos]) for k, v in data.items()}
                self._keep(r, fresh[r])
        return [{"row": int(r), "tokens": self._kept.get(int(r)) or fresh[int(r)]} for r in rows]


def _references(arrays: list[np.ndarray]) -> list[int]:
    return [sys.getrefcount(a) for a in arrays]


class _Recycled:
    """Batch arrays handed out again once nothing uses them.

    Why: writing a fresh array faults in each of its pages, which on a warm page cache cost the
    loader about a quarter of its speed (64-clip full-size cache, batches of 16: 70-76 % of a raw read
    with fresh arrays, about 100 % when the memory was reused). Whether an array is still in use is
    its reference count: every tensor made from it (a batch a consumer holds, a row the dataset keeps)
    holds a reference to it. What count means "free" is measured once on an array nothing else holds,
    through the same function (the interpreter's own references differ between Python versions).
    Up to ``per_key`` arrays of each key and shape are kept. The pool lives with its
    :class:`TokenDataset` (``Cache.iterate`` keeps that between epochs), so an epoch's first batches
    reuse the last epoch's arrays too (64-clip int8 cache, batches of 16: one batch's 156 MiB faulted
    in again every epoch before). A pickled copy (a spawned loader worker) starts empty; a forked one
    inherits the parent's, copy-on-write. The pool is outside ``memory_budget``: at most ``per_key``
    arrays per key and batch shape (an epoch's smaller last batch is another shape), for the life of
    the dataset. On CUDA machines batches are page-locked tensors from torch's own host allocator
    instead, which reuses its blocks by itself; this pool is the CPU path.
    """

    def __init__(self, per_key: int = 3) -> None:
        self.per_key = per_key
        self._arrays: dict[tuple, list[np.ndarray]] = {}
        self._free = _references([np.empty(0)])[0]

    def __getstate__(self) -> dict:
        return {"per_key": self.per_key}  # process-local memory: not sent to worker processes

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["per_key"])

    def get(self, key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        pool = self._arrays.setdefault((key, shape, dtype), [])
        for a, refs in zip(pool, _references(pool)):
            if refs <= self._free:
                return a
        a = np.empty(shape, dtype)
        if len(pool) < self.per_key:
            pool.append(a)
        return a


READ_THREADS = 4  # arrays of one batch read at once (at most the CPU count)


class BatchedTokens(Dataset):
    """Whole batches of a :class:`TokenDataset` (use with ``batch_sampler`` and :func:`whole_batch`).

    A batch of fresh rows is read straight into its arrays: page-locked tensors with ``pinned`` (CUDA
    only: its copy to the GPU then needs no staging copy, and the loader should not pin again), else
    arrays recycled from earlier batches that nothing holds any more (see :class:`_Recycled`). Rows of
    a page-locked batch are kept (``memory_budget``) as copies in ordinary memory, not as views: a view
    would hold the whole batch's page-locked block (torch's host allocator could not reuse it, and
    page-locked memory would grow to the budget), and page-locked memory comes from CUDA, which a
    forked loader worker must not touch (NVIDIA's rule for fork) while it may read the parent's kept rows.

    The batch's arrays are read by up to ``threads`` threads at once (each array by one thread, so
    no two threads share a reader): a read is a ``preadv`` system call, which releases Python's
    lock, and one thread copying from the page cache (or waiting on one disk request at a time) is
    slower than several.
    """

    def __init__(self, tokens: TokenDataset, pinned: bool = False, threads: int | None = None) -> None:
        self.tokens = tokens
        self.pinned = pinned
        self.threads = max(1, min(READ_THREADS, os.cpu_count() or 1) if threads is None else threads)
        self._recycled = tokens.batch_arrays
        self._pool: ThreadPoolExecutor | None = None  # made on first use, in the process that reads

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # threads stay in their process: a worker makes its own

    def _map(self, keys: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        if self.threads == 1 or len(keys) == 1:
            return {k: self._read(k, rows) for k in keys}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cache-read")
        self.tokens.cache.store.prepare()  # this process's file handles, made here and not raced for by the threads
        return dict(zip(keys, self._pool.map(lambda k: self._read(k, rows), keys)))

    def _read(self, key: str, rows: np.ndarray) -> np.ndarray:
        ds = self.tokens
        dtype = ds.dtype_of(key)
        if key.startswith(TARGETS) or key not in ds.keys or not ds.cache.reads_directly(dtype):
            return ds.read(key, rows)  # targets, scales (small), or int8 tokens decoded to floats
        shape = (len(rows), *ds.cache.meta.shape(ds.cache.meta.array(key))[1:])
        if self.pinned:
            into = torch.empty(shape, dtype=getattr(torch, dtype), pin_memory=True).numpy()
        else:
            into = self._recycled.get(key, shape, dtype)
        return ds.cache.read(key, rows, dtype, into=into)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitems__(self, indices: Sequence[int]) -> dict:
        ds = self.tokens
        rows = np.asarray([ds.rows[i] for i in indices], dtype=np.int64)
        if len(set(rows.tolist())) == len(rows) and not any(r in ds._kept for r in rows.tolist()):
            # the common case: distinct rows not in memory, read straight into the batch's own order
            data = self._map(ds.out_keys, rows)
            for pos, r in enumerate(rows.tolist()):  # page-locked batches: rows kept as copies (see __init__)
                ds._keep(r, {k: torch.from_numpy(v[pos]) for k, v in data.items()}, copy=self.pinned)
            return {"row": torch.from_numpy(rows), "tokens": {k: torch.from_numpy(v) for k, v in data.items()}}
        items = ds.__getitems__(indices)  # repeated or kept rows: the per-item path, then one stack per key
        return {"row": torch.from_numpy(rows), "tokens": {k: torch.stack([it["tokens"][k] for it in items])
                                                          for k in ds.out_keys}}


def loader_context(workers: int, cuda: bool | None = None):
    """How DataLoader worker processes start: ``None`` (the platform's default: fork on Linux before
    Python 3.14) unless CUDA is initialised in this process (``cuda`` None: asked of torch) or the
    default is a forkserver anyway (Python 3.14 on Linux), then a forkserver context with preloads.

    Why: a process that has initialised CUDA and runs threads (the loader's pin thread, cache reads, the
    CUDA driver's own) is not safe to fork: NVIDIA does not support CUDA in a forked child, and a lock held
    by another thread at the fork stays held in the child forever. On an H200 a forked worker of such a
    process hung, alive with nothing sent, twice in a row (the 2026-11-27 eighth session; the cause was not
    pinned down). A forkserver child is forked from a clean single-threaded server instead, which has
    imported torch and this module once (``set_forkserver_preload``, effective when the server starts,
    i.e. at the first such loader), so a worker starts in about 0.1 s more than a forked one (48-clip toy
    cache, 2 workers: 0.30-0.34 against 0.21-0.25 s an epoch); the server's start costs some 3 s once.
    The dataset reaches the worker as a pickle: it starts without the parent's kept rows (see
    :meth:`TokenDataset.__getstate__`), and a script driving training needs the usual
    ``if __name__ == "__main__":`` guard, as on macOS or Windows.
    """
    if workers <= 0:
        return None
    default = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if default != "forkserver" and not (torch.cuda.is_initialized() if cuda is None else cuda):
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", __name__])
    return ctx


def whole_batch(batch: dict) -> dict:
    """DataLoader ``collate_fn`` for :class:`BatchedTokens`: the batch is already stacked."""
    return batch
