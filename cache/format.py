"""The cache format, defined once: file names, the metadata record, array specs, shard geometry.

A cache is a folder::

    cache.json        CacheMeta: format version, dataset, manifest sha256, vocabularies, backbones
                      (name, weights sha256 or random-init, preprocessing), arrays, budget, dtype,
                      the media decoding rules
    manifest.json     the manifest copy (canonical JSON; its sha256 is in cache.json)
    tokens.zarr/      Zarr v3 group (storage "zarr"): one array per cached block, key
                      "<modality>/<block>", shape (clip, segment, token, dim), chunk = one clip,
                      shard = ``shard_clips`` clips; int8 arrays have a "<key>.scale" sibling
                      (clip, segment, token) float32
    tokens.h5 + shards/shard-NNNNN.h5
                      HDF5 (storage "hdf5"): one file per shard, joined by virtual datasets in
                      tokens.h5 under the same keys (HDF5 allows one writer per file)
    status/shard-NNNNN.json
                      written after a shard's arrays: per-clip status (ok or the error), timings,
                      and each array's ``checksums`` (:func:`data_checksum` of its rows as written;
                      ``mettle-extract --verify`` reads them back; absent before 2026-11-28)
    done.json         written last: totals, failures, profile. No done.json = not finished.

Rows are manifest indices. The unit of writing (and of resuming and of distribution) is a shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .budget import BlockLayout, Grid
from .errors import CacheError

FORMAT_NAME = "mettle-cache"
FORMAT_VERSION = 1
META_FILE = "cache.json"
MANIFEST_FILE = "manifest.json"
DONE_FILE = "done.json"
STATUS_DIR = "status"
ZARR_DIR = "tokens.zarr"
H5_FILE = "tokens.h5"
H5_SHARD_DIR = "shards"
STORAGES = ("zarr", "hdf5")
OK = "ok"
TARGETS = "targets/"  # key prefix of per-clip training targets stored beside the tokens (AVS masks)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


@dataclass(frozen=True)
class ArraySpec:
    """One cached block: array ``key`` = ``<modality>/<block>``, stored ``grid`` (pooled or not)."""

    key: str
    modality: str
    block: str
    block_index: int
    stage: int
    dim: int
    grid: Grid
    source_grid: Grid

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def pooled(self) -> bool:
        return tuple(self.grid) != tuple(self.source_grid)


@dataclass(frozen=True)
class BackboneRecord:
    """A backbone as the cache remembers it: identity, weights fingerprint, preprocessing, blocks."""

    name: str
    modality: str
    weights_id: str
    preprocess: Mapping[str, Any]
    blocks: tuple[BlockLayout, ...]


@dataclass(frozen=True)
class CacheMeta:
    """Everything a reader needs to interpret a cache without the code that wrote it.

    ``identity()`` is the part that must match for a rerun to resume into the same folder.
    """

    dataset: str
    manifest_sha256: str
    num_clips: int
    num_segments: int
    vocabularies: Mapping[str, tuple[str, ...]]
    storage: str
    preset: str
    tokens: str
    dtype: str
    shard_clips: int
    backbones: Mapping[str, BackboneRecord]
    arrays: tuple[ArraySpec, ...]
    mettle_version: str
    format_version: int = FORMAT_VERSION
    created: str = ""
    extract: Mapping[str, Any] = field(default_factory=dict)  # resolved run options, informational
    targets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> {shape, dtype, missing}
    # how the media were decoded into backbone inputs (extract.media.DECODING): part of the identity, so a
    # resume never mixes clips decoded by other rules; empty in caches made before 2026-11-28
    media: Mapping[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ geometry
    @property
    def num_shards(self) -> int:
        return -(-self.num_clips // self.shard_clips)

    def shard_rows(self, shard: int) -> range:
        if not 0 <= shard < self.num_shards:
            raise CacheError(f"shard {shard} is outside 0..{self.num_shards - 1}")
        return range(shard * self.shard_clips, min((shard + 1) * self.shard_clips, self.num_clips))

    def array(self, key: str) -> ArraySpec:
        for a in self.arrays:
            if a.key == key:
                return a
        raise CacheError(f"the cache has no array {key!r}. Fix: use one of {', '.join(a.key for a in self.arrays)}")

    def keys(self, modality: str | None = None) -> list[str]:
        return [a.key for a in self.arrays if modality in (None, a.modality)]

    def check_key(self, key: str) -> None:
        """Refuse an unknown token array or target key, naming the valid ones."""
        if key.startswith(TARGETS):
            if key[len(TARGETS):] not in self.targets:
                raise CacheError(f"the cache holds no target {key!r}. Fix: use one of "
                                 f"{', '.join(TARGETS + t for t in self.targets) or 'none (no targets cached)'}")
        else:
            self.array(key)

    def target_shape(self, name: str) -> tuple[int, ...]:
        return (self.num_clips, *self.targets[name]["shape"])

    def shape(self, spec: ArraySpec) -> tuple[int, int, int, int]:
        return (self.num_clips, self.num_segments, spec.tokens, spec.dim)

    def bytes_per_clip(self) -> int:
        """Stored bytes of one clip over all arrays (codes + int8 scales), before filesystem overhead."""
        from .dtypes import get_dtype

        dt = get_dtype(self.dtype)
        per_segment = sum(a.tokens * a.dim * dt.bytes_per_value + (4 * a.tokens if dt.scaled else 0)
                          for a in self.arrays)
        return int(per_segment * self.num_segments)

    @property
    def slug(self) -> str:
        """Short option slug naming what the cache holds, for run folder names."""
        return f"{self.dataset}.{self.preset}.{self.tokens}.{self.dtype}"

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in ("created", "extract", "mettle_version"):
            d.pop(k, None)
        return d

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT_NAME
        return json.loads(json.dumps(d))  # tuples -> lists, a plain JSON tree

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "cache.json") -> "CacheMeta":
        if d.get("format") != FORMAT_NAME:
            raise CacheError(f"{where} is not a mettle cache description. Fix: point --cache at a folder "
                             "written by mettle-extract")
        version = d.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:  # "1" is not 1: an edited file
            version = repr(version) if type(version) is not int else version
            raise CacheError(
                f"{where} has cache format version {version}; this mettle reads version {FORMAT_VERSION}. "
                f"Fix: re-extract with this mettle (mettle-extract ... --overwrite), or use mettle "
                f"{d.get('mettle_version', '?')} that wrote it")
        try:
            backbones = {
                m: BackboneRecord(b["name"], b["modality"], b["weights_id"], dict(b["preprocess"]),
                                  tuple(BlockLayout(x["index"], x["name"], x["tokens"], x["dim"], tuple(x["grid"]),
                                                    x["stage"]) for x in b["blocks"]))
                for m, b in d["backbones"].items()}
            arrays = tuple(ArraySpec(a["key"], a["modality"], a["block"], a["block_index"], a["stage"], a["dim"],
                                     tuple(a["grid"]), tuple(a["source_grid"])) for a in d["arrays"])
            return cls(d["dataset"], d["manifest_sha256"], int(d["num_clips"]), int(d["num_segments"]),
                       {k: tuple(v) for k, v in d["vocabularies"].items()}, d["storage"], d["preset"], d["tokens"],
                       d["dtype"], int(d["shard_clips"]), backbones, arrays, d["mettle_version"], version,
                       d.get("created", ""), dict(d.get("extract", {})),
                       {k: dict(v) for k, v in d.get("targets", {}).items()},
                       {str(k): str(v) for k, v in d.get("media", {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CacheError(f"{where} is damaged ({e.__class__.__name__}: {e}). Fix: re-extract with "
                             "mettle-extract ... --overwrite") from None

    @classmethod
    def load(cls, root: Path) -> "CacheMeta":
        path = Path(root) / META_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CacheError(f"{root} is not a mettle cache (no {META_FILE}). Fix: run mettle-extract "
                             f"--cache {root} first, or point at the folder it wrote") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{path} is not valid JSON ({e}). Fix: re-extract with --overwrite") from None
        return cls.from_dict(d, str(path))


def read_done(path: Path) -> dict[str, Any]:
    """``done.json``, its ``clip_status`` checked to be a list of strings, or a CacheError naming the damage."""
    try:
        done = json.loads(Path(path).read_text())
        status = done["clip_status"]
        if not isinstance(status, list) or not all(isinstance(s, str) for s in status):
            raise TypeError("clip_status is not a list of strings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CacheError(f"{path} is damaged ({e.__class__.__name__}: {e}). Fix: rerun the mettle-extract command "
                         "that made the cache (it rewrites done.json from the shards' status files), or re-extract "
                         "with --overwrite") from None
    return done


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader (or a kill) never sees half a file: temp file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def data_checksum(data: Any) -> str:
    """``crc32:<hex>`` (zlib's CRC-32) of an array's bytes in C order, as stored and as a read returns them.

    Why: neither format checksums its data (Zarr's shard index has a CRC, its rows none), so a
    shard zeroed by a power loss, cut by a copy to another machine or rotted on disk would read as
    tokens. The status file records this per array and shard; ``mettle-extract --verify`` compares.
    zlib's CRC releases the GIL (google_crc32c's, 2.5x faster, holds it and would stall the thread
    that launches extraction's batches): ~3.5 GB/s a core here, computed while the shard is written."""
    import zlib

    import numpy as np

    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return f"crc32:{zlib.crc32(flat):08x}"
