"""Swin-V2 window attention for a frozen backbone: its weight-only terms computed once, not per forward.

timm's ``WindowAttention`` recomputes in every forward of every block three terms that depend on
the weights alone (four under autocast, which casts the q/k/v weight every time): the joined q/k/v
bias, the clamped and exponentiated logit scale, and the continuous relative-position bias (a
two-layer MLP over a fixed coordinate table, gathered into the window's pairs, then ``16 *
sigmoid``). For frozen weights they are constants: 13 of the 38 operators one attention issues, 10
of them kernels. On a GPU, extraction and end-to-end training
with the full-size Swin-V2-L are bound by the host issuing kernels (BENCHMARKS.md), so the terms
are computed once per device and precision and reused.

Exactness: the terms are computed by the module's own operations under the caller's autocast
state, and the rest of the forward issues the same operations in the same order as timm's, so the
output is bitwise timm's (tests compare float32, autocast, plain and shifted windows). The terms
are kept per autocast state and made again when a weight or position buffer changes, by the rules
of ``kept.py`` (shared with HTS-AT). Weights that require a gradient, train mode and inference-mode
weights get timm's own forward (the terms must stay in the autograd graph). Swapping the classes
first checks one module's forward on a random window against timm's, and keeps timm's when they
differ (another timm version).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .kept import DropsKeptWhenMoved, KeptTerms, autocast_cast, autocast_dtype

try:  # imported only where a timm Swin-V2 is built (swinv2.py), so timm is there
    from timm.models.swin_transformer_v2 import WindowAttention
except ImportError:  # a timm without this class: attention stays timm's own
    WindowAttention = None

log = logging.getLogger(__name__)

NEEDED = ("qkv", "q_bias", "k_bias", "v_bias", "logit_scale", "cpb_mlp", "relative_coords_table",
          "relative_position_index", "window_size", "num_heads", "softmax", "proj")


def _eligible(attn: nn.Module) -> bool:
    return (WindowAttention is not None and type(attn) is WindowAttention and all(hasattr(attn, n) for n in NEEDED)
            and attn.q_bias is not None and not getattr(attn, "qkv_bias_separate", False))


def freeze_window_attention(model: nn.Module) -> int:
    """Make every timm Swin-V2 ``WindowAttention`` of ``model`` reuse its weight-only terms; returns how
    many. 0 when this timm's forward differs from ours on one module's random window: the forward
    is the same code for every module, so one check tells for all."""
    modules = [m for m in model.modules() if _eligible(m)]
    if not modules:
        return 0
    first = modules[0]
    weight = first.qkv.weight
    x = torch.randn(1, first.window_size[0] * first.window_size[1], weight.shape[1], dtype=weight.dtype,
                    device=weight.device, generator=torch.Generator(weight.device).manual_seed(0))
    with torch.no_grad():
        want = first(x)
        _swap(first)
        same = torch.equal(first(x), want)
    if not same:
        first.__class__ = WindowAttention
        del first._terms
        log.warning("Swin-V2 attention: the frozen forward differs from this timm's; using timm's (slower)")
        return 0
    for m in modules[1:]:
        _swap(m)
    return len(modules)


def _swap(attn: nn.Module) -> None:
    attn.__class__ = FrozenWindowAttention
    attn._terms = KeptTerms()


class FrozenWindowAttention(DropsKeptWhenMoved,  # type: ignore[misc]
                            WindowAttention if WindowAttention is not None else nn.Module):
    """timm's ``WindowAttention`` with its weight-only terms kept: (windows * B, N, C) -> (windows * B, N, C)."""

    _terms: KeptTerms

    def _constant_terms(self, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """(q/k/v weight and bias in autocast's dtype, logit scale, position bias) as timm's forward computes
        them, kept (``kept.py``)."""
        if self.training:
            return None
        sources = [self.qkv.weight, self.q_bias, self.k_bias, self.v_bias, self.logit_scale,
                   *self.cpb_mlp.parameters(), self.relative_coords_table, self.relative_position_index]
        dtype = autocast_dtype(device)
        state = (device.type, dtype, tuple(self.window_size))
        return self._terms.get(state, sources, lambda: self._compute_terms(dtype))

    def _compute_terms(self, dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        """The same operations as timm's forward, in the caller's precision."""
        qkv_weight, qkv_bias = self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if dtype is not None:  # autocast casts both in F.linear every time: once, here
            qkv_weight, qkv_bias = autocast_cast(qkv_weight, dtype), autocast_cast(qkv_bias, dtype)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return qkv_weight, qkv_bias, logit_scale, (16 * torch.sigmoid(bias)).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        terms = self._constant_terms(x.device)
        if terms is None:  # weights that learn, train mode (dropout), inference-mode weights: timm's own
            return super().forward(x, mask)
        qkv_weight, qkv_bias, logit_scale, bias = terms
        windows, n, c = x.shape
        qkv = F.linear(x, weight=qkv_weight, bias=qkv_bias)
        q, k, v = qkv.reshape(windows, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * logit_scale
        attn = attn + bias
        if mask is not None:  # shifted windows: mask (windows per image, N, N)
            per_image = mask.shape[0]
            attn = attn.view(-1, per_image, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.softmax(attn)  # eval mode: the dropouts are identities
        return self.proj((attn @ v).transpose(1, 2).reshape(windows, n, c))
