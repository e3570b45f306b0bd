"""Storage dtypes of token arrays: encode on write, decode on read.

* ``float32``: exact.
* ``float16`` (default): half the bytes, relative error ~5e-4. A value beyond float16's range
  would become inf; :func:`encode` refuses it (no inf ever enters a cache) and the extractor
  records the clip as failed with the fix (``--dtype float32`` or ``int8``).
* ``int8``: a quarter of float32. Symmetric per-token quantisation: each token (one row of D
  values) is stored as int8 codes plus one float32 scale ``max|x| / 127``; decode is
  ``codes * scale``. Error per value is at most half a step (``scale / 2``).

Contract: tokens are ``(..., N, D)`` float arrays; scales are ``(..., N)`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CacheError

FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class StorageDtype:
    name: str
    numpy: str
    scaled: bool  # True when a per-token scale array is stored next to the codes
    bytes_per_value: float


DTYPES = {
    "float32": StorageDtype("float32", "float32", False, 4),
    "float16": StorageDtype("float16", "float16", False, 2),
    "int8": StorageDtype("int8", "int8", True, 1),
}
DEFAULT_DTYPE = "float16"


def get_dtype(name: str) -> StorageDtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CacheError(f"unknown cache dtype {name!r}. Fix: use one of {', '.join(DTYPES)}") from None


class Float16Overflow(CacheError):
    """A value does not fit float16 (it would be stored as inf)."""


def encode(x: np.ndarray, dtype: StorageDtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Float tokens ``(..., N, D)`` -> (stored codes, per-token scales or None)."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CacheError("tokens contain NaN or inf. Fix: check the backbone weights and the input media")
    if dtype.name == "float32":
        return x, None
    if dtype.name == "float16":
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > FLOAT16_MAX:
            raise Float16Overflow(f"a token value ({peak:.4g}) exceeds float16's range ({FLOAT16_MAX:.0f}). "
                                  "Fix: extract with --dtype float32 or --dtype int8")
        return x.astype(np.float16), None
    scale = np.abs(x).max(axis=-1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return codes, scale.astype(np.float32)


def decode(codes: np.ndarray, scale: np.ndarray | None, out: str = "float32") -> np.ndarray:
    """Stored codes (+ scales) -> float tokens of numpy dtype ``out``."""
    if scale is None:
        return np.asarray(codes).astype(out, copy=False)
    return (codes.astype(np.float32) * scale[..., None].astype(np.float32)).astype(out, copy=False)
