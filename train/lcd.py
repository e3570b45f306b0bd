"""LCD, Layer-Centric Distillation: every selected layer's frozen tokens -> K meta-tokens, in parallel.

Our reading of the paper (its full text is not public), each part an option for ablations:

* **Adaptation** (``adapt``): K learnable meta-tokens M_l (K x d) per layer read the layer's tokens
  X (N x D_l) by multi-head cross-attention over the normalised tokens LN(X); the head outputs are
  projected D_l -> d (values), mixed by an output projection and added to M_l; then an MLP with
  residual.
* **Preservation** (``preserve``): the uniform read-out of the layer, the mean of LN(X) through the
  same value projection, is added to every meta-token through a learnable scalar gate.
* **Aggregation**: the layers' meta-tokens are averaged (the paper's choice).
* **Sharing** (``share``): ``stage`` lets the layers of one backbone stage (one token width) share
  the value/output projections and the MLP, while meta-tokens, queries and gates stay per layer;
  ``none`` gives every layer its own.

Why it is written this way (memory is the point of the tool):

* The queries come from learned meta-tokens, not from the input, so ``q W_k^T`` is one learned
  matrix per head. It is parameterised directly as ``query`` (heads x K x D_l): the same function
  class as separate query and key projections whenever K <= d / heads, at K x heads instead of d
  parameters per input channel. A key bias would shift all scores of a query alike (softmax removes it).
* The normalisation has no affine part: a scale and shift in front of linear maps folds into them.
* The tokens never need a gradient, so LN(X) is a constant. :class:`_NormAttend` computes
  ``softmax(query LN(X)^T) LN(X)`` and keeps for the backward pass only the input tokens (which the
  caller holds anyway, in their stored dtype), the per-token statistics and the small attention
  weights; LN(X) is rebuilt one layer at a time in backward. Autograd's version would keep a
  float32 LN(X) for every layer (twice the float16 tokens). The values are applied after the
  attention (``(A LN(X)) W_v^T``), which scales with K x N x D_l instead of N x D_l x d.
  ``attention="naive"`` projects every token with plain autograd ops and is the test oracle.

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

_EPS = 1e-5
SHARES = ("none", "stage")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis without affine, in float32 (float64 stays float64, for gradcheck)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    var, mean = torch.var_mean(x, -1, keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + _EPS)


class _NormAttend(torch.autograd.Function):
    """``(query (h, K, D), x (S, N, D)) -> (z (S, h, K, D), mean_n LN(x) (S, D))``; grad to ``query`` only."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, x: torch.Tensor):  # type: ignore[override]
        xn = _normalize(x)
        attn = torch.einsum("hkD,snD->shkn", query, xn).softmax(-1)
        z = torch.einsum("shkn,snD->shkD", attn, xn)
        ctx.save_for_backward(query, x, attn)
        mean = xn.mean(1)
        ctx.mark_non_differentiable(mean)
        return z, mean

    @staticmethod
    def backward(ctx, dz: torch.Tensor, _dmean: torch.Tensor):  # type: ignore[override]
        query, x, attn = ctx.saved_tensors
        xn = _normalize(x)
        da = torch.einsum("shkD,snD->shkn", dz, xn)
        ds = attn * (da - (attn * da).sum(-1, keepdim=True))
        return torch.einsum("shkn,snD->hkD", ds, xn), None


class Readout(nn.Module):
    """Value projection D -> d, output projection and MLP: per layer, or shared by a stage's layers."""

    def __init__(self, in_dim: int, cfg: LCDConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.v = nn.Linear(in_dim, d)
        if cfg.adapt:
            hidden = max(1, int(d * cfg.mlp_ratio))
            self.o = nn.Linear(d, d)
            self.norm_mlp = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


class LayerDistiller(nn.Module):
    """One layer's meta-tokens, queries and preservation gate; projections come from a :class:`Readout`."""

    def __init__(self, in_dim: int, cfg: LCDConfig) -> None:
        super().__init__()
        k, d, h = cfg.meta_tokens, cfg.dim, cfg.heads
        if d % h:
            raise ConfigError(f"lcd.dim={d} is not divisible by lcd.heads={h}. Fix: choose heads dividing dim")
        if cfg.attention not in ("folded", "naive"):
            raise ConfigError(f"lcd.attention={cfg.attention!r} is unknown. Fix: use folded or naive")
        self.cfg, self.heads, self.head_dim = cfg, h, d // h
        self.meta = nn.Parameter(torch.randn(k, d) * 0.02)
        if cfg.adapt:  # scores start O(1): unit-variance LN(X) against query rows of norm ~1
            self.query = nn.Parameter(torch.randn(h, k, in_dim) / math.sqrt(in_dim))
        if cfg.preserve:
            self.gate = nn.Parameter(torch.tensor(float(cfg.gate_init)))

    def _values(self, z: torch.Tensor, v: nn.Linear) -> torch.Tensor:
        """(S, h, K, D) per-head attended tokens -> (S, K, d) through head h's rows of ``v``."""
        h, dh = self.heads, self.head_dim
        out = torch.einsum("shkD,hjD->skhj", z, v.weight.view(h, dh, -1)) + v.bias.view(h, dh)
        return out.reshape(z.shape[0], z.shape[2], h * dh)

    def forward(self, x: torch.Tensor, readout: Readout) -> torch.Tensor:
        """(S, N, D) tokens of S segments -> (S, K, d) meta-tokens."""
        m = self.meta.unsqueeze(0).expand(x.shape[0], -1, -1)
        mean = None
        if self.cfg.adapt:
            if self.cfg.attention == "naive" or x.requires_grad:
                xn = _normalize(x)
                attn = torch.einsum("hkD,snD->shkn", self.query, xn).softmax(-1)
                values = readout.v(xn).view(*xn.shape[:2], self.heads, self.head_dim)  # every token projected
                read = torch.einsum("shkn,snhj->skhj", attn, values).reshape(x.shape[0], -1, self.cfg.dim)
                mean = xn.mean(1)
            else:
                z, mean = _NormAttend.apply(self.query, x)
                read = self._values(z, readout.v)
            m = m + readout.o(read)
            m = m + readout.mlp(readout.norm_mlp(m))
        if self.cfg.preserve:
            if mean is None:
                mean = _normalize(x).mean(1)
            m = m + self.gate * readout.v(mean).unsqueeze(1)
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
        if cfg.share not in SHARES:
            raise ConfigError(f"lcd.share={cfg.share!r} is unknown. Fix: use one of {', '.join(SHARES)}")
        self.keys = [a.key for a in arrays]
        self.layers = nn.ModuleList(LayerDistiller(a.dim, cfg) for a in arrays)
        groups: dict[object, int] = {}
        dims: list[int] = []
        self.owner = []  # layer i reads through readouts[owner[i]]
        for i, a in enumerate(arrays):
            group = (a.stage, a.dim) if cfg.share == "stage" else i
            if group not in groups:
                groups[group] = len(dims)
                dims.append(a.dim)
            self.owner.append(groups[group])
        self.readouts = nn.ModuleList(Readout(dim, cfg) for dim in dims)

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        first = tokens[self.keys[0]]
        b, t = first.shape[:2]
        total = None
        for key, layer, g in zip(self.keys, self.layers, self.owner):
            x = tokens[key]
            m = layer(x.reshape(b * t, *x.shape[2:]), self.readouts[g])
            total = m if total is None else total + m
        return (total / len(self.layers)).view(b, t, *total.shape[1:])
