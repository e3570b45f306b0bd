"""Two storage backends behind one small interface: Zarr v3 (default) and HDF5.

Both store the same logical arrays (see ``format.py``) and both are written a whole shard at a
time, which is what makes concurrent writers safe: a Zarr shard is one file per array that only
its owner rewrites; an HDF5 shard is its own file (HDF5 allows one writer per file), joined to the
others by virtual datasets created up front in ``tokens.h5`` (missing shards read as zeros).

Readers open lazily and re-open after a fork, so a store can be handed to DataLoader workers.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mettle.manifests.errors import first_line

from .dtypes import get_dtype
from .errors import CacheError
from .format import H5_FILE, H5_SHARD_DIR, TARGETS, ZARR_DIR, CacheMeta, shard_name
from .zarr_fast import DamagedShard, FastShardReader, ShardLayout, write_shard_file

SCALE = ".scale"
WRITE_THREADS = 4  # shard files written at once: enough to fill a page cache's bandwidth

Arrays = Mapping[str, np.ndarray]  # array key (or key + ".scale") -> rows of one shard


def stored_arrays(meta: CacheMeta) -> list[tuple[str, tuple[int, ...], str]]:
    """Every physical array: (name, shape, numpy dtype), scales included."""
    dt = get_dtype(meta.dtype)
    out = []
    for spec in meta.arrays:
        shape = meta.shape(spec)
        out.append((spec.key, shape, dt.numpy))
        if dt.scaled:
            out.append((spec.key + SCALE, shape[:3], "float32"))
    for name, t in meta.targets.items():
        out.append((TARGETS + name, meta.target_shape(name), t["dtype"]))
    return out


class ZarrStore:
    """Zarr v3, chunk = one clip of one block, shard = ``shard_clips`` clips, no compression.

    (float16 tokens compress by less than 10 % with zstd; raw chunks read and write faster.)
    """

    def __init__(self, root: Path, meta: CacheMeta) -> None:
        self.path = Path(root) / ZARR_DIR
        self.meta = meta
        self._arrays: dict[str, object] = {}
        self._pid = None
        # shards whose clips all failed (set by the reader from the cache's clip status): the only ones whose
        # file may be missing from a finished cache (zarr's own writer, used before 2026-11-27, left them out)
        self.fill_shards: frozenset[int] = frozenset()

    def create(self) -> None:
        import zarr

        group = zarr.open_group(str(self.path), mode="w", attributes={"mettle_cache": self.meta.slug})
        for name, shape, dtype in stored_arrays(self.meta):
            compressors = "auto" if name.startswith(TARGETS) else None  # masks compress well; tokens do not
            group.create_array(name, shape=shape, chunks=(1, *shape[1:]), shards=(self.meta.shard_clips, *shape[1:]),
                               dtype=dtype, compressors=compressors, fill_value=0)

    def _handles(self) -> dict:
        """Open arrays and readers of this process (dropped after a fork: DataLoader workers reopen).
        Threads that read or write at once call :meth:`prepare` first, so that they share one dict."""
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        return self._arrays

    def prepare(self) -> None:
        """Make this process's handle table before several threads read or write."""
        self._handles()

    def _array(self, name: str):
        import zarr

        handles = self._handles()
        if name not in handles:
            try:
                handles[name] = zarr.open_array(str(self.path / name), mode="r+")
            except (FileNotFoundError, KeyError, ValueError) as e:
                raise CacheError(f"{self.path / name} is missing or damaged ({e.__class__.__name__}). "
                                 "Fix: re-extract with --overwrite") from None
            self._check_shape(name, handles[name].shape)
        return handles[name]

    def write_shard(self, shard: int, arrays: Arrays) -> int:
        """Write one shard of every array, several arrays at a time (writes release the GIL). Arrays in
        the layout ``zarr_fast`` knows are written straight to their shard file; others (the
        compressed masks) through zarr."""
        rows = self.meta.shard_rows(shard)
        self.prepare()  # once, here: the pool's threads must not each reset the handles of a fresh store

        def one(name: str, data: np.ndarray) -> int:
            layout = self._layout(name)
            if layout is not None:
                return write_shard_file(layout, shard, data)
            self._array(name)[rows.start:rows.stop] = data  # whole-shard write: no read-modify-write
            return data.nbytes

        with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="zarr-write") as pool:
            return sum(pool.map(one, arrays.keys(), arrays.values()))

    def _layout(self, name: str):
        """The direct-write layout of array ``name`` (None: write it through zarr)."""
        handles = self._handles()
        key = ("layout", name)
        if key not in handles:
            try:
                layout = ShardLayout.of(self.path / name)
            except (ValueError, KeyError, OSError):
                layout = None
            if layout is not None:
                self._check_shape(name, layout.shape)
            handles[key] = layout
        return handles[key]

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """The stored array has the shape ``cache.json`` describes (an edited or mismatched description
        would otherwise read rows of another geometry)."""
        _check_shape(self.meta, name, tuple(shape), self.path / name / "zarr.json")

    def _fast(self, name: str):
        """The direct shard reader for ``name`` (None when its layout is not the one we write)."""
        key = ("fast", name)
        handles = self._handles()
        if key not in handles:
            layout = self._layout(name)  # zarr.json read and checked once, for writing and reading
            handles[key] = FastShardReader(layout) if layout is not None else None
        return handles[key]

    def read(self, name: str, rows: Sequence[int] | slice, out: np.ndarray | None = None) -> np.ndarray:
        """The rows of array ``name``; into ``out`` when given (read straight into it on the fast path)."""
        fast = self._fast(name)
        if fast is not None and isinstance(rows, slice):  # checked like any rows (zarr read an empty file as zeros)
            rows = range(*rows.indices(fast.shape[0]))
        if fast is not None and (out is None or out.dtype == fast.dtype):
            try:
                return fast.read(np.asarray(rows, dtype=np.int64), out)
            except DamagedShard as e:
                if not (e.missing and e.shard in self.fill_shards):
                    raise CacheError(f"{e} (cache {self.path.parent}). Fix: re-extract it with mettle-extract "
                                     "... --overwrite (the rows of that shard cannot be trusted)") from None
                # a shard of failed clips only, written through zarr (mettle before 2026-11-27): zarr
                # leaves its file out, and reads it as the fill value, as below
        arr = self._array(name)
        if isinstance(rows, slice):
            return _into(arr[rows], out)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and np.all(np.diff(rows) == 1):
            return _into(arr[int(rows[0]):int(rows[-1]) + 1], out)  # one contiguous read
        return _into(arr.oindex[rows], out)

    def read_shard(self, shard: int, name: str) -> np.ndarray:
        """Array ``name``'s rows of one shard (the fast reader checks that shard's file only)."""
        rows = self.meta.shard_rows(shard)
        return self.read(name, range(rows.start, rows.stop))

    def __getstate__(self):
        return {"path": self.path, "meta": self.meta, "fill_shards": self.fill_shards}

    def __setstate__(self, state):
        self.__init__(state["path"].parent, state["meta"])
        self.fill_shards = state.get("fill_shards", frozenset())


class H5Store:
    """HDF5: ``shards/shard-NNNNN.h5`` per shard (chunk = one clip), joined in ``tokens.h5``."""

    def __init__(self, root: Path, meta: CacheMeta) -> None:
        self.root = Path(root)
        self.meta = meta
        self._file = None
        self._pid = None
        self._checked: set[str] = set()  # arrays of the open file whose shape was checked against cache.json

    def _shard_path(self, shard: int) -> Path:
        return self.root / H5_SHARD_DIR / f"{shard_name(shard)}.h5"

    def create(self) -> None:
        import h5py

        (self.root / H5_SHARD_DIR).mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{H5_FILE}.tmp"
        with h5py.File(tmp, "w") as f:
            f.attrs["mettle_cache"] = self.meta.slug
            for name, shape, dtype in stored_arrays(self.meta):
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                for shard in range(self.meta.num_shards):
                    rows = self.meta.shard_rows(shard)
                    src = h5py.VirtualSource(f"{H5_SHARD_DIR}/{shard_name(shard)}.h5", name,
                                             shape=(len(rows), *shape[1:]))
                    layout[rows.start:rows.stop] = src
                f.create_virtual_dataset(name, layout, fillvalue=0)
        os.replace(tmp, self.root / H5_FILE)

    def write_shard(self, shard: int, arrays: Arrays) -> int:
        import h5py

        path = self._shard_path(shard)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        written = 0
        with h5py.File(tmp, "w") as f:
            for name, data in arrays.items():
                f.create_dataset(name, data=data, chunks=(1, *data.shape[1:]))
                written += data.nbytes
        os.replace(tmp, path)  # a shard file exists only when complete
        return written

    def _open(self):
        import h5py

        if self._pid != os.getpid() or self._file is None:
            try:
                self._file = h5py.File(self.root / H5_FILE, "r")
            except OSError as e:
                raise CacheError(f"{self.root / H5_FILE} cannot be opened ({e}). Fix: re-extract with --overwrite") \
                    from None
            self._pid, self._checked = os.getpid(), set()
            self._check_files()  # once per process, on every read path (prepare() opens first)
        return self._file

    def prepare(self) -> None:
        """Open this process's file before several threads read (h5py serialises their reads)."""
        self._open()

    def read(self, name: str, rows: Sequence[int] | slice, out: np.ndarray | None = None) -> np.ndarray:
        """The rows of array ``name``; into ``out`` when given. A missing or damaged shard file is a
        ``CacheError`` (HDF5's virtual datasets would read a missing one as zeros)."""
        try:
            return self._read(name, rows, out)
        except OSError as e:
            raise CacheError(f"{self._damaged(name, rows) or self.root / H5_FILE}: array {name} cannot be read ({e}). "
                             "Fix: re-extract with mettle-extract ... --overwrite") from None

    def read_shard(self, shard: int, name: str) -> np.ndarray:
        """Array ``name``'s rows of one shard, from that shard's own file (``--verify``: a missing or
        damaged file is this shard's CacheError, never another's, and never zeros)."""
        import h5py

        path = self._shard_path(shard)
        if not path.is_file():
            raise CacheError(f"{path} is missing. Fix: rerun the extraction (it redoes this shard)")
        try:
            with h5py.File(path, "r") as f:
                data = f[name][()]
        except (OSError, KeyError) as e:
            raise CacheError(f"{path}: array {name} cannot be read ({first_line(e)})") from None
        rows = self.meta.shard_rows(shard)
        spec = dict((n, shape) for n, shape, _ in stored_arrays(self.meta))[name]
        if data.shape != (len(rows), *spec[1:]):
            raise CacheError(f"{path}: array {name} has shape {data.shape}, not {(len(rows), *spec[1:])}")
        return data

    def _damaged(self, name: str, rows: Sequence[int] | slice) -> Path | None:
        """The first shard file behind ``rows`` that h5py cannot read ``name`` from (to name it)."""
        import h5py

        picked = range(self.meta.num_clips)[rows] if isinstance(rows, slice) else rows
        for shard in sorted({int(r) // self.meta.shard_clips for r in picked}):
            try:
                with h5py.File(self._shard_path(shard), "r") as f:
                    f[name][...]
            except (OSError, KeyError):
                return self._shard_path(shard)
        return None

    def _check_files(self) -> None:
        """Every shard file is there (checked once per process, at the first read)."""
        missing = [self._shard_path(k) for k in range(self.meta.num_shards) if not self._shard_path(k).is_file()]
        if missing:
            raise CacheError(f"{len(missing)} shard files of {self.root} are missing (first: {missing[0]}); "
                             "their rows would read as zeros. Fix: re-extract with mettle-extract ... --overwrite")

    def _read(self, name: str, rows: Sequence[int] | slice, out: np.ndarray | None) -> np.ndarray:
        ds = self._open()[name]
        if name not in self._checked:
            _check_shape(self.meta, name, tuple(ds.shape), self.root / H5_FILE)
            self._checked.add(name)
        if isinstance(rows, slice):
            return _into(ds[rows], out)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and np.all(np.diff(rows) == 1):
            return _into(ds[int(rows[0]):int(rows[-1]) + 1], out)
        order = np.argsort(rows)
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        data = ds[uniq]  # h5py fancy indexing wants increasing, unique indices
        if out is None:
            out = np.empty((len(rows), *data.shape[1:]), data.dtype)
        out[order] = data[inverse]
        return out

    def __getstate__(self):
        return {"root": self.root, "meta": self.meta}

    def __setstate__(self, state):
        self.__init__(state["root"], state["meta"])


def _check_shape(meta: CacheMeta, name: str, shape: tuple[int, ...], where: Path) -> None:
    want = next((tuple(sh) for n, sh, _ in stored_arrays(meta) if n == name), None)
    if want is not None and shape != want:
        raise CacheError(f"{where} stores array {name} as {shape}, but cache.json says {want}. Fix: restore "
                         "cache.json as mettle-extract wrote it, or re-extract with --overwrite")


def _into(data: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return data
    out[...] = data  # shape mismatches raise here
    return out


STORES = {"zarr": ZarrStore, "hdf5": H5Store}


def get_store(root: Path, meta: CacheMeta):
    try:
        return STORES[meta.storage](root, meta)
    except KeyError:
        raise CacheError(f"unknown cache storage {meta.storage!r}. Fix: use one of {', '.join(STORES)}") from None
