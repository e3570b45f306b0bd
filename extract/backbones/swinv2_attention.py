"""Swin-V2 window attention for a frozen backbone: its weight-only terms computed once, not per forward.

timm's ``WindowAttention`` recomputes in every forward of every block three terms that depend on
the weights alone: the joined q/k/v bias, the clamped and exponentiated logit scale, and the
continuous relative-position bias (a two-layer MLP over a fixed coordinate table, gathered into
the window's pairs, then ``16 * sigmoid``). For frozen weights they are constants: 13 of the 38
operators one attention issues, 10 of them kernels. On a GPU, extraction and end-to-end training
with the full-size Swin-V2-L are bound by the host issuing kernels (BENCHMARKS.md), so the terms
are computed once per device and precision and reused.

Exactness: the terms are computed by the module's own operations under the caller's autocast
state, and the rest of the forward issues the same operations in the same order as timm's, so the
output is bitwise timm's (tests compare float32, autocast, plain and shifted windows). The terms
are computed again when a weight or position buffer changes (its version counter moves:
``load_state_dict`` copies in place), when the module is moved or cast, and kept per autocast state
(the float16 check runs float32 once). Edits through ``.data`` or numpy move no version counter and
are not seen: load weights with ``load_state_dict``. When a weight changes, the kept tensors are
overwritten in place, so a CUDA graph captured over them reads the new terms, as timm's forward
would compute them. Weights that require a gradient, train mode and inference-mode weights get
timm's own forward (the terms must stay in the autograd graph). Swapping the class checks one
forward against timm's first and keeps timm's when they differ (another timm version).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn


try:  # imported only where a timm Swin-V2 is built (swinv2.py), so timm is there
    from timm.models.swin_transformer_v2 import WindowAttention
except ImportError:  # a timm without this class: attention stays timm's own
    WindowAttention = None

log = logging.getLogger(__name__)

NEEDED = ("qkv", "q_bias", "k_bias", "v_bias", "logit_scale", "cpb_mlp", "relative_coords_table",
          "relative_position_index", "window_size", "num_heads", "softmax", "proj")


def frozen_window_attention(attn: nn.Module) -> bool:
    """Make ``attn`` (a timm Swin-V2 ``WindowAttention``) reuse its weight-only terms; False (and
    ``attn`` left as it is) when it is not the layout this module knows, or a forward of a random
    window through both differs (another timm version)."""
    if WindowAttention is None or type(attn) is not WindowAttention:
        return False
    if not all(hasattr(attn, n) for n in NEEDED) or attn.q_bias is None or getattr(attn, "qkv_bias_separate", False):
        return False
    weight = attn.qkv.weight
    x = torch.randn(1, attn.window_size[0] * attn.window_size[1], weight.shape[1], dtype=weight.dtype,
                    device=weight.device, generator=torch.Generator(weight.device).manual_seed(0))
    with torch.no_grad():
        want = attn(x)
        attn.__class__ = FrozenWindowAttention
        attn._terms = {}
        same = torch.equal(attn(x), want)
    if not same:
        attn.__class__ = WindowAttention
        del attn._terms
        log.warning("Swin-V2 attention: the frozen forward differs from this timm's; using timm's (slower)")
    return same


def _autocast_state(device: torch.device) -> tuple:
    kind = device.type
    return (kind, torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)


class _Terms:
    """One autocast state's constant terms of one attention module, with the key they hold for."""

    def __init__(self, key: tuple, qkv_bias: torch.Tensor, logit_scale: torch.Tensor, bias: torch.Tensor) -> None:
        self.key, self.qkv_bias, self.logit_scale, self.bias = key, qkv_bias, logit_scale, bias

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.qkv_bias, self.logit_scale, self.bias


class FrozenWindowAttention(WindowAttention if WindowAttention is not None else nn.Module):  # type: ignore[misc]
    """timm's ``WindowAttention`` with its weight-only terms kept: (windows * B, N, C) -> (windows * B, N, C)."""

    _terms: dict[tuple, _Terms]

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda(): the kept terms belong to the old tensors
        self._terms = {}
        return super()._apply(fn, *args, **kwargs)

    def _sources(self) -> list[torch.Tensor]:
        return [self.q_bias, self.k_bias, self.v_bias, self.logit_scale, *self.cpb_mlp.parameters(),
                self.relative_coords_table, self.relative_position_index]

    def _constant_terms(self, device: torch.device) -> _Terms | None:
        sources = self._sources()
        if self.training or any(t.requires_grad or t.is_inference() for t in sources):
            return None
        state = _autocast_state(device)
        key = (tuple(self.window_size), *((t.data_ptr(), t._version, t.dtype) for t in sources))
        terms = self._terms.get(state)
        if terms is not None and terms.key == key:
            return terms
        with torch.no_grad(), torch.inference_mode(False):  # the same operations as timm's forward
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if state[1] is not None and qkv_bias.dtype != torch.float64:  # autocast casts the bias in F.linear
                qkv_bias = qkv_bias.to(state[1])  # every time: once, here (it leaves float64 alone)
            logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
            n = self.window_size[0] * self.window_size[1]
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
            bias = (16 * torch.sigmoid(bias)).unsqueeze(0)
            fresh = _Terms(key, qkv_bias, logit_scale, bias)
            if terms is not None and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                                         for a, b in zip(terms.tensors(), fresh.tensors())):
                for old, new in zip(terms.tensors(), fresh.tensors()):  # in place: a captured graph reads them
                    old.copy_(new)
                terms.key = key
                return terms
        self._terms[state] = fresh
        return fresh

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        terms = self._constant_terms(x.device)
        if terms is None:  # weights that learn, train mode (dropout), inference-mode weights: timm's own
            return super().forward(x, mask)
        windows, n, c = x.shape
        qkv = F.linear(x, weight=self.qkv.weight, bias=terms.qkv_bias)
        q, k, v = qkv.reshape(windows, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * terms.logit_scale
        attn = attn + terms.bias
        if mask is not None:  # shifted windows: mask (windows per image, N, N)
            per_image = mask.shape[0]
            attn = attn.view(-1, per_image, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.softmax(attn)  # eval mode: the dropouts are identities
        return self.proj((attn @ v).transpose(1, 2).reshape(windows, n, c))
