"""A frozen backbone's linear and convolution weights in autocast's precision, cast once and kept.

Autocast keeps its casts of a weight only for weights that require a gradient (its cache is for
training); a frozen backbone's weights are cast again in every forward: one copy kernel per weight
and bias, some 300 per batch for Swin-V2-L + HTS-AT, each issued by the host. On a GPU, extraction
and end-to-end training with the full-size backbones are bound by the host issuing kernels
(BENCHMARKS.md), and the copies also take some of the GPU's time. So a frozen model's ``nn.Linear``
and ``nn.Conv2d`` modules keep their weights in the autocast dtype they last ran under (one set per
dtype, made again when a weight changes: the rules of ``kept.py``).

Exactness: autocast hands ``linear`` and ``conv2d`` their weights cast to its dtype (any floating
dtype but float64); the kept tensors are that cast, made once, so the output is bitwise the same
(tests compare float16 and bfloat16 autocast, float32, new weights and weights that learn). Outside
autocast, and for weights that require a gradient or are inference tensors, the module runs as
PyTorch's own. Memory: the kept copies (half the float32 weights' size under a 16-bit autocast)
stay on the device while the model lives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kept import DropsKeptWhenMoved, KeptTerms, autocast_cast, autocast_dtype


class _KeptCasts(DropsKeptWhenMoved):
    """Mixin: ``_kept_weights(x)`` -> (weight, bias) cast for the running autocast, or None (run as usual)."""

    _casts: KeptTerms

    def _kept_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        dtype = autocast_dtype(x.device)
        if dtype is None or self.weight.device != x.device:  # type: ignore[attr-defined]
            return None
        bias = self.bias  # type: ignore[attr-defined]
        sources = (self.weight,) if bias is None else (self.weight, bias)  # type: ignore[attr-defined]
        kept = self._casts.get(dtype, sources, lambda: tuple(autocast_cast(t, dtype) for t in sources))
        if kept is None:
            return None
        return kept[0], (kept[1] if bias is not None else None)


class KeptCastLinear(_KeptCasts, nn.Linear):
    """``nn.Linear`` of a frozen model: (..., in) -> (..., out), its weight cast once per autocast dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept_weights(x)
        return super().forward(x) if kept is None else F.linear(x, *kept)


class KeptCastConv2d(_KeptCasts, nn.Conv2d):
    """``nn.Conv2d`` of a frozen model: (B, C, H, W) -> (B, C', H', W'), its weight cast once per autocast dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept_weights(x)
        return super().forward(x) if kept is None else self._conv_forward(x, *kept)


SWAPS = {nn.Linear: KeptCastLinear, nn.Conv2d: KeptCastConv2d}  # exact types only: subclasses keep their forward


def keep_casts(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` / ``nn.Conv2d`` of ``model`` for its kept-cast form; returns how many
    modules of ``model`` keep casts. Idempotent; the modules keep their parameters, names and state-dict keys."""
    for m in model.modules():
        swap = SWAPS.get(type(m))
        if swap is not None:
            m.__class__ = swap
            m._casts = KeptTerms()
    return sum(isinstance(m, _KeptCasts) for m in model.modules())


def per_call_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose Linear / Conv2d modules are PyTorch's own again (autocast casts
    their weights in every forward): the reference kept casts are compared and counted against."""
    import copy

    plain = copy.deepcopy(model)
    back = {v: k for k, v in SWAPS.items()}
    for m in plain.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
            del m._casts
    return plain
