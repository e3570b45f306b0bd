"""A lazy torch Dataset over cache rows, with batched reads for DataLoaders.

Contract: item ``i`` is ``{"row": int, "tokens": {key: Tensor (T, N, D)}}`` where ``row`` is the
manifest row (labels come from ``cache.manifest.clips[row]``) and keys are cache array keys.
The default collate stacks these into ``{"row": (B,), "tokens": {key: (B, T, N, D)}}``.

Nothing is read before an item is asked for. ``__getitems__`` (used by DataLoader when present)
reads each array once per batch: sorted rows, one orthogonal selection per array, which turns a
batch of B clips into len(keys) reads instead of B * len(keys).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class TokenDataset(Dataset):
    def __init__(self, cache, rows: Sequence[int], keys: Sequence[str], dtype: str = "float32") -> None:
        for k in keys:
            cache.meta.array(k)  # unknown keys fail here, naming the valid ones
        self.cache, self.rows, self.keys, self.dtype = cache, list(rows), list(keys), dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"row": row, "tokens": {k: torch.from_numpy(self.cache.read(k, [row], self.dtype)[0]) for k in self.keys}}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        rows = np.asarray([self.rows[i] for i in indices], dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        data = {k: self.cache.read(k, rows[order], self.dtype) for k in self.keys}
        items = [None] * len(rows)
        for pos, j in enumerate(order):
            items[j] = {"row": int(rows[j]), "tokens": {k: torch.from_numpy(v[pos]) for k, v in data.items()}}
        return items
