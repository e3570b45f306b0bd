"""LCD, Layer-Centric Distillation: every selected layer's frozen tokens -> K meta-tokens, in parallel.

Our reading of the paper (Mettle, TPAMI 2025), each part an option for ablations:

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
* The tokens never need a gradient, so LN(X) is a constant. :class:`_GroupAttend` computes
  ``softmax(query LN(X)^T) LN(X) W_v^T`` and keeps for the backward pass only the input tokens
  (which the caller holds anyway, in their stored dtype), the small attention weights and the
  parameters; LN(X) and the attended tokens are rebuilt in backward. Autograd's version would keep
  a float32 LN(X) for every layer (twice the float16 tokens) and the attended tokens (h x K x D_l
  per segment). The values are applied after the attention, which scales with K x N x D_l instead
  of N x D_l x d. ``attention="naive"`` projects every token with plain autograd ops: the oracle.
* The layers of one stage run as one batched computation (see :class:`LCD`).
* On CUDA its float32 products run as TF32 by default (``lcd.matmul``): the float16 tokens carry 10
  mantissa bits, what TF32 reads, and in full float32 the products were most of a step's kernel time.

Data contract: input tokens ``(B, T, N_l, D_l)`` per layer (any float dtype; they never require
grad), or int8 codes with their per-token scales ``(B, T, N_l)`` float32 under ``key + SCALE`` (an
int8 cache read as stored: the scaling happens inside the float32 normalisation, on the device, so
the same numbers result as from tokens decoded on the host); output ``(B, T, K, d)`` float32 per
modality.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from mettle.cache import SCALE, ArraySpec, CacheMeta

from .config import ConfigError, LCDConfig
from .lcd_autograd import _GroupAttend, _normalize, _Recompute, _stacked, fp32_matmul

SHARES = ("none", "stage")
MATMUL = {"tf32": "tf32", "float32": "ieee"}  # lcd.matmul -> torch's fp32_precision (auto: tf32 on CUDA)


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

    def forward(self, x: torch.Tensor, readout: Readout, scale: torch.Tensor | None = None) -> torch.Tensor:
        """(S, N, D) tokens of S segments (or int8 codes and their (S, N) scales) -> (S, K, d)
        meta-tokens, with plain autograd operations.

        The reference form (``attention="naive"``, and tokens that require grad): every token is
        projected by the value map. :class:`LCD` normally runs its layers through :class:`_GroupAttend`.
        """
        m = self.meta.unsqueeze(0).expand(x.shape[0], -1, -1)
        xn = _normalize(x, scale)
        if self.cfg.adapt:
            attn = torch.einsum("hkD,snD->shkn", self.query, xn).softmax(-1)
            values = readout.v(xn).view(*xn.shape[:2], self.heads, self.head_dim)  # every token projected
            read = torch.einsum("shkn,snhj->skhj", attn, values).reshape(x.shape[0], -1, self.cfg.dim)
            m = m + readout.o(read)
            m = m + readout.mlp(readout.norm_mlp(m))
        if self.cfg.preserve:
            m = m + self.gate * readout.v(xn.mean(1)).unsqueeze(1)
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
    """One modality's LCD over the selected layers; forward returns ``(B, T, K, d)``.

    Layers of one stage (same width and token count) run together: one batched attention per group
    instead of one per layer, which on a GPU removes most kernel launches (a Swin-V2-L stage has 18
    blocks). A group is split into chunks whose meta-token activations (the part after the attention)
    stay under ``lcd.chunk_mib`` (by device: ``CHUNK_MIB``), and a chunk's attention reads its layers
    in pieces whose float32 normalised tokens stay under as much, so the transient memory does not grow
    with the number of layers. The part after the attention runs once a chunk, not once a piece: at
    batch 8 a full-size stage-2 layer has 8.8 MiB of tokens but 5 MiB of activations, and that part is
    ~40 small kernels (forward, recomputation and backward).
    """

    # By device type, MiB of float32 normalised tokens per attention piece (backward rebuilds them
    # while their float32 cast is alive: twice that in all) and of activations after the attention per
    # chunk (some 8 float32 (K, d) per layer and segment, which dominate with few tokens a layer:
    # full-size, batch 8, one token a layer: 862 -> 518 MiB above idle on the CPU at 16);
    # lcd.chunk_mib sets both. CPU: (8, 16) against (16, 16): batch 1 RSS above idle -32 MiB for
    # +10 % time, batch 8 the same pieces (one layer's tokens exceed 8 MiB there); larger chunks were
    # slower at batch 8 (cache misses). CUDA: kernels bound a step there (BENCHMARKS.md), so larger
    # pieces and chunks; at 16 MiB a full-size batch of 8 ran nearly every layer on its own
    CHUNK_MIB = {"cpu": (8, 16), "cuda": (32, 32)}
    chunk_bytes: int | None = None  # tests: set to split differently (1: every layer its own chunk)
    meta_bytes: int | None = None
    # Recompute the part after the attention in backward (True), keep its activations (False), or
    # (None) recompute only when all layers' activations would exceed one chunk's budget. Why: at
    # batch 1 the recomputation is ~15 kernels a chunk for a few MiB (full-size, CPU profile:
    # 688 -> 560 operators a step, peak +2 MiB); at batch 8 keeping them costs +130 MiB
    # (scripts/step_profile.py, BENCHMARKS.md). The same numbers either way.
    recompute: bool | None = None

    def __init__(self, arrays: Sequence[ArraySpec], cfg: LCDConfig) -> None:
        super().__init__()
        if not arrays:
            raise ConfigError("LCD needs at least one layer. Fix: check lcd.layers")
        if cfg.chunk_mib < 0:
            raise ConfigError(f"lcd.chunk_mib={cfg.chunk_mib} is negative. Fix: a size in MiB, or 0 for the device's default")
        if cfg.matmul not in (*MATMUL, "auto"):
            raise ConfigError(f"lcd.matmul={cfg.matmul!r} is unknown. Fix: use auto, tf32 or float32")
        if cfg.share not in SHARES:
            raise ConfigError(f"lcd.share={cfg.share!r} is unknown. Fix: use one of {', '.join(SHARES)}")
        self.cfg = cfg
        self.keys = [a.key for a in arrays]
        self.layers = nn.ModuleList(LayerDistiller(a.dim, cfg) for a in arrays)
        owners: dict[object, int] = {}
        dims: list[int] = []
        self.owner = []  # layer i reads through readouts[owner[i]]
        for i, a in enumerate(arrays):
            group = (a.stage, a.dim) if cfg.share == "stage" else i
            if group not in owners:
                owners[group] = len(dims)
                dims.append(a.dim)
            self.owner.append(owners[group])
        self.readouts = nn.ModuleList(Readout(dim, cfg) for dim in dims)
        batches: dict[tuple, list[int]] = {}  # layers computed together: one readout, one token shape
        for i, a in enumerate(arrays):
            batches.setdefault((self.owner[i], a.tokens, a.dim), []).append(i)
        self.groups = list(batches.values())

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        first = tokens[self.keys[0]]
        if first.device.type != "cuda":  # CPU products are float32 whatever the setting says
            return self._forward(tokens, first)
        with fp32_matmul(MATMUL.get(self.cfg.matmul, "tf32")):  # backward: as the forward (lcd_autograd)
            return self._forward(tokens, first)

    def _forward(self, tokens: Mapping[str, torch.Tensor], first: torch.Tensor) -> torch.Tensor:
        b, t = first.shape[:2]
        xs = [tokens[k].reshape(b * t, *tokens[k].shape[2:]) for k in self.keys]
        ss = [tokens[k + SCALE].reshape(b * t, -1) if k + SCALE in tokens else None for k in self.keys]
        unscaled = [k for k, x, s in zip(self.keys, xs, ss) if s is None and not x.is_floating_point()]
        if unscaled:  # codes alone look like tokens to a LayerNorm, but are not
            raise ValueError(f"LCD got {xs[self.keys.index(unscaled[0])].dtype} codes for {unscaled[0]} without "
                             f"their scales ({unscaled[0] + SCALE}). Fix: hand float tokens, or codes with scales "
                             "(Cache.iterate(..., codes=keys))")
        if self.cfg.attention == "naive" or any(x.requires_grad for x in xs):
            total = sum(layer(x, self.readouts[g], s) for x, s, layer, g in zip(xs, ss, self.layers, self.owner))
        else:
            total = 0
            pieces, chunks = ((self.cfg.chunk_mib, self.cfg.chunk_mib) if self.cfg.chunk_mib
                              else self.CHUNK_MIB.get(first.device.type, (16, 16)))
            chunk_bytes, meta_bytes = self.chunk_bytes or pieces << 20, self.meta_bytes or chunks << 20
            meta = 8 * self.cfg.meta_tokens * self.cfg.dim * 4 * b * t  # ~ one layer's meta-token activations
            recompute = self.recompute if self.recompute is not None else meta * len(self.layers) > meta_bytes
            for group in self.groups:
                per = xs[group[0]][0].numel() * 4 * b * t  # float32 bytes of one layer's tokens
                attend, step = max(1, chunk_bytes // max(per, 1)), max(1, meta_bytes // meta)
                for c in range(0, len(group), step):
                    total = total + self._group(group[c:c + step], xs, ss, recompute, attend)
        return (total / len(self.layers)).view(b, t, *total.shape[1:])

    def _group(self, idx: list[int], xs: list[torch.Tensor], ss: list[torch.Tensor | None],
               recompute: bool = True, attend: int | None = None) -> torch.Tensor:
        """Sum over the layers ``idx`` (one readout, one token shape) of their (S, K, d) meta-tokens; the
        attention reads ``attend`` layers at a time (all by default), the part after it runs on all at once.

        The part after the attention (output projection, MLP, preservation) works on K meta-tokens
        per segment and layer, cheap to compute but, kept for backward, as large as the float16
        tokens themselves (several (L, S, K, d) float32 activations); with ``recompute`` it is
        recomputed in backward instead (see :attr:`recompute`).
        """
        coded = [i for i in idx if ss[i] is not None]
        if coded and len(coded) < len(idx):  # codes beside floats (AVS: a block the head reads comes decoded)
            return (self._group(coded, xs, ss, recompute, attend)
                    + self._group([i for i in idx if ss[i] is None], xs, ss, recompute, attend))
        cfg, readout = self.cfg, self.readouts[self.owner[idx[0]]]
        layers = [self.layers[i] for i in idx]
        read = mean = gate = None
        group, scales = [xs[i] for i in idx], [ss[i] for i in idx]
        if cfg.adapt:
            step = attend or len(idx)
            parts = [_GroupAttend.apply(torch.stack([layer.query for layer in layers[j:j + step]]), readout.v.weight,
                                        None if not coded else _stacked(scales[j:j + step]), *group[j:j + step])
                     for j in range(0, len(idx), step)]
            read, mean = parts[0] if len(parts) == 1 else (torch.cat([p[0] for p in parts]),
                                                          torch.cat([p[1] for p in parts]))
        elif cfg.preserve:
            with torch.no_grad():
                mean = torch.stack([_normalize(x, s).mean(1) for x, s in zip(group, scales)])
        if cfg.preserve:
            gate = torch.stack([layer.gate for layer in layers]).view(-1, 1, 1, 1)
        meta = torch.stack([layer.meta for layer in layers])  # (L, K, d)
        segments = xs[idx[0]].shape[0]

        def finish(meta, read, mean, gate):
            m = meta.unsqueeze(1)  # (L, 1, K, d)
            if read is not None:
                m = m + readout.o(read + readout.v.bias)
                m = m + readout.mlp(readout.norm_mlp(m))
            if gate is not None:
                m = m + gate * readout.v(mean).unsqueeze(2)
            return m.expand(-1, segments, -1, -1).sum(0)
        if recompute and torch.is_grad_enabled():
            return _Recompute.apply(finish, meta, read, mean, gate)
        return finish(meta, read, mean, gate)
