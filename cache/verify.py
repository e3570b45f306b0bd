"""Checking a cache's data against what its writer recorded (``mettle-extract --verify PATH``).

Why: a cache is written once and read for months, often after a copy to another machine. Reads
check what is cheap to check (shard files there, their length, Zarr's index CRC), not the rows
themselves: a shard zeroed by a power loss, cut short by a copy or rotted on disk would read as
tokens. Each shard's status file records a checksum per array (``format.data_checksum``); this
reads every shard back and compares. A shard that differs, or cannot be read, is marked as not
extracted (its status file and ``done.json`` are removed), so that no training reads it and the
command that made the cache, run again, extracts that shard only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .errors import CacheError
from .format import DONE_FILE, data_checksum
from .reader import open_cache
from .store import stored_arrays
from .writer import CacheWriter

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found. ``damaged``: shard -> the first problem (now marked not extracted)."""

    root: Path
    shards: int
    matched: list[int] = field(default_factory=list)  # every array equals its recorded checksum
    unrecorded: list[int] = field(default_factory=list)  # readable, written before checksums were recorded
    not_written: list[int] = field(default_factory=list)  # no status file (an unfinished extraction)
    damaged: dict[int, str] = field(default_factory=dict)
    bytes_read: int = 0
    resumable: bool = True  # False: made before caches recorded their decoding rules; no run may add to it

    @property
    def ok(self) -> bool:
        return not self.damaged

    def lines(self) -> list[str]:
        out = [f"verify    {self.root}: {self.shards} shards, {self.bytes_read / 1e9:.2f} GB read",
               f"          {len(self.matched)} match their checksums"]
        if self.unrecorded:
            out.append(f"          {len(self.unrecorded)} readable but written without checksums (before 2026-11-28; "
                       f"first: {self.unrecorded[0]})")
        if self.not_written:
            out.append(f"          {len(self.not_written)} not written yet (first: {self.not_written[0]})")
        for shard, why in self.damaged.items():
            out.append(f"DAMAGED   shard {shard}: {why}")
        if self.damaged and self.resumable:
            out.append(f"          {len(self.damaged)} damaged shards are now marked as not extracted. Fix: rerun the "
                       "mettle-extract command that made the cache (its options are in cache.json): it extracts "
                       "those shards again and keeps the others; if it refuses the cache as made under other "
                       "rules (an older mettle), extract it again with --overwrite")
        elif self.damaged:
            out.append(f"          {len(self.damaged)} damaged shards are now marked as not extracted. Fix: this cache "
                       "was made before caches recorded their decoding rules (2026-11-28), so no extraction adds to "
                       "it: extract it again with --overwrite (the command's options are in cache.json)")
        return out


def verify_cache(path: str | Path, progress: bool = False) -> VerifyReport:
    """Read every written shard of the cache at ``path`` and compare each array with its checksum.

    Damaged shards are marked as not extracted (see the module docstring). Do not run it while an
    extraction writes into the same cache. Raises CacheError for a folder that is no cache."""
    cache = open_cache(path, allow_incomplete=True)
    writer = CacheWriter(cache.root, cache.meta)
    report = VerifyReport(cache.root, cache.meta.num_shards, resumable=bool(cache.meta.media))
    for shard in tqdm(range(cache.meta.num_shards), desc="verify", unit="shard", disable=not progress):
        status = writer.shard_status(shard)
        if status is None:
            report.not_written.append(shard)
            continue
        names = list(status.checksums) or [name for name, _, _ in stored_arrays(cache.meta)]
        for name in names:
            try:
                data = cache.store.read_shard(shard, name)
            except (CacheError, OSError, KeyError, ValueError) as e:
                report.damaged[shard] = f"array {name} cannot be read ({str(e).split('. Fix:')[0]})"
                break
            report.bytes_read += data.nbytes
            found = data_checksum(data) if status.checksums else None
            if found is not None and found != status.checksums[name]:
                report.damaged[shard] = (f"array {name} differs from what was written (checksum {found}, "
                                         f"recorded {status.checksums[name]})")
                break
        else:
            (report.matched if status.checksums else report.unrecorded).append(shard)
    if report.damaged:
        for shard in report.damaged:
            writer.status_path(shard).unlink(missing_ok=True)
        (cache.root / DONE_FILE).unlink(missing_ok=True)
        log.warning("%d damaged shards of %s marked as not extracted: %s", len(report.damaged), cache.root,
                    ", ".join(map(str, report.damaged)))
    cache.close()
    return report
