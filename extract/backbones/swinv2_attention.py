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
are computed again when a weight changes (its version counter moves: ``load_state_dict`` copies
in place), when the device, dtype or autocast state differ, and never while any of those weights
requires a gradient (then timm's own forward runs: the terms must stay in the autograd graph).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


try:  # imported only where a timm Swin-V2 is built (swinv2.py), so timm is there
    from timm.models.swin_transformer_v2 import WindowAttention
except ImportError:  # a timm without this class: attention stays timm's own
    WindowAttention = None

NEEDED = ("qkv", "q_bias", "k_bias", "v_bias", "logit_scale", "cpb_mlp", "relative_coords_table",
          "relative_position_index", "window_size", "num_heads", "softmax", "proj")


def frozen_window_attention(attn: nn.Module) -> bool:
    """Make ``attn`` (a timm Swin-V2 ``WindowAttention``) reuse its weight-only terms; False (and
    ``attn`` left as it is) when it is not the layout this module knows (another timm, no q/v bias)."""
    if WindowAttention is None or type(attn) is not WindowAttention:
        return False
    if not all(hasattr(attn, n) for n in NEEDED) or attn.q_bias is None or getattr(attn, "qkv_bias_separate", False):
        return False
    attn.__class__ = FrozenWindowAttention
    attn._terms = None
    return True


def _autocast_state(device: torch.device) -> tuple:
    kind = device.type
    return (kind, torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)


class _Terms:
    """One device and precision's constant terms of one attention module, with the key they hold for."""

    def __init__(self, key: tuple, qkv_bias: torch.Tensor, logit_scale: torch.Tensor, bias: torch.Tensor) -> None:
        self.key, self.qkv_bias, self.logit_scale, self.bias = key, qkv_bias, logit_scale, bias


class FrozenWindowAttention(WindowAttention if WindowAttention is not None else nn.Module):  # type: ignore[misc]
    """timm's ``WindowAttention`` with its weight-only terms kept: (windows * B, N, C) -> (windows * B, N, C)."""

    _terms: _Terms | None = None

    def _weights(self) -> list[torch.Tensor]:
        return [self.q_bias, self.k_bias, self.v_bias, self.logit_scale, *self.cpb_mlp.parameters()]

    def _constant_terms(self, device: torch.device) -> _Terms | None:
        weights = self._weights()
        if self.training or any(w.requires_grad for w in weights):
            return None
        key = (_autocast_state(device), *((w.data_ptr(), w._version, w.dtype) for w in weights))
        if self._terms is not None and self._terms.key == key:
            return self._terms
        with torch.no_grad():  # the same operations as timm's forward, in the caller's precision
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if key[0][1] is not None:  # autocast would cast the bias inside F.linear every time: once, here
                qkv_bias = qkv_bias.to(key[0][1])
            logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
            n = self.window_size[0] * self.window_size[1]
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
            bias = (16 * torch.sigmoid(bias)).unsqueeze(0)
        self._terms = _Terms(key, qkv_bias, logit_scale, bias)
        return self._terms

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        terms = self._constant_terms(x.device)
        if terms is None:  # weights that learn, or train mode (dropout): timm's own forward
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
