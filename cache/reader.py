"""Reading a cache: ``open_cache`` checks it, ``Cache`` reads arrays and builds datasets.

Reads are lazy: opening a cache reads its JSON files only; token arrays are read per request,
one chunk (one clip of one block) or one contiguous run of clips at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mettle.manifests import Manifest, ManifestError

from .dtypes import decode, get_dtype
from .errors import CacheError
from .format import DONE_FILE, MANIFEST_FILE, OK, TARGETS, CacheMeta, read_done
from .dataset import DEFAULT_MEMORY_BUDGET
from .source import TokenSource
from .store import SCALE, get_store
from .writer import CacheWriter, disk_usage

log = logging.getLogger(__name__)


class Cache(TokenSource):
    """An opened cache: its metadata, its manifest, per-clip status, and array reads.

    Attributes:
        root: the cache folder.
        meta: :class:`CacheMeta` (backbones, arrays, budget, dtype, ...).
        manifest: the manifest the rows follow.
        clip_status: per row, ``"ok"`` or the error that kept the clip out.
        complete: True when the done marker is there.
        done: the done marker's content (totals, failures, profile); empty when incomplete.
    """

    def __init__(self, root: Path, meta: CacheMeta, manifest: Manifest, clip_status: list[str], done: dict) -> None:
        self.root, self.meta, self.manifest = Path(root), meta, manifest
        self.clip_status, self.done = clip_status, done
        self.complete = bool(done)
        self.store = get_store(self.root, meta)
        if hasattr(self.store, "fill_shards"):
            self.store.fill_shards = frozenset(k for k in range(meta.num_shards) if clip_status and all(
                clip_status[r] != OK for r in meta.shard_rows(k)))
        self._dtype = get_dtype(meta.dtype)
        self.memory_budget = DEFAULT_MEMORY_BUDGET  # bytes of decoded rows kept between epochs (per process)
        self._datasets: dict = {}
        self._kept = None  # the loader whose worker processes iterate() keeps between passes

    def __getstate__(self) -> dict:
        # a loader worker started from a pickle (see dataset.loader_context) needs the metadata and the
        # store, not the manifest: MUSIC-AVQA's pickles to 4 MB (0.27 s, once per worker and epoch), so it
        # stays behind and is read again from the cache folder if a copy ever asks for it
        state = {**self.__dict__, "_datasets": {}, "_kept": None}
        state.pop("manifest", None)  # absent already in a copy that never needed it
        return state

    def __getattr__(self, name: str) -> Any:  # only for attributes not set: a pickled copy's manifest
        if name == "manifest" and "root" in self.__dict__:
            manifest = Manifest.from_json((self.root / MANIFEST_FILE).read_text())
            if manifest.sha256() != self.meta.manifest_sha256:
                raise CacheError(f"{self.root / MANIFEST_FILE} changed since this cache was opened. Fix: open "
                                 "the cache again (mettle re-reads it on every run), or restore the folder")
            self.manifest = manifest
            return manifest
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def batch_dtype(self) -> str:
        """What :meth:`iterate` hands out: float16 caches stay float16 (half the bytes to move and keep;
        the model computes in float32 per layer), float32 and int8 caches come as float32 (but see
        ``codes`` in :meth:`iterate`: an int8 cache's LCD arrays come as stored)."""
        return "float16" if self.meta.dtype == "float16" else "float32"

    @property
    def failed(self) -> dict[str, str]:
        return {self.manifest.clips[i].clip_id: s for i, s in enumerate(self.clip_status) if s != OK}

    # ------------------------------------------------------------------ arrays
    def read(self, key: str, rows: Sequence[int] | slice, out: str = "float32",
             into: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``(len(rows), segments, tokens, dim)`` of array ``key``, decoded to numpy dtype ``out``
        (or a ``targets/<name>`` array as stored). With ``into`` (an array of that shape and dtype
        ``out``, e.g. a pinned tensor's numpy view) the result is written there and returned; read in
        the stored dtype it goes straight from the file into it. An int8 cache read as ``int8`` gives
        its codes without their scales (:meth:`read_scales`)."""
        self.meta.check_key(key)  # names the valid keys when this one is unknown
        rows = self._check_rows(rows)
        if key.startswith(TARGETS):
            return self.store.read(key, rows, into)  # targets are stored as they are used (uint8 masks)
        if into is not None and into.dtype != np.dtype(out):
            raise ValueError(f"into is {into.dtype}, the tokens are asked for as {out}")
        codes_only = self._dtype.scaled and np.dtype(out) == np.dtype(self.meta.dtype)  # see read_scales
        if not codes_only and not np.issubdtype(np.dtype(out), np.floating):
            raise ValueError(f"tokens of this {self.meta.dtype} cache can be read as float32 or float16"
                             f"{' (or int8: its codes)' if self._dtype.scaled else ''}, not {out}")
        direct = into is not None and self.reads_directly(out)
        codes = self.store.read(key, rows, into if direct else None)
        if direct or codes_only:
            return codes
        scale = self.store.read(key + SCALE, rows) if self._dtype.scaled else None
        return decode(codes, scale, out, into)  # into: decoded straight into it

    def reads_directly(self, out: str) -> bool:
        """Whether :meth:`read` in dtype ``out`` goes straight from the file into ``into`` (no decoding):
        the stored dtype (an int8 cache's codes included)."""
        return np.dtype(out) == np.dtype(self.meta.dtype)

    def read_scales(self, key: str, rows: Sequence[int] | slice) -> np.ndarray:
        """The per-token scales ``(len(rows), segments, tokens)`` float32 of an int8 cache's array ``key``:
        ``read(key, rows, "int8") * scales[..., None]`` is ``read(key, rows)``."""
        self.meta.check_key(key)
        if not self._dtype.scaled:
            raise ValueError(f"a {self.meta.dtype} cache stores no scales; read its tokens with read()")
        return self.store.read(key + SCALE, self._check_rows(rows))

    def _check_rows(self, rows: Sequence[int] | slice) -> Sequence[int] | slice:
        """Rows are manifest indices 0..num_clips-1 (a store would read others as zeros, or drop them)."""
        if isinstance(rows, slice):
            return rows
        idx = np.asarray(rows)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"rows must be a 1-d sequence of integers (manifest indices), not {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.meta.num_clips):
            bad = idx[(idx < 0) | (idx >= self.meta.num_clips)]
            raise IndexError(f"rows {bad[:5].tolist()} are outside 0..{self.meta.num_clips - 1} of cache {self.root} "
                             "(rows are manifest indices)")
        return rows

    def dataset(self, splits: str | Iterable[str] | None = "train", keys: Sequence[str] | None = None,
                dtype: str = "float32", include_failed: bool = False):
        """A lazy torch Dataset over the clips of ``splits``: item = ``{"row", "tokens": {key: (T, N, D)}}``."""
        from .dataset import TokenDataset

        rows = self.rows(splits, include_failed)
        left = len(self.rows(splits, include_failed=True)) - len(rows)
        if left:
            log.warning("%d clips of %s failed extraction and are left out (see mettle-extract --info)", left, splits)
        return TokenDataset(self, rows, list(keys) if keys is not None else self.keys(), dtype)

    def iterate(self, batches: Sequence[Sequence[int]], keys: Sequence[str], workers: int = 0,
                seed: int = 0, codes: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Batches through a DataLoader: one read per array per batch, ``workers`` reader processes.

        Each batch comes out stacked (no per-sample collation) in :attr:`batch_dtype`, except the
        ``codes`` keys of an int8 cache: their int8 codes as stored, with the per-token scales as
        ``key + ".scale"`` (see :class:`TokenSource`), a quarter of the float32 bytes.

        The dataset is kept between calls with the same keys and codes, so rows read in one epoch stay in
        memory for the next (up to ``memory_budget`` bytes per process). So are the ``workers`` processes
        (see :mod:`~mettle.cache.loader`): started at the first call, they read every later pass too
        (epochs, evaluations), each keeping its own rows, until :meth:`close`, the cache dropped, or a
        call with other ``keys``, ``codes`` or ``workers``; a call made while an earlier pass is still
        being read through them gets a loader of its own for that pass. Once CUDA is initialised in this
        process new workers start from a forkserver, not by fork (see
        :func:`~mettle.cache.dataset.loader_context`). The iterator keeps this cache alive while it is read.
        """
        import torch

        from .dataset import TokenDataset
        from .loader import KeptLoader, holding, make_loader

        if not batches:
            return iter(())
        ident = (tuple(keys), tuple(k for k in codes if k in keys))
        ds = self._datasets.get(ident)
        if ds is None:  # over every row, kept: later epochs (and other splits) share its memory budget
            ds = TokenDataset(self, range(self.meta.num_clips), keys, dtype=self.batch_dtype,
                              memory_budget=self.memory_budget, codes=ident[1], weak=True)
            self._datasets = {ident: ds}
        pin = torch.cuda.is_available()  # page-locked batches copy to the GPU asynchronously, and faster
        kept = self._kept
        if workers <= 0 or (kept is not None and kept.busy()):
            # no workers, or an earlier pass is still being read through the kept ones: a loader of its own
            return holding(iter(make_loader(ds, batches, workers, pin, seed)), self)
        if kept is None or kept.closed or kept.tokens is not ds or kept.workers != workers or not kept.healthy():
            self.close()
            kept = self._kept = KeptLoader(ds, workers, pin, seed)
        return holding(kept.start(batches), self)

    def close(self) -> None:
        """End the loader's worker processes kept by :meth:`iterate` (if any); the cache stays readable."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.close()

    def __del__(self) -> None:  # a dropped cache ends its workers now (see cache/loader.py)
        if self.__dict__.get("_kept") is not None:
            try:
                self.close()
            except Exception:  # noqa: BLE001 (at interpreter exit torch may be half torn down; its workers end anyway)
                pass

    def describe(self) -> str:
        return str(self.root)

    def nbytes_on_disk(self) -> int:
        return disk_usage(self.root)

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r}, {self.meta.slug}, {len(self.manifest)} clips)"


def open_cache(path: str | Path, expect: Mapping[str, Any] | None = None, allow_incomplete: bool = False) -> Cache:
    """Open and check a cache.

    Checks the format version, that the manifest copy is the one the cache was built from, that
    extraction finished (unless ``allow_incomplete``), and the ``expect`` fields a caller insists on:
    ``dataset``, ``manifest_sha256``, ``storage``, ``dtype``, ``tokens``, ``preset``, or
    ``backbone.<modality>`` / ``weights.<modality>`` (name / weights sha256 of a backbone).
    Every refusal says what differs and the fix.
    """
    root = Path(path)
    if root.is_file():
        raise CacheError(f"--cache {root} is a file, not a cache folder. Fix: pass the folder mettle-extract wrote")
    if not root.is_dir():
        raise CacheError(f"cache folder {root} does not exist. Fix: run mettle-extract --cache {root} first, "
                         "or pass the folder it wrote")
    meta = CacheMeta.load(root)
    try:
        text = (root / MANIFEST_FILE).read_text()
        manifest = Manifest.from_json(text)
    except FileNotFoundError:
        raise CacheError(f"{root} has no {MANIFEST_FILE}. Fix: re-extract with --overwrite") from None
    except ManifestError as e:
        raise CacheError(f"{root / MANIFEST_FILE} is damaged ({e}). Fix: re-extract with --overwrite") from None
    if manifest.sha256() != meta.manifest_sha256 or len(manifest) != meta.num_clips:
        raise CacheError(f"{root / MANIFEST_FILE} is not the manifest this cache was built from (sha256 differs). "
                         "Fix: restore the folder as mettle-extract wrote it, or re-extract with --overwrite")
    for field, want in (expect or {}).items():
        have = _field(meta, field)
        if have != want:
            raise CacheError(f"cache {root} was built with {field} = {have}, but {want} is required. "
                             f"Fix: pass a cache built with {field} = {want} (mettle-extract --info shows what a "
                             "cache holds), or re-extract")
    done = {}
    if (root / DONE_FILE).is_file():
        done = read_done(root / DONE_FILE)
        status = list(done["clip_status"])
    elif allow_incomplete:
        writer = CacheWriter(root, meta)
        status = []
        for k in range(meta.num_shards):
            st = writer.shard_status(k)
            status += list(st.clips.values()) if st else ["not extracted yet"] * len(meta.shard_rows(k))
    else:
        raise CacheError(f"cache {root} is not finished (no {DONE_FILE}). Fix: rerun the mettle-extract command "
                         "that started it; it resumes where it stopped")
    if len(status) != meta.num_clips:
        raise CacheError(f"{root}: clip status covers {len(status)} of {meta.num_clips} clips. Fix: re-extract")
    return Cache(root, meta, manifest, status, done)


def _field(meta: CacheMeta, field: str) -> Any:
    kind, _, modality = field.partition(".")
    if kind in ("backbone", "weights") and modality:
        b = meta.backbones.get(modality)
        return None if b is None else (b.name if kind == "backbone" else b.weights_id)
    if field in ("dataset", "manifest_sha256", "storage", "dtype", "tokens", "preset", "num_segments"):
        return getattr(meta, field)
    raise CacheError(f"unknown cache field {field!r} to check. Fix: use one of dataset, manifest_sha256, storage, "
                     "dtype, tokens, preset, num_segments, backbone.<modality>, weights.<modality>")
