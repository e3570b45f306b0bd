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
        key = _key(sources)
        kept = self._kept.get(state)
        if kept is not None and kept[0] == key:
            return kept[1]
        if _capturing():  # made now, they would only be recorded into the graph: the caller computes them there
            return None
        with torch.no_grad(), torch.inference_mode(False):
            fresh = tuple(compute())
            # in place, so that a captured CUDA graph reads the new terms; not where a term is a source itself
            # (a weight already in the dtype): copying would write into a weight, and a graph reads it anyway
            ptrs = {t.data_ptr() for t in sources} | ({p for p, _, _ in kept[0]} if kept is not None else set())
            if kept is not None and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                                        and a.data_ptr() not in ptrs and b.data_ptr() not in ptrs
                                        for a, b in zip(kept[1], fresh)):
                for old, new in zip(kept[1], fresh):
                    old.copy_(new)
                fresh = kept[1]
        self._kept[state] = (key, fresh)  # no source was written to: the key still holds
        return fresh


class DropsKeptWhenMoved:
    """``nn.Module`` mixin: a ``.to()`` / ``.half()`` that moves or casts the module's tensors drops what
    its ``KeptTerms`` hold (they belong to the old tensors); one that moves nothing keeps them."""

    def _apply(self, fn, *args, **kwargs):
        before = addresses(self)  # type: ignore[arg-type]
        out = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        if addresses(self) != before:  # type: ignore[arg-type]
            for terms in terms_of(self):  # type: ignore[arg-type]
                terms.clear()
        return out


def terms_of(module: torch.nn.Module) -> list[KeptTerms]:
    """The ``KeptTerms`` ``module`` holds itself (not its children's)."""
    return [v for v in vars(module).values() if isinstance(v, KeptTerms)]


def _key(sources: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype) for t in sources)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def autocast_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What autocast hands a lower-precision op for ``t``: floating tensors but float64 cast to ``dtype``."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``'s kind, or None (also for kinds autocast does not know)."""
    kind = device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except RuntimeError:  # e.g. "meta"
        return None


def addresses(module: torch.nn.Module) -> tuple[int, ...]:
    """Where ``module``'s parameters and buffers live: a ``.to()`` that changes nothing leaves it as it was."""
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))


def kept_bytes(model: torch.nn.Module) -> int:
    """Bytes the ``KeptTerms`` of ``model``'s modules hold beyond its own parameters and buffers (a term
    that is a weight itself costs nothing): what a model that recomputed them every forward would not hold."""
    own = set(addresses(model))
    sizes: dict[int, int] = {}
    for m in model.modules():
        for terms in terms_of(m):
            for t in terms.tensors():
                if t.data_ptr() not in own:
                    sizes[t.data_ptr()] = t.numel() * t.element_size()
    return sum(sizes.values())


def clear_kept(model: torch.nn.Module) -> None:
    """Drop what every ``KeptTerms`` of ``model``'s modules holds (e.g. the float16 casts once a model
    falls back to float32: they would only take memory)."""
    for m in model.modules():
        for terms in terms_of(m):
            terms.clear()
