"""A lazy torch Dataset over cache rows, with batched reads and a bounded in-memory row cache.

Contract: item ``i`` is ``{"row": int, "tokens": {key: Tensor (T, N, D)}}`` where ``row`` is the
manifest row (labels come from ``cache.manifest.clips[row]``) and keys are cache array keys.
The default collate stacks these into ``{"row": (B,), "tokens": {key: (B, T, N, D)}}``.

Nothing is read before an item is asked for. ``__getitems__`` (used by DataLoader when present)
reads each array once per batch: sorted unique rows (several questions may share a clip), one
selection per array, which turns a batch of B clips into len(keys) reads instead of B * len(keys).

:class:`BatchedTokens` is the training path (``Cache.iterate``): the same reads, but a batch comes
out already stacked, ``{"row": (B,), "tokens": {key: (B, T, N, D)}}``, so no per-sample collation
runs; a batch of distinct rows not yet in memory is read straight into its order (no further copy).

Training reads the same rows every epoch, so decoded rows are kept in memory up to
``memory_budget`` bytes (per process; 0 disables it): a cache that fits is read from disk once,
a larger one keeps its first rows resident and streams the rest. Never more than the budget.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .format import TARGETS

DEFAULT_MEMORY_BUDGET = 1 << 30


class TokenDataset(Dataset):
    def __init__(self, cache, rows: Sequence[int], keys: Sequence[str], dtype: str = "float32",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        for k in keys:
            cache.meta.check_key(k)  # unknown keys fail here, naming the valid ones
        self.cache, self.rows, self.keys, self.dtype = cache, list(rows), list(keys), dtype
        self.memory_budget = memory_budget
        self._kept: dict[int, dict[str, torch.Tensor]] = {}
        self._kept_bytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def _keep(self, row: int, tokens: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tokens.values())
        if self._kept_bytes + size <= self.memory_budget:
            self._kept[row] = tokens
            self._kept_bytes += size

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        rows = np.asarray([self.rows[i] for i in indices], dtype=np.int64)
        unique = np.unique(rows)  # sorted; a row asked twice is read once
        missing = np.asarray([r for r in unique if r not in self._kept], dtype=np.int64)
        fresh: dict[int, dict[str, torch.Tensor]] = {}
        if len(missing):
            data = {k: self.cache.read(k, missing, self.dtype) for k in self.keys}
            for pos, r in enumerate(missing.tolist()):
                fresh[r] = {k: torch.from_numpy(v[pos]) for k, v in data.items()}
                self._keep(r, fresh[r])
        return [{"row": int(r), "tokens": self._kept.get(int(r)) or fresh[int(r)]} for r in rows]


class BatchedTokens(Dataset):
    """Whole batches of a :class:`TokenDataset` (use with ``batch_sampler`` and :func:`whole_batch`).

    With ``pinned`` (CUDA only) a batch of fresh rows is read straight into page-locked tensors, so
    that its copy to the GPU needs no staging copy; the loader should then not pin again.
    """

    def __init__(self, tokens: TokenDataset, pinned: bool = False) -> None:
        self.tokens = tokens
        self.pinned = pinned

    def _read(self, key: str, rows: np.ndarray) -> np.ndarray:
        ds = self.tokens
        if not self.pinned or key.startswith(TARGETS):
            return ds.cache.read(key, rows, ds.dtype)
        spec = ds.cache.meta.array(key)
        batch = torch.empty((len(rows), *ds.cache.meta.shape(spec)[1:]), dtype=getattr(torch, ds.dtype),
                            pin_memory=True)
        return ds.cache.read(key, rows, ds.dtype, into=batch.numpy())

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitems__(self, indices: Sequence[int]) -> dict:
        ds = self.tokens
        rows = np.asarray([ds.rows[i] for i in indices], dtype=np.int64)
        if len(set(rows.tolist())) == len(rows) and not any(r in ds._kept for r in rows.tolist()):
            # the common case: distinct rows not in memory, read straight into the batch's own order
            data = {k: self._read(k, rows) for k in ds.keys}
            for pos, r in enumerate(rows.tolist()):
                ds._keep(r, {k: torch.from_numpy(v[pos]) for k, v in data.items()})
            return {"row": torch.from_numpy(rows), "tokens": {k: torch.from_numpy(v) for k, v in data.items()}}
        items = ds.__getitems__(indices)  # repeated or kept rows: the per-item path, then one stack per key
        return {"row": torch.from_numpy(rows), "tokens": {k: torch.stack([it["tokens"][k] for it in items])
                                                          for k in ds.keys}}


def whole_batch(batch: dict) -> dict:
    """DataLoader ``collate_fn`` for :class:`BatchedTokens`: the batch is already stacked."""
    return batch
