"""End-to-end Mettle: a token source that runs the frozen backbones live, clip by clip.

This is the paper's training setting (backbones frozen, run under no_grad at every step) and the
baseline the cache is measured against. It implements the same :class:`TokenSource` interface as a
cache and plans its token layout with the same ``plan_cache``, so ``mettle.train`` cannot tell the
two apart; with a float32 ``full`` cache of the same backbones both train identically (tested).

This module is the composition point: it may import ``mettle.train``; ``mettle.train`` never
imports it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from mettle.cache import TokenSource, plan_cache
from mettle.cache.format import TARGETS
from mettle.cache.runtime import resolve_device
from mettle.manifests import Manifest

from .backbones import Backbone
from .media import DECODING, MASK_SIZE, MISSING, read_masks
from .shard import submit_decodes
from .tokens import TokenForward

log = logging.getLogger(__name__)


class LiveSource(TokenSource):
    """Tokens computed on demand: decode the batch's clips, run the backbones, pool as a cache would.

    Args:
        manifest: the clips (rows) it serves.
        data_root: the dataset's media folder.
        backbones: modality -> frozen backbone.
        preset, tokens: what a cache with these options would hold (default: every block, every token).
        device, precision: where and how the backbones run (float32 for exact comparisons).
    """

    runs_backbones = True

    def __init__(self, manifest: Manifest, data_root: str | Path, backbones: Mapping[str, Backbone],
                 preset: str = "classification", tokens: str = "full", device: str = "cpu",
                 precision: str = "float32", decode_threads: int = 2) -> None:
        self.manifest = manifest
        self.data_root = Path(data_root)
        self.backbones = dict(backbones)
        targets = {"masks": {"shape": [manifest.clips[0].num_segments, MASK_SIZE, MASK_SIZE], "dtype": "uint8",
                             "missing": MISSING}} if any("masks" in c.labels for c in manifest.clips) else {}
        meta = plan_cache(manifest, {m: b.record() for m, b in self.backbones.items()}, preset=preset,
                          tokens=tokens, dtype="float32", shard_clips=1, targets=targets, media=DECODING)
        self.meta = replace(meta, storage="live")
        self.clip_status = ["ok"] * len(manifest)
        self.device = resolve_device(device)
        self.precision = precision
        self.decode_threads = decode_threads
        self._forwards: dict[tuple[str, tuple[str, ...]], TokenForward] = {}

    def _forward(self, modality: str, keys: Sequence[str]) -> TokenForward:
        wanted = tuple(k for k in keys if self.meta.array(k).modality == modality)
        if (modality, wanted) not in self._forwards:
            arrays = [self.meta.array(k) for k in wanted]
            self._forwards[(modality, wanted)] = TokenForward(self.backbones[modality], arrays, self.device,
                                                              self.precision)
        return self._forwards[(modality, wanted)]

    def iterate(self, batches: Sequence[Sequence[int]], keys: Sequence[str], workers: int = 0,
                seed: int = 0, codes: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        # live tokens are floats already, on the training device: ``codes`` asks nothing of them
        for k in keys:
            self.meta.check_key(k)
        token_keys = [k for k in keys if not k.startswith(TARGETS)]
        modalities = [m for m in self.backbones if any(self.meta.array(k).modality == m for k in token_keys)]
        with ThreadPoolExecutor(max(1, self.decode_threads), thread_name_prefix="live-decode") as pool:
            used = {m: self.backbones[m] for m in modalities}
            pending = submit_decodes(pool, self.manifest, self.data_root, batches[0], used) if batches else []
            for i, rows in enumerate(batches):
                decoded = [f.result() for f in pending]
                if i + 1 < len(batches):  # decode and preprocess ahead
                    pending = submit_decodes(pool, self.manifest, self.data_root, batches[i + 1], used)
                tokens: dict[str, torch.Tensor] = {}
                for m in modalities:
                    fw = self._forward(m, token_keys)
                    bad = [(r, c.errors[m]) for r, c in zip(rows, decoded) if m in c.errors]
                    if bad:
                        raise ValueError(f"clip {self.manifest.clips[bad[0][0]].clip_id}: {m} preprocessing: "
                                         f"{bad[0][1]}. Fix: check or replace that clip's media")
                    x = torch.cat([c.inputs[m] for c in decoded])
                    for key, t in fw(x, on_device=True).items():  # the trainer runs on the same device
                        tokens[key] = t.view(len(rows), -1, *t.shape[1:])
                if TARGETS + "masks" in keys:
                    tokens[TARGETS + "masks"] = torch.from_numpy(
                        np.stack([read_masks(self.manifest.clips[r], self.data_root) for r in rows]))
                yield {"row": torch.tensor(list(rows)), "tokens": {k: tokens[k] for k in keys}}

    def describe(self) -> str:
        return "live:" + "+".join(b.name for b in self.backbones.values())
