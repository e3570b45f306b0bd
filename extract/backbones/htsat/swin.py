"""The Swin-Transformer (v1) body of HTS-AT, with parameter names matching the official checkpoint.

Pre-norm blocks with (shifted) window attention and a learned relative position bias, MLP ratio 4,
qkv bias; patch merging = LayerNorm(4C) then Linear(4C -> 2C, no bias) over the 2 x 2 neighbours
taken in the order (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col).
Tokens travel as (B, H*W, C) in row-major order. Written for inference: no dropout, no drop-path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kept import DropsKeptWhenMoved, KeptTerms


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) index into the ((2w-1)^2, heads) bias table for each query/key pair."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, w*w)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # shift to >= 0
    return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(num_windows, w*w, w*w) additive mask: -100 between tokens from different regions after the shift."""
    regions = torch.zeros(height, width)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[hs, ws] = label
            label += 1
    wins = to_windows(regions[None, :, :, None], window).squeeze(-1)  # (nW, w*w)
    diff = wins[:, None, :] - wins[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, w*w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def from_windows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B * nW, w*w, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(DropsKeptWhenMoved, nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self._kept = KeptTerms()  # see _bias

    def _bias(self, n: int, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The position bias ``(heads, n, n)``, plus the shifted-window ``mask`` as ``(nW, heads, n, n)``, in
        ``dtype``. Weights alone decide it, so a frozen model keeps it (one per dtype, by the rules of
        ``kept.py``) instead of gathering, adding and casting it in every forward: on a GPU the host's
        kernel launches are extraction's cost (BENCHMARKS.md). Cast before a batch's copies are made:
        one ``(bw, heads, n, n)`` tensor under autocast, not a float32 one and its half copy."""
        table, index = self.relative_position_bias_table, self.relative_position_index

        def compute() -> tuple[torch.Tensor]:
            bias = table[index.reshape(-1)].reshape(n, n, self.heads).permute(2, 0, 1)  # (heads, n, n)
            return ((bias if mask is None else bias[None] + mask[:, None]).to(dtype, copy=True),)  # not a view

        kept = self._kept.get(dtype, (table, index) if mask is None else (table, index, mask), compute)
        return kept[0] if kept is not None else compute()[0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self._bias(n, mask, q.dtype)
        if mask is not None:  # (nW, heads, n, n): windows of one image are consecutive in the batch
            nw = mask.shape[0]
            bias = bias[None].expand(bw // nw, nw, self.heads, n, n).reshape(bw, self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on a (grid x grid) token map; shifted when ``shift`` > 0."""

    def __init__(self, dim: int, grid: int, heads: int, window: int, shift: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if grid <= window:  # the window covers the whole map: no shift, window = map
            window, shift = grid, 0
        self.grid, self.window, self.shift = grid, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift:
            self.register_buffer("attn_mask", shifted_window_mask(grid, grid, window, shift))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.norm1(x).reshape(b, self.grid, self.grid, c)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = from_windows(self.attn(to_windows(h, self.window), self.attn_mask), self.window, self.grid, self.grid)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C)."""

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.reshape(b, self.grid, self.grid, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``blocks`` then (except on the last stage) ``downsample``; named as the checkpoint's ``layers.L``."""

    def __init__(self, dim: int, grid: int, depth: int, heads: int, window: int, merge: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, grid, heads, window, shift=0 if i % 2 == 0 else window // 2) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, grid) if merge else None


class PatchEmbed(nn.Module):
    """(B, 1, 256, 256) image -> (B, 64*64, 96) tokens: 4 x 4 convolution, stride 4, then LayerNorm."""

    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))
