"""What a cache holds, as lines for people (``mettle-extract --info``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .format import OK
from .reader import Cache, open_cache


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def describe(cache: Cache | str | Path, max_failures: int = 10) -> list[str]:
    """Dataset, clips done/failed, backbones, arrays with shapes and dtypes, size on disk."""
    if not isinstance(cache, Cache):
        cache = open_cache(cache, allow_incomplete=True)
    m = cache.meta
    counts = Counter("ok" if s == OK else ("pending" if s == "not extracted yet" else "failed")
                     for s in cache.clip_status)
    lines = [
        f"cache     {cache.root}  ({'complete' if cache.complete else 'NOT finished'})",
        f"format    {m.storage}, format version {m.format_version}, written by mettle {m.mettle_version}",
        f"dataset   {m.dataset}: {m.num_clips} clips x {m.num_segments} segments; manifest sha256 {m.manifest_sha256[:12]}",
        f"clips     ok {counts['ok']}, failed {counts['failed']}, pending {counts['pending']}",
        f"options   preset {m.preset}, tokens {m.tokens}, dtype {m.dtype}, {m.shard_clips} clips per shard",
    ]
    for modality, b in m.backbones.items():
        lines.append(f"{modality:<9} {b.name} (weights {b.weights_id[:16]}), {len(m.keys(modality))} arrays")
    lines.append(f"size      {_size(m.bytes_per_clip())} per clip stored, {_size(cache.nbytes_on_disk())} on disk")
    lines.append("arrays    key                              shape                     stored grid (source)")
    for a in m.arrays:
        shape = "x".join(map(str, m.shape(a)))
        lines.append(f"          {a.key:<32} {shape:<25} {a.grid[0]}x{a.grid[1]} ({a.source_grid[0]}x{a.source_grid[1]})")
    for name, spec in m.targets.items():
        shape = "x".join(map(str, m.target_shape(name)))
        lines.append(f"targets   targets/{name:<24} {shape:<25} {spec['dtype']} ({spec.get('missing', '-')} = none)")
    failed = cache.failed
    failed = {k: v for k, v in failed.items() if v != "not extracted yet"}
    for clip_id, why in list(failed.items())[:max_failures]:
        lines.append(f"failed    {clip_id}: {why}")
    if len(failed) > max_failures:
        lines.append(f"failed    ... and {len(failed) - max_failures} more (done.json lists them all)")
    prof = cache.done.get("profile", {})
    if prof:
        lines.append(f"profile   {prof.get('seconds', 0):.1f} s, {prof.get('clips_per_second', 0):.2f} clips/s on "
                     f"{prof.get('device', '?')}, peak memory {_size(prof.get('peak_memory', 0))}")
    return lines
