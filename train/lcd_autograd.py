"""The LCD's two autograd functions: the grouped attention read-out and the recomputation.

Why they are functions of their own (see :mod:`mettle.train.lcd` for the method): the tokens never
need a gradient, so the attention keeps only the caller's tokens and its small attention weights for
backward and rebuilds the float32 normalised tokens there (autograd would keep them, twice the float16
tokens, for every layer); the part after the attention is cheap to recompute and as large as the tokens
when kept.

Data contracts are in each function's docstring; both run in float32 whatever a caller's autocast
says (the attention turns it off inside, the recomputation restores the forward's), and their backward
runs CUDA's float32 matrix products as their forward did (TF32 or not: ``lcd.matmul``), whatever the
process's setting is when autograd calls it.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

_EPS = 1e-5


def _normalize(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last axis without affine, in float32 (float64 stays float64, for gradcheck);
    int8 codes are first multiplied by their per-token ``scale`` (``x.shape[:-1]``), as decoding does."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if scale is not None:
        x = x * scale.unsqueeze(-1)
    return nn.functional.layer_norm(x, x.shape[-1:], eps=_EPS)


def _stacked(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)  # one layer: a view, no copy


class _GroupAttend(torch.autograd.Function):
    """Attention read-out of L layers of one width at once, keeping no float32 copy of their tokens.

    ``(query (L, h, K, D), weight (d, D), scale (L, S, N) | None, *xs (S, N, D) x L) -> (read (L, S, K, d),
    mean (L, S, D))``
    where ``read = softmax(query LN(x)^T) LN(x) W^T`` per head (head h uses rows h*d/h.. of W; the
    bias is added by the caller) and ``mean`` is the token mean of LN(x) (no gradient). Gradients go
    to ``query`` and ``weight`` only. Backward keeps the caller's tokens ``xs`` (with int8 codes: the
    codes and ``scale``), the attention weights (L, K*h, S, N) and the parameters, and rebuilds
    LN(x) and the attended tokens.

    Written as batched matrix products on views: the attention rows are ordered (meta-token, head),
    so the attended tokens (L*S*K, h, D) are read per head as strided matrices, and the per-head
    products write their results as strided matrices into the layout the next product reads
    (``out=``), so no product needs a copy of anything token-sized (einsum's own choice of layouts
    copied the float32 tokens once and the attended tokens three times a chunk). The copies left are
    of the queries and of the (L, K*h, S, N) attention.
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,  # type: ignore[override]
                *xs: torch.Tensor):
        ctx.matmul = torch.backends.cuda.matmul.fp32_precision
        with _without_autocast(query.device.type):  # float32 throughout, under a caller's autocast too
            return _GroupAttend._forward(ctx, query, weight, scale, *xs)

    @staticmethod
    def _forward(ctx, query, weight, scale, *xs):
        nl, h, k, dim = query.shape
        xn = _normalize(_stacked(xs), scale)  # (L, S, N, D) float32, transient
        s, n = xn.shape[1:3]
        q = query.transpose(1, 2).reshape(nl, k * h, dim)  # rows (meta-token, head)
        attn = torch.bmm(q, xn.view(nl, s * n, dim).transpose(1, 2)).view(nl, k * h, s, n).softmax(-1)
        z = _attended(attn, xn)
        w = weight.view(h, -1, dim)
        read = z.new_empty(nl, s, k, h, w.shape[1])  # (L, S, K, h, dh): head-major channels
        torch.bmm(z.view(-1, h, dim).transpose(0, 1), w.transpose(1, 2), out=read.view(-1, h, w.shape[1]).transpose(0, 1))
        read = read.view(nl, s, k, -1)
        mean = xn.mean(2)
        ctx.save_for_backward(query, weight, attn, scale, *xs)
        ctx.mark_non_differentiable(mean)
        ctx.set_materialize_grads(False)  # mean's gradient, always unused, is not made as zeros
        return read, mean

    @staticmethod
    @torch.autograd.function.once_differentiable  # its products write into buffers (out=): no graph of their own
    def backward(ctx, dread: torch.Tensor | None, _dmean: None):  # type: ignore[override]
        with _without_autocast(ctx.saved_tensors[0].device.type), fp32_matmul(ctx.matmul):
            return _GroupAttend._backward(ctx, dread)

    @staticmethod
    def _backward(ctx, dread):
        query, weight, attn, scale, *xs = ctx.saved_tensors
        if dread is None:  # nothing downstream used the read-out
            return (None, None, None, *([None] * len(xs)))
        nl, h, k, dim = query.shape
        xn = _normalize(_stacked(xs), scale)
        s, n = xn.shape[1:3]
        w = weight.view(h, -1, dim)
        dr = dread.reshape(-1, h, w.shape[1])  # (L*S*K, h, dh)
        z = _attended(attn, xn)
        dweight = torch.bmm(dr.permute(1, 2, 0), z.view(-1, h, dim).transpose(0, 1)).view(weight.shape)
        del z  # as large as the float32 tokens times h*K/N: freed before dz of the same size is made
        dz = xn.new_empty(nl * s, k * h, dim)  # (L*S, K*h, D), written per head as strided matrices
        torch.bmm(dr.transpose(0, 1), w, out=dz.view(-1, h, dim).transpose(0, 1))
        da = torch.bmm(dz, xn.view(nl * s, n, dim).transpose(1, 2))  # (L*S, K*h, N)
        del dz
        da = da.view(nl, s, k * h, n).transpose(1, 2)  # (L, K*h, S, N), strided
        ds = attn * (da - (attn * da).sum(-1, keepdim=True))  # laid out as attn
        dq = torch.bmm(ds.reshape(nl, k * h, s * n), xn.view(nl, s * n, dim))  # (L, K*h, D)
        dquery = dq.view(nl, k, h, dim).transpose(1, 2).contiguous()
        return (dquery, dweight, None, *([None] * len(xs)))


def _without_autocast(device_type: str):
    """A context with autocast off on ``device_type`` (none to turn off where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def fp32_matmul(precision: str | None):
    """A context in which CUDA runs float32 matrix products as ``precision`` says (``tf32``: tensor cores,
    inputs rounded to 10 mantissa bits; ``ieee``: full float32; ``none``: as torch's legacy settings say;
    None: leave the setting as it is), restored after.

    Why torch's ``fp32_precision`` attribute (torch >= 2.9) and not ``allow_tf32``: reading the legacy
    flag while the new one is set raises, and saving and restoring through the new one leaves both readable.
    The setting is the process's, not the thread's: while the context is open, other threads' CUDA float32
    products follow it too (mettle's loader threads run none).
    """
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    if precision is None or precision == saved:
        yield
        return
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def _attended(attn: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """(L, K*h, S, N) attention x (L, S, N, D) tokens -> (L*S, K*h, D) attended tokens."""
    nl, kh, s, n = attn.shape
    return torch.bmm(attn.transpose(1, 2).reshape(nl * s, kh, n), xn.view(nl * s, n, xn.shape[-1]))


class _Recompute(torch.autograd.Function):
    """``fn(*inputs)`` without keeping its intermediate activations: it runs again in backward.

    ``torch.utils.checkpoint`` does the same, but its first call imports torch._dynamo and sympy
    (892 modules, +150 MB resident, measured), a fixed cost larger than what it saves here; so does
    any backward given explicit gradient tensors, hence the scalar product below. ``fn``
    must be deterministic; the parameters it closes over get their gradients from the
    recomputation's backward, so drive training with ``loss.backward()`` (as mettle-train does), not
    ``torch.autograd.grad``. At least one input must require grad (here: the meta-tokens). A caller's
    autocast at the forward is restored for the recomputation (backward usually runs outside it).
    """

    @staticmethod
    def forward(ctx, fn, *inputs):  # type: ignore[override]
        ctx.fn, ctx.matmul = fn, torch.backends.cuda.matmul.fp32_precision
        ctx.device = next(x.device.type for x in inputs if x is not None)
        ctx.autocast = (torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device),
                        torch.is_autocast_cache_enabled()) if torch.amp.is_autocast_available(ctx.device) else None
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        inputs = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        as_forward = contextlib.nullcontext() if ctx.autocast is None else torch.autocast(
            ctx.device, dtype=ctx.autocast[1], enabled=ctx.autocast[0], cache_enabled=ctx.autocast[2])
        # the same gradients as backward(out, grad), which would import sympy
        with torch.enable_grad(), as_forward, fp32_matmul(ctx.matmul):
            (ctx.fn(*inputs) * grad).sum().backward()
        return (None, *[None if x is None or not x.requires_grad else x.grad for x in inputs])
