"""Storage dtypes of token arrays: encode on write, decode on read.

* ``float32``: exact.
* ``float16`` (default): half the bytes, relative error ~5e-4. A value beyond float16's range
  would become inf; :func:`check_peak` refuses it (no inf ever enters a cache) and the extractor
  records the clip as failed with the fix (``--dtype float32`` or ``int8``).
* ``int8``: a quarter of float32. Symmetric per-token quantisation: each token (one row of D
  values) is stored as int8 codes plus one float32 scale ``max|x| / 127``; decode is
  ``codes * scale``. Error per value is at most half a step (``scale / 2``).

Contract: tokens are ``(..., N, D)`` float arrays (at least 2-D); scales are ``(..., N)`` float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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


@dataclass
class Encoded:
    """Tokens in their storage dtype, with what :func:`check_peak` needs to accept or refuse them.

    ``codes``: ``(B, ..., N, D)`` in the storage dtype; ``scale``: ``(B, ..., N)`` float32 (int8 only,
    else None); ``peak``: ``(B,)`` float32, the largest ``|x|`` of each leading index (a segment, for
    the extractor), NaN or inf when the tokens held one. Tensors stay on the device they were
    encoded on until the caller moves them.
    """

    codes: torch.Tensor
    scale: torch.Tensor | None
    peak: torch.Tensor


def encode_tensor(x: torch.Tensor, dtype: StorageDtype) -> Encoded:
    """Float tokens ``(B, ..., N, D)`` -> :class:`Encoded`, computed where ``x`` lives.

    On a GPU this runs next to the backbone, so only the stored bytes cross to the host (half of
    float32's for float16) and the host does no per-value work: numpy's float16 conversion alone
    ran at about 1 GB/s, below what one GPU produces. Nothing is refused here (the peaks are, by
    the caller, per leading index: one bad segment fails its own clip only).
    """
    if x.dim() < 2:
        raise ValueError(f"tokens must be (B, ..., N, D); got shape {tuple(x.shape)}")
    if x.numel():
        lo, hi = torch.aminmax(x.reshape(len(x), -1), dim=1)  # one pass; NaN and inf propagate
        peak = torch.maximum(-lo, hi).float()
    else:
        peak = torch.zeros(len(x), dtype=torch.float32, device=x.device)
    if dtype.name == "float32":
        return Encoded(x.float(), None, peak)
    if dtype.name == "float16":
        return Encoded(x.half(), None, peak)  # beyond float16's range -> inf, refused by check_peak
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)  # round half to even
    return Encoded(codes, scale, peak)


def check_peak(peak: float, dtype: StorageDtype) -> None:
    """Refuse tokens whose largest ``|x|`` is ``peak``: NaN/inf always, beyond float16 for float16."""
    if not math.isfinite(peak):
        raise CacheError("tokens contain NaN or inf. Fix: check the backbone weights and the input media")
    if dtype.name == "float16" and peak > FLOAT16_MAX:
        raise Float16Overflow(f"a token value ({peak:.4g}) exceeds float16's range ({FLOAT16_MAX:.0f}). "
                              "Fix: extract with --dtype float32 or --dtype int8")


def encode(x: np.ndarray, dtype: StorageDtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Float tokens ``(..., N, D)`` (numpy) -> (stored codes, per-token scales or None); raises
    CacheError for NaN/inf and Float16Overflow beyond float16. Same arithmetic as :func:`encode_tensor`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    e = encode_tensor(torch.from_numpy(x), dtype)
    check_peak(float(e.peak.max()) if len(e.peak) else 0.0, dtype)
    return e.codes.numpy(), None if e.scale is None else e.scale.numpy()


def decode(codes: np.ndarray, scale: np.ndarray | None, out: str = "float32",
           into: np.ndarray | None = None) -> np.ndarray:
    """Stored codes (+ scales) -> float tokens of numpy dtype ``out``, written into ``into`` when given
    (an array of the codes' shape and dtype ``out``, e.g. a page-locked batch's numpy view).

    int8: ``float32(code) * scale``, then rounded to ``out``, in one pass with no temporary (numpy's
    ufunc computes in float32 and casts each product on output): a decoded batch is 4x the codes'
    bytes, and the temporaries of the two-step form took most of the time (BENCHMARKS.md)."""
    if scale is None:
        if into is None:
            return np.asarray(codes).astype(out, copy=False)  # already in ``out``: the array itself
        into[...] = codes
        return into
    if into is None:
        into = np.empty(codes.shape, dtype=out)
    np.multiply(codes, scale[..., None], out=into, dtype=np.float32, casting="same_kind")
    return into
