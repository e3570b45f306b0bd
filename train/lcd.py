"""LCD, Layer-Centric Distillation: every selected layer's frozen tokens -> K meta-tokens, in parallel.

Our reading of the paper (its full text is not public), each part an option for ablations:

* **Adaptation** (``adapt``): K learnable meta-tokens M_l (K x d) per layer query the layer's tokens
  X (N x D_l) with multi-head cross-attention, queries from LN(M_l), keys and values from LN(X)
  projected D_l -> d; residual; then an MLP with residual.
* **Preservation** (``preserve``): the layer's token mean, normalised and mapped D_l -> d by a
  per-layer linear, is added to every meta-token through a learnable scalar gate.
* **Aggregation**: the layers' meta-tokens are averaged (the paper's choice).

Cost: the naive attention projects every token twice (N x D_l x d each). The folded form computes
the same mathematics as ``scores = (q W_k^T) LN(X)^T`` and ``out = (A LN(X)) W_v^T + b_v``, which
scales with K x N x D_l (K is small) instead of N x D_l x d. The key bias adds the same value to
every score of a query, so softmax removes it; the value bias passes through because attention rows
sum to one (the key projection therefore has no bias). ``attention="naive"`` keeps the direct form as a test oracle.

Data contract: input tokens ``(B, T, N_l, D_l)`` per layer (any float dtype; they never require
grad), output ``(B, T, K, d)`` float32 per modality.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from mettle.cache import ArraySpec, CacheMeta

from .config import ConfigError, LCDConfig


class LayerDistiller(nn.Module):
    """One layer's meta-tokens: adaptation (cross-attention + MLP) and preservation (gated mean)."""

    def __init__(self, in_dim: int, cfg: LCDConfig) -> None:
        super().__init__()
        k, d, h = cfg.meta_tokens, cfg.dim, cfg.heads
        if d % h:
            raise ConfigError(f"lcd.dim={d} is not divisible by lcd.heads={h}. Fix: choose heads dividing dim")
        if cfg.attention not in ("folded", "naive"):
            raise ConfigError(f"lcd.attention={cfg.attention!r} is unknown. Fix: use folded or naive")
        self.cfg, self.heads, self.head_dim = cfg, h, d // h
        self.meta = nn.Parameter(torch.randn(k, d) * 0.02)
        if cfg.adapt:
            self.norm_x = nn.LayerNorm(in_dim)
            self.norm_q = nn.LayerNorm(d)
            self.q = nn.Linear(d, d)
            self.k = nn.Linear(in_dim, d, bias=False)  # a key bias shifts all scores of a query alike: no effect
            self.v = nn.Linear(in_dim, d)
            self.o = nn.Linear(d, d)
            hidden = max(1, int(d * cfg.mlp_ratio))
            self.norm_mlp = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        if cfg.preserve:
            self.norm_keep = nn.LayerNorm(in_dim)
            self.keep = nn.Linear(in_dim, d)
            self.gate = nn.Parameter(torch.tensor(float(cfg.gate_init)))

    def _attend_folded(self, q: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        h, dh = self.heads, self.head_dim
        wk = self.k.weight.view(h, dh, -1)  # (h, dh, D)
        wv = self.v.weight.view(h, dh, -1)
        qf = torch.einsum("khj,hjD->hkD", q.view(-1, h, dh), wk) / math.sqrt(dh)  # (h, K, D): once per step
        scores = torch.einsum("hkD,snD->shkn", qf, xn)
        z = torch.einsum("shkn,snD->shkD", scores.softmax(-1), xn)  # (S, h, K, D)
        out = torch.einsum("shkD,hjD->skhj", z, wv) + self.v.bias.view(h, dh)
        return out.reshape(xn.shape[0], -1, h * dh)

    def _attend_naive(self, q: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        s, n = xn.shape[:2]
        h, dh = self.heads, self.head_dim
        keys = self.k(xn).view(s, n, h, dh)
        values = self.v(xn).view(s, n, h, dh)
        scores = torch.einsum("khj,snhj->shkn", q.view(-1, h, dh), keys) / math.sqrt(dh)
        return torch.einsum("shkn,snhj->skhj", scores.softmax(-1), values).reshape(s, -1, h * dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(S, N, D) tokens of S segments -> (S, K, d) meta-tokens."""
        x = x.float()
        m = self.meta.unsqueeze(0).expand(x.shape[0], -1, -1)
        if self.cfg.adapt:
            xn = self.norm_x(x)
            q = self.q(self.norm_q(self.meta))  # (K, d): the queries are shared by every segment
            attend = self._attend_folded if self.cfg.attention == "folded" else self._attend_naive
            m = m + self.o(attend(q, xn))
            m = m + self.mlp(self.norm_mlp(m))
        if self.cfg.preserve:
            m = m + self.gate * self.keep(self.norm_keep(x.mean(1))).unsqueeze(1)
        return m


def select_layers(meta: CacheMeta, modality: str, spec: str) -> list[ArraySpec]:
    """The arrays LCD reads for ``modality`` under ``lcd.layers`` (see :class:`LCDConfig`).

    Layers are named against the backbone's blocks, so a cache lacking a wanted block (another
    preset) is refused by the caller's ``require`` with the fix.
    """
    if modality not in meta.backbones:
        raise ConfigError(f"the token source has no {modality} backbone. Fix: extract both modalities")
    blocks = list(meta.backbones[modality].blocks)
    if spec == "all":
        chosen = blocks
    elif spec == "last-stage":
        chosen = [b for b in blocks if b.stage == blocks[-1].stage]
    elif spec.startswith("every-") and spec[6:].isdigit() and int(spec[6:]) >= 1:
        chosen = blocks[::-1][::int(spec[6:])][::-1]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        by_name = {b.name: b for b in blocks}
        unknown = [n for n in names if n not in by_name]
        if unknown or not names:
            raise ConfigError(f"lcd.layers={spec!r}: not all, last-stage, every-N or block names "
                              f"({', '.join(unknown) or 'none given'} unknown). Fix: e.g. lcd.layers=every-2")
        chosen = [by_name[n] for n in names]
    keys = [f"{modality}/{b.name}" for b in chosen]
    have = {a.key: a for a in meta.arrays}
    return [have.get(k) or ArraySpec(k, modality, b.name, b.index, b.stage, b.dim, b.grid, b.grid)
            for k, b in zip(keys, chosen)]


class LCD(nn.Module):
    """One modality's LCD over the selected layers; forward returns ``(B, T, K, d)``."""

    def __init__(self, arrays: Sequence[ArraySpec], cfg: LCDConfig) -> None:
        super().__init__()
        if not arrays:
            raise ConfigError("LCD needs at least one layer. Fix: check lcd.layers")
        self.keys = [a.key for a in arrays]
        self.layers = nn.ModuleList(LayerDistiller(a.dim, cfg) for a in arrays)

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        first = tokens[self.keys[0]]
        b, t = first.shape[:2]
        total = None
        for key, layer in zip(self.keys, self.layers):
            x = tokens[key]
            m = layer(x.reshape(b * t, *x.shape[2:]))
            total = m if total is None else total + m
        return (total / len(self.layers)).view(b, t, *total.shape[1:])
