"""The token-source interface stage two consumes: a cache is one, the live backbones another.

``mettle.train`` sees only this interface. :class:`mettle.cache.Cache` implements it by reading
arrays; ``mettle.extract.live.LiveSource`` implements it by decoding clips and running the frozen
backbones on the fly (end-to-end Mettle). Both describe their tokens with the same
:class:`CacheMeta` (a live source plans one in memory), so keys, grids and dims agree.

Contract of :meth:`TokenSource.iterate`: for each batch of manifest rows (in the given order) yield
``{"row": LongTensor (B,), "tokens": {key: Tensor (B, T, N, D)}}``, float16 or float32 (a cache
hands out its stored float precision; consumers compute in float32; int8 codes: see ``codes``), on the CPU (a cache) or on the
device the source computes on (the live backbones: their tokens stay where training runs). Tokens never require
grad: nothing back-propagates into a source.

``codes``: keys whose consumer can take int8 codes with per-token scales instead of float tokens
(the LCD, which scales them back inside its float32 normalisation, on the device). A source that
stores int8 (an int8 cache) then hands ``{key: int8 (B, T, N, D), key + SCALE: float32 (B, T, N)}``,
``codes * scale[..., None]`` being the tokens: a quarter of the float32 bytes to move and hold.
Other sources ignore ``codes`` and hand floats.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator, Sequence

from mettle.manifests import Manifest

from .errors import CacheError
from .format import OK, CacheMeta
from .store import SCALE

__all__ = ["SCALE", "TokenSource"]


class TokenSource(ABC):
    meta: CacheMeta
    manifest: Manifest
    clip_status: list[str]
    runs_backbones: bool = False  # True where the source runs the frozen backbones itself (LiveSource): their
    # large products want cuBLAS's full workspace, so training keeps it (``cublas_workspace: auto``)

    def rows(self, splits: str | Iterable[str] | None = None, include_failed: bool = False) -> list[int]:
        """Manifest rows of ``splits`` (all for None) that have tokens (unless ``include_failed``)."""
        if splits is None or isinstance(splits, str):
            splits = [splits]
        wanted = sorted({r for s in splits for r in self.manifest.indices(s)})
        return [r for r in wanted if include_failed or self.clip_status[r] == OK]

    def keys(self, modality: str | None = None) -> list[str]:
        return self.meta.keys(modality)

    def require(self, keys: Iterable[str], why: str) -> None:
        """Refuse a source that lacks arrays a task needs, naming the preset that has them."""
        have = set(self.meta.keys())
        missing = [k for k in keys if k not in have]
        if missing:
            raise CacheError(f"the token source {self.describe()} (preset {self.meta.preset}) lacks "
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, needed for {why}. "
                             "Fix: extract a cache with the preset that task needs (mettle-extract --preset ...)")

    @abstractmethod
    def iterate(self, batches: Sequence[Sequence[int]], keys: Sequence[str], workers: int = 0,
                seed: int = 0, codes: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Tokens of ``keys`` for each batch of rows, in order (see the module docstring)."""

    def close(self) -> None:
        """Release what the source keeps between calls of :meth:`iterate` (a cache: its loader's worker
        processes); it stays usable, a later call starts them again. ``with source:`` closes at the end."""

    def __enter__(self) -> "TokenSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def describe(self) -> str:
        """A short human name (the cache path, or the live backbones)."""
