"""Tensors a frozen backbone derives from its weights alone, computed once and kept.

Both attention implementations (timm's Swin-V2 through ``swinv2_attention.py``, our HTS-AT in
``htsat/swin.py``) recompute position-bias terms in every forward that depend on no input. On a GPU
the host's kernel launches are extraction's cost (BENCHMARKS.md), so a frozen model keeps them.

Rules, one place for both: the terms are kept per ``state`` (e.g. dtype or autocast state: the
float16 check runs float32 once) and made again when a source tensor changes (its address, dtype or
version counter: ``load_state_dict`` and ``.to()`` move them; edits through ``.data`` or numpy do
not, and are not seen). When sources change and the new terms have the old shapes, the kept tensors
are overwritten in place, so a CUDA graph captured over them reads the new terms. Sources that
require a gradient or are inference tensors get nothing kept (the caller computes the terms
itself, in the autograd graph).
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch


class KeptTerms:
    """``get(state, sources, compute)`` -> the tuple of tensors ``compute()`` makes, kept while ``sources`` stay."""

    def __init__(self) -> None:
        self._kept: dict[Hashable, tuple[tuple, tuple[torch.Tensor, ...]]] = {}

    def __len__(self) -> int:
        """How many states have terms kept."""
        return len(self._kept)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor kept, all states (some may be a source itself, e.g. a weight already in the dtype)."""
        return [t for _, kept in self._kept.values() for t in kept]

    def clear(self) -> None:
        """Drop everything (the module moved or was cast: the kept tensors belong to the old weights)."""
        self._kept = {}

    def get(self, state: Hashable, sources: Sequence[torch.Tensor],
            compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...] | None:
        """The kept terms for ``state``, made by ``compute`` (under no_grad, outside inference mode) when
        ``sources`` changed; None when a source requires a gradient or is an inference tensor."""
        if any(t.requires_grad or t.is_inference() for t in sources):
            return None
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources)
        kept = self._kept.get(state)
        if kept is not None and kept[0] == key:
            return kept[1]
        with torch.no_grad(), torch.inference_mode(False):
            fresh = tuple(compute())
            if kept is not None and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                                        for a, b in zip(kept[1], fresh)):
                for old, new in zip(kept[1], fresh):  # in place: a captured CUDA graph reads them
                    old.copy_(new)
                fresh = kept[1]
        self._kept[state] = (key, fresh)
        return fresh
