"""Writing a cache: create (or resume) the folder, fill shards, write the done marker last.

The extractor (``mettle.extract``) computes tokens; everything about how they are laid out on
disk lives here, so the writer and the reader cannot disagree.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mettle.manifests import Manifest

from .dtypes import check_peak, decode, encode, get_dtype
from .errors import CacheError
from .format import (DONE_FILE, H5_FILE, H5_SHARD_DIR, MANIFEST_FILE, META_FILE, OK, STATUS_DIR, TARGETS, ZARR_DIR,
                     CacheMeta, data_checksum, read_done, shard_name, write_json_atomic)
from .store import SCALE, get_store

log = logging.getLogger(__name__)
CHECKSUM_THREADS = 2  # a shard's data checksums, computed while its files are written


class ShardBuffer:
    """One shard's rows of every array, in memory, filled clip by clip and written at once.

    ``put`` encodes float tokens into the storage dtype as they arrive, so the buffer costs the
    stored size, not float32. A fresh buffer is zero; :meth:`clear` zeroes a failed clip's rows.

    ``recycle``: a buffer of the same cache whose write has finished; its arrays are taken over
    when the row counts match (a shard is hundreds of MB: fresh memory costs a page fault per 4 KB
    on first write, which measured slower than the copy itself). Its rows then hold the old
    shard's values, so the filler must put every row of every clip it keeps and :meth:`clear` the
    others, as ``extract.shard.launch_shard`` does.
    """

    def __init__(self, meta: CacheMeta, shard: int, recycle: "ShardBuffer | None" = None) -> None:
        self.meta, self.shard = meta, shard
        self.rows = meta.shard_rows(shard)
        self.dtype = get_dtype(meta.dtype)
        n, t = len(self.rows), meta.num_segments
        if recycle is not None and recycle.codes and recycle.meta == meta and len(recycle.rows) == n:
            self.codes, self.scales, self.targets = recycle.codes, recycle.scales, recycle.targets
            recycle.codes, recycle.scales, recycle.targets = {}, {}, {}  # one owner at a time
            return
        self.codes = {a.key: np.zeros((n, t, a.tokens, a.dim), self.dtype.numpy) for a in meta.arrays}
        self.scales = {a.key: np.zeros((n, t, a.tokens), np.float32) for a in meta.arrays} if self.dtype.scaled else {}
        self.targets = {name: np.full((n, *spec["shape"]), spec.get("missing", 0), spec["dtype"])
                        for name, spec in meta.targets.items()}

    def put(self, key: str, local_row: int, segments: slice, tokens: np.ndarray) -> None:
        """Store float tokens ``(segments, N, D)`` of one clip; raises CacheError (e.g. float16 overflow)."""
        codes, scale = encode(tokens, self.dtype)
        self.put_codes(key, local_row, segments, codes, scale)

    def put_codes(self, key: str, local_row: int, segments: slice, codes: np.ndarray, scale: np.ndarray | None,
                  peak: float | None = None) -> None:
        """Store tokens already encoded (``dtypes.encode_tensor``, e.g. on the GPU): codes ``(segments, N, D)``
        in the storage dtype, scales ``(segments, N)`` for int8. With ``peak`` (the largest ``|x|`` of these
        tokens) the values are checked first, as :meth:`put` does: CacheError, nothing stored."""
        if self.scales and scale is None:
            raise ValueError(f"{key}: {self.dtype.name} codes need their per-token scales")
        if peak is not None:
            check_peak(peak, self.dtype)
        self.codes[key][local_row, segments] = codes
        if self.scales:
            self.scales[key][local_row, segments] = scale

    def put_target(self, name: str, local_row: int, value: np.ndarray) -> None:
        self.targets[name][local_row] = value

    def clear(self, local_row: int) -> None:
        for arr in (*self.codes.values(), *self.scales.values()):
            arr[local_row] = 0
        for name, arr in self.targets.items():
            arr[local_row] = self.meta.targets[name].get("missing", 0)

    def arrays(self) -> dict[str, np.ndarray]:
        out = dict(self.codes)
        out.update({k + SCALE: v for k, v in self.scales.items()})
        out.update({TARGETS + k: v for k, v in self.targets.items()})
        return out

    def tokens(self, key: str, local_row: int) -> np.ndarray:
        return decode(self.codes[key][local_row], self.scales[key][local_row] if self.scales else None)


@dataclass
class ShardStatus:
    """What happened to one shard: per-clip status (``ok`` or the error) and where the time went."""

    shard: int
    clips: dict[str, str]  # clip_id -> "ok" | error message, in row order
    seconds: float = 0.0
    decode_s: float = 0.0
    forward_s: float = 0.0
    write_s: float = 0.0
    bytes: int = 0
    device: str = ""
    peak_memory: int = 0
    worker: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # array name -> data_checksum of this shard's rows


class CacheWriter:
    """An open cache folder being filled. Create with :func:`create_cache`."""

    def __init__(self, root: Path, meta: CacheMeta) -> None:
        self.root, self.meta = Path(root), meta
        self.store = get_store(self.root, meta)

    def status_path(self, shard: int) -> Path:
        return self.root / STATUS_DIR / f"{shard_name(shard)}.json"

    def shard_status(self, shard: int) -> ShardStatus | None:
        try:
            return ShardStatus(**json.loads(self.status_path(shard).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:  # damaged (JSON, UTF-8, fields): the shard counts as not written
            log.warning("%s is damaged (%s); shard %d will be extracted again", self.status_path(shard),
                        e.__class__.__name__, shard)
            return None

    def pending_shards(self, retry_failed: bool = False) -> list[int]:
        """Shards without a status file (and, with ``retry_failed``, shards holding failed clips)."""
        todo = []
        for k in range(self.meta.num_shards):
            st = self.shard_status(k)
            if st is None or (retry_failed and any(v != OK for v in st.clips.values())):
                todo.append(k)
        return todo

    @property
    def done(self) -> bool:
        """``done.json`` is there and readable (a damaged one is rewritten by :meth:`finish`)."""
        if not (self.root / DONE_FILE).is_file():
            return False
        try:
            read_done(self.root / DONE_FILE)
        except CacheError as e:
            log.warning("%s; rewriting it", str(e).split(". Fix:")[0])
            return False
        return True

    def write_shard(self, buffer: ShardBuffer, status: ShardStatus) -> ShardStatus:
        """Write all arrays of one shard, then its status file (so a status means the data is there)."""
        if (self.root / DONE_FILE).exists():
            (self.root / DONE_FILE).unlink()  # the cache changes: it is not done until finish() again
        t0 = time.perf_counter()
        arrays = buffer.arrays()
        try:
            with ThreadPoolExecutor(CHECKSUM_THREADS, thread_name_prefix="checksum") as pool:
                sums = pool.map(data_checksum, arrays.values())  # beside the write: both release the GIL
                status.bytes = self.store.write_shard(buffer.shard, arrays)
                status.checksums = dict(zip(arrays, sums))
        except OSError as e:  # disk full, read-only folder, quota: the shard stays unwritten (no status)
            raise CacheError(f"could not write shard {buffer.shard} of {self.root} ({e.strerror or e}). Fix: free "
                             "disk space or make the folder writable, then rerun the same command: finished "
                             "shards are kept and this one is redone") from None
        status.write_s = time.perf_counter() - t0
        write_json_atomic(self.status_path(buffer.shard), status.__dict__)
        return status

    def read_done(self) -> dict[str, Any]:
        return read_done(self.root / DONE_FILE)

    def finish(self, profile: dict[str, Any]) -> dict[str, Any]:
        """Check every shard is written, then write ``done.json`` (last) with totals and failures."""
        missing = [k for k in range(self.meta.num_shards) if self.shard_status(k) is None]
        if missing:
            raise CacheError(f"{len(missing)} shards of {self.root} are not written yet (first: {missing[0]}). "
                             "Fix: rerun the same mettle-extract command to finish them")
        orphans = [p for d in (ZARR_DIR, H5_SHARD_DIR, STATUS_DIR) for p in (self.root / d).rglob(".*.tmp")]
        for orphan in orphans + list(self.root.glob(".*.tmp")):  # a writer killed mid-file left it; none writes now
            log.info("removing %s, left by a writer that was stopped", orphan)
            orphan.unlink(missing_ok=True)
        clip_status, failures = [], {}
        for k in range(self.meta.num_shards):
            st = self.shard_status(k)
            for clip_id, s in st.clips.items():
                clip_status.append(s)
                if s != OK:
                    failures[clip_id] = s
        done = {"clips_ok": len(clip_status) - len(failures), "clips_failed": len(failures), "failures": failures,
                "clip_status": clip_status, "bytes_on_disk": disk_usage(self.root), "profile": profile,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(self.root / DONE_FILE, done)
        return done


def disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def create_cache(root: str | Path, meta: CacheMeta, manifest: Manifest, overwrite: bool = False) -> CacheWriter:
    """Create the cache folder, or reopen it to resume when it was started with the same identity.

    A folder holding a cache with another identity (manifest, backbones, weights, budget, dtype,
    storage, shard size) is refused unless ``overwrite``; a non-empty folder that is not a cache
    is always refused (``--overwrite`` never deletes what mettle did not write).
    """
    root = Path(root)
    if manifest.sha256() != meta.manifest_sha256:
        raise CacheError("internal: the cache description and the manifest disagree")
    if root.exists() and not root.is_dir():
        raise CacheError(f"--cache {root} is a file. Fix: pass a folder path")
    if root.is_dir() and (root / CREATING).is_file() and not (root / META_FILE).is_file() and _only_ours(root):
        log.info("%s holds an interrupted cache creation; starting it again", root)
        _remove_ours(root)
    if root.is_dir() and any(root.iterdir()):
        if not (root / META_FILE).is_file():
            raise CacheError(f"--cache {root} is a non-empty folder that is not a mettle cache. "
                             "Fix: pass an empty or new folder")
        if overwrite:
            log.info("--overwrite: removing the cache in %s", root)
            kept = _remove_ours(root)
            if kept:
                log.info("--overwrite: kept %d entries mettle did not write: %s", len(kept), ", ".join(kept[:5]))
        else:
            old = CacheMeta.load(root)
            diff = identity_diff(old.identity(), meta.identity())
            if old.media != meta.media and (root / DONE_FILE).is_file() \
                    and not identity_diff({**old.identity(), "media": {}}, {**meta.identity(), "media": {}}):
                log.warning("%s was finished under other media decoding rules (%s); it is read as it is. "
                            "Re-extract it with --overwrite to apply the current ones", root, diff)
                return CacheWriter(root, old)  # nothing is written into it (extract refuses to add shards)
            if diff:
                raise CacheError(f"--cache {root} holds a different cache ({diff}). Fix: pass another --cache "
                                 "folder, or --overwrite to replace it")
            log.info("resuming the cache in %s", root)
            return CacheWriter(root, old)
    root.mkdir(parents=True, exist_ok=True)
    (root / CREATING).touch()  # first: only a folder marked so is ever taken for an interrupted creation
    (root / STATUS_DIR).mkdir(exist_ok=True)
    (root / MANIFEST_FILE).write_text(manifest.to_json())
    writer = CacheWriter(root, meta)
    writer.store.create()
    write_json_atomic(root / META_FILE, meta.to_dict())  # last: a folder with cache.json is a usable cache
    (root / CREATING).unlink()
    return writer


CREATING = ".mettle-creating"  # present from a cache folder's creation until its cache.json is written
_OURS = (MANIFEST_FILE, STATUS_DIR, ZARR_DIR, H5_FILE, H5_SHARD_DIR, META_FILE, DONE_FILE, CREATING)


def _is_ours(p: Path) -> bool:
    return p.name in _OURS or p.name.startswith(".") and p.name.endswith(".tmp")


def _only_ours(root: Path) -> bool:
    """True when every entry is a name the cache writer creates (an interrupted creation)."""
    return all(_is_ours(p) for p in root.iterdir())


def _remove_ours(root: Path) -> list[str]:
    """Delete what the cache writer creates in ``root``; returns the names of the other entries, kept."""
    kept = []
    for p in sorted(root.iterdir()):
        if not _is_ours(p):
            kept.append(p.name)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return kept


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first key (sorted) whose value differs between two flat records, or None."""
    return next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None)


def identity_diff(old: dict, new: dict) -> str:
    """The first difference between two ``CacheMeta.identity()`` dicts, in words ("" when equal)."""
    keys = sorted(set(old) | set(new),
                  key=lambda k: (isinstance(old.get(k, new.get(k)), (dict, list)), k != "backbones", k))
    for key in keys:  # plain options first: "tokens: cache has full" says more than "arrays differ"
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            if key == "backbones":
                for m in sorted(set(a) | set(b)):
                    x, y = a.get(m, {}), b.get(m, {})
                    for f in ("name", "weights_id"):
                        if x.get(f) != y.get(f):
                            return f"{m} backbone {f}: cache has {x.get(f)}, this run has {y.get(f)}"
                    p, q = x.get("preprocess") or {}, y.get("preprocess") or {}
                    f = first_difference(p, q)  # e.g. the fbank image's padding rule (2026-11-28)
                    if f is not None:
                        return (f"{m} backbone preprocessing {f}: cache has {p.get(f)}, this run has "
                                f"{q.get(f)} (a rule of another mettle)")
            if key == "media":
                return ("media decoding rules: the cache's were "
                        f"{'not recorded (extracted before 2026-11-28)' if not a else 'others'}, this run decodes "
                        "by the current ones")
            if isinstance(a, (str, int, float)) or isinstance(b, (str, int, float)):
                return f"{key}: cache has {a}, this run has {b}"
            return f"{key} differs"
    return ""
