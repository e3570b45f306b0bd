"""The DataLoaders behind ``Cache.iterate``: reads in this process, or worker processes kept across passes.

Why keep the workers: a training run reads the same cache once per epoch and once per evaluation, and a
DataLoader with ``num_workers`` starts its worker processes afresh for every pass. On this project's
2-core CPU (toy cache, 2 workers, 4 training batches and 1 validation batch an epoch, 2026-11-28) that
was 0.17-0.23 s for the training pass and 0.12-0.15 s for the validation pass, every epoch, against
0.006-0.06 s and 0.002-0.01 s read in this process; a worker also forgot the rows it kept in memory
(``memory_budget``) at the end of each pass. :class:`KeptLoader` starts its workers once (torch's
``persistent_workers``) and hands each pass its batches through a :class:`Schedule`, which the loader
reads in this process at the start of every pass; the workers see only batch indices.

Contract of a pass (:meth:`KeptLoader.start`): an iterator over the batches, in order, as
``Cache.iterate`` describes them. One pass at a time runs through the kept workers: while a pass is
alive and not finished (a caller still holds it part-read), another is refused (:meth:`KeptLoader.busy`)
and the caller reads with a loader of its own instead. A pass left part-read and dropped leaves nothing
behind: the next pass resets the workers, which first finish the batches they were reading ahead (up to
2 per worker) and torch drops them. A pass that fails (a worker died) discards the kept workers, and so
does a pass finding a worker gone between passes; the next pass starts new ones.

The workers end with ``Cache.close()`` (``with open_cache(...) as cache:``) or as soon as the cache is
dropped: its own dataset refers to it weakly, so no reference cycle leaves the cache to the cyclic garbage
collector, where ending the workers would wait 5 s for each (torch's queues are finalised first).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .dataset import BatchedTokens, TokenDataset, loader_context, whole_batch
from .errors import CacheError


class Schedule:
    """A batch sampler whose batches are set before each pass (a DataLoader's own cannot be replaced)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(tokens: TokenDataset, batches: Sequence[Sequence[int]] | Schedule, workers: int, pin: bool,
                seed: int, persistent: bool = False) -> DataLoader:
    """A DataLoader of whole batches of ``tokens`` (``batches``: rows' positions in ``tokens``).

    ``pin``: batches in page-locked memory (CUDA machines: their copy to the GPU is then asynchronous and
    faster). In this process fresh rows are read straight into page-locked memory, which the loader's
    pinning leaves as it is; it copies the rest (rows kept in memory, int8 tokens decoded, int8 scales,
    targets, and whatever worker processes hand over). ``seed`` seeds the workers' random generators when
    they start (reads use none; a kept loader's workers keep their first seed) and never touches the
    global one.
    """
    sampler = batches if isinstance(batches, Schedule) else [list(b) for b in batches]
    return DataLoader(BatchedTokens(tokens, pinned=pin and not workers), batch_sampler=sampler,
                      num_workers=workers, collate_fn=whole_batch, persistent_workers=persistent and workers > 0,
                      pin_memory=pin, multiprocessing_context=loader_context(workers),
                      generator=torch.Generator().manual_seed(seed))


class KeptLoader:
    """Worker processes reading ``tokens`` for pass after pass (see the module docstring).

    The workers start at the first pass, from the context :func:`~mettle.cache.dataset.loader_context`
    gives then (a forkserver once CUDA is initialised), and end with :meth:`close` (``Cache.close``, or
    the cache dropped) or when this object is collected. Each worker keeps its own rows in memory across
    passes (``memory_budget`` bytes per process), as this process does when reading without workers.
    """

    def __init__(self, tokens: TokenDataset, workers: int, pin: bool, seed: int = 0) -> None:
        if workers <= 0:
            raise ValueError(f"a KeptLoader needs worker processes, got workers={workers}")
        self.tokens, self.workers = tokens, workers
        self._schedule = Schedule()
        self._loader: DataLoader | None = make_loader(tokens, self._schedule, workers, pin, seed, persistent=True)
        self._pass: weakref.ref | None = None

    def busy(self) -> bool:
        """Whether a pass is alive and not finished."""
        return self._pass is not None and self._pass() is not None

    def start(self, batches: Sequence[Sequence[int]]) -> Iterator[dict[str, Any]]:
        """A pass over ``batches`` through the kept workers; refused (ValueError) while :meth:`busy` or closed."""
        if self.closed or self.busy():
            raise ValueError("this KeptLoader is closed or still in a pass. Fix: finish or drop the pass "
                             "first, or read with a loader of your own")
        self._schedule.batches = [list(b) for b in batches]
        assert self._loader is not None
        try:
            run = _Pass(iter(self._loader), self)  # the workers (re)start reading ahead here
        except BaseException:  # workers that died between passes: the next pass starts new ones
            self.close()
            raise
        self._pass = weakref.ref(run)
        return run

    @property
    def closed(self) -> bool:
        return self._loader is None

    def healthy(self) -> bool:
        """Whether every worker started so far is alive. One that ended between passes (Ctrl-C reaches the
        workers too, and they exit) would make the next pass wait 5 s for it and fail: replace the loader."""
        it = self._loader._iterator if self._loader is not None else None
        return it is None or all(w.is_alive() for w in getattr(it, "_workers", ()))

    def close(self) -> None:
        """End the worker processes; a pass still running raises :class:`CacheError` at its next batch."""
        loader, running = self._loader, self._pass() if self._pass is not None else None
        self._loader = self._pass = None
        if running is not None:
            running._cut()
        if loader is not None and loader._iterator is not None:
            loader._iterator._shutdown_workers()  # now, not whenever the iterator is collected


def holding(it: Iterator[dict[str, Any]], owner: object) -> Iterator[dict[str, Any]]:
    """``it``, keeping ``owner`` alive while it is read: a cache's own dataset refers to the cache weakly
    (no cycle, so that a dropped cache ends its workers at once), and ``for b in open_cache(p).iterate(...)``
    must not lose the cache it reads (``owner`` stays referenced by this generator's frame until it ends)."""
    yield from it


class _Pass:
    """One pass of a :class:`KeptLoader`: its loader's iterator until the batches run out."""

    def __init__(self, it: Iterator, owner: KeptLoader) -> None:
        self._it: Iterator | None = it
        self._owner: KeptLoader | None = owner
        self._cut_short = False

    def __iter__(self) -> "_Pass":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            if self._cut_short:
                raise CacheError("the cache's loader workers were closed during this pass. Fix: finish "
                                 "reading before Cache.close()")
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self._release()
            raise
        except BaseException:  # a worker died or a read failed: the next pass starts new workers
            owner = self._owner
            self._release()
            if owner is not None:
                owner.close()
            raise

    def _release(self) -> None:
        if self._owner is not None and self._owner._pass is not None and self._owner._pass() is self:
            self._owner._pass = None
        self._it = self._owner = None

    def _cut(self) -> None:
        self._it = self._owner = None
        self._cut_short = True
