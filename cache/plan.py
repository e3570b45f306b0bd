"""Planning a cache: from a manifest, backbone records and options to its :class:`CacheMeta`."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Mapping

from mettle import __version__
from mettle.manifests import Manifest

from .budget import check_budget, check_preset, select_blocks
from .dtypes import get_dtype
from .errors import CacheError
from .format import STORAGES, ArraySpec, BackboneRecord, CacheMeta

SHARD_TARGET_BYTES = 512 * 2**20  # per shard over all arrays: big sequential writes, sane file counts
MAX_SHARD_CLIPS = 64


def plan_cache(manifest: Manifest, backbones: Mapping[str, BackboneRecord], *, storage: str = "zarr",
               preset: str = "classification", tokens: str = "last-grid", dtype: str = "float16",
               shard_clips: int | None = None, extract: Mapping[str, Any] | None = None,
               targets: Mapping[str, Mapping[str, Any]] | None = None, batch_size: int | None = None,
               media: Mapping[str, str] | None = None) -> CacheMeta:
    """The cache description for ``manifest`` through ``backbones`` (modality -> record).

    The segmentation preset stores full-resolution tokens whatever ``tokens`` says, and records
    ``full``. ``shard_clips`` defaults to as many clips as fit ~512 MB (at most 64), rounded to whole
    batches of ``batch_size`` segments when given (see :func:`aligned_shard_clips`). ``targets``
    (name -> {shape, dtype, missing}) adds per-clip training targets read from media (AVS masks);
    ``media`` records the decoding rules the extractor reads media with (``extract.media.DECODING``).
    """
    if storage not in STORAGES:
        raise CacheError(f"unknown cache format {storage!r}. Fix: use one of {', '.join(STORAGES)}")
    check_preset(preset)
    check_budget(tokens)
    get_dtype(dtype)
    if not backbones:
        raise CacheError("no backbone to extract. Fix: name at least one (--backbones)")
    if preset == "segmentation":
        tokens = "full"
    segments = {c.num_segments for c in manifest.clips}
    if len(segments) != 1:
        raise CacheError(f"the {manifest.dataset} manifest mixes clips of {sorted(segments)} segments; a cache "
                         "needs one segment count. Fix: rebuild the manifest with a fixed num_segments")
    arrays = []
    for modality, rec in backbones.items():
        for sel in select_blocks(preset, rec.blocks, modality, tokens):
            b = sel.block
            arrays.append(ArraySpec(f"{modality}/{b.name}", modality, b.name, b.index, b.stage, b.dim,
                                    tuple(sel.grid), tuple(b.grid)))
    meta = CacheMeta(manifest.dataset, manifest.sha256(), len(manifest), segments.pop(), dict(manifest.vocabularies),
                     storage, preset, tokens, dtype, 1, dict(backbones), tuple(arrays), __version__,
                     created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), extract=dict(extract or {}),
                     targets={k: dict(v) for k, v in (targets or {}).items()}, media=dict(media or {}))
    if shard_clips is None:
        shard_clips = max(1, min(MAX_SHARD_CLIPS, SHARD_TARGET_BYTES // max(meta.bytes_per_clip(), 1)))
        if batch_size:
            shard_clips = aligned_shard_clips(shard_clips, meta.num_segments, batch_size)
    if shard_clips < 1:
        raise CacheError(f"--shard-clips {shard_clips} must be >= 1")
    return replace(meta, shard_clips=int(shard_clips))


def aligned_shard_clips(clips: int, segments: int, batch_size: int) -> int:
    """``clips`` rounded to the nearest multiple of the clips whose segments fill whole extraction batches
    (``batch_size / gcd(batch_size, segments)``: 16 clips of 10 segments for batches of 32), within
    ``MAX_SHARD_CLIPS``; unchanged when fewer than that many clips fit a shard.

    Why: extraction batches the segments of consecutive clips, one shard at a time, so a shard whose
    segments are not whole batches ends with a partial batch (27 full-size clips a shard: 8 batches of
    32 and one of 14, 64 forward passes for 192 clips instead of 60; under ``--cuda-graphs`` a partial
    batch runs eagerly until its size recurs). A shard may come out some 30 % above the byte target.
    """
    align = batch_size // math.gcd(batch_size, segments)
    if clips < align or align > MAX_SHARD_CLIPS:
        return clips
    return min(MAX_SHARD_CLIPS // align, max(1, round(clips / align))) * align
