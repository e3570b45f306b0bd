"""Frozen backbone -> the cached blocks' tokens, pooled to their stored grids.

Shared by the extractor and the live token source (end-to-end mode): both call
:class:`TokenForward`, so live tokens and cached tokens are the same computation.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Sequence

import torch

from mettle.cache import ArraySpec, pool_tokens
from mettle.cache.dtypes import Encoded, StorageDtype, encode_tensor

from .backbones import Backbone
from .graphs import GraphedEncode, capture

log = logging.getLogger(__name__)

AUTOCAST_TOLERANCE = 1e-2  # relative L2 error per block allowed for float16 autocast against float32


class TokenForward:
    """Run one frozen backbone on a batch of segments and return the selected blocks' tokens.

    Args:
        backbone: a frozen :class:`Backbone`.
        arrays: the cache arrays of this backbone's modality (block index + stored grid each).
        device: where the backbone runs.
        precision: ``float32``, ``float16`` (autocast), or ``auto`` (float16 autocast on CUDA when
            the first batch's tokens stay within ``AUTOCAST_TOLERANCE`` of float32, else float32).
        graph_batch: on CUDA, :meth:`encoded` runs batches of this many segments as one CUDA graph
            (``graphs.py``; captured at the first such batch after the precision check, and checked
            against the eager run). None: always eager.

    ``__call__(x)`` takes a preprocessed batch ``(B, ...)`` and returns ``{key: (B, n, d) float32}``
    on the CPU, in ``arrays`` order. :meth:`encoded` is the extractor's form: tokens encoded into the
    storage dtype on the device and copied to the host without waiting.
    """

    def __init__(self, backbone: Backbone, arrays: Sequence[ArraySpec], device: torch.device,
                 precision: str = "auto", graph_batch: int | None = None) -> None:
        if precision not in ("auto", "float32", "float16"):
            raise ValueError(f"--precision {precision!r} is unknown. Fix: use auto, float32 or float16")
        self.backbone = backbone.to(device)
        self.arrays = list(arrays)
        self.device = device
        self.indices = [a.block_index for a in self.arrays]
        self.autocast = precision == "float16" or (precision == "auto" and device.type == "cuda")
        self._check_autocast = precision == "auto" and self.autocast
        self.autocast_error: float | None = None
        self.graph_batch = graph_batch if device.type == "cuda" else None
        self.graphs: dict[tuple, GraphedEncode | None] = {}  # (storage, shape, dtype) -> graph, None: eager

    def _forward(self, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
        # no autocast cast cache: frozen weights never use it, and a CUDA graph capture cannot hold it
        ctx = torch.autocast(self.device.type, dtype=torch.float16, cache_enabled=False) if autocast else nullcontext()
        with torch.no_grad(), ctx:  # not inference_mode: live tokens feed autograd graphs (as inputs)
            outs = self.backbone.forward_tokens(x, self.indices)
        # pooled in float32; unpooled blocks keep the backbone's dtype (float16 under autocast)
        return [t if a.grid == a.source_grid else pool_tokens(t.float(), a.source_grid, a.grid)
                for t, a in zip(outs, self.arrays)]

    def __call__(self, x: torch.Tensor, on_device: bool = False) -> dict[str, torch.Tensor]:
        """Tokens of the arrays for input batch ``x``, on the CPU (for the cache), or left on the model's
        device with ``on_device`` (end-to-end training consumes them there: no round trip)."""
        x = x.to(self.device, non_blocking=True)
        outs = self._forward(x, self.autocast)
        if self._check_autocast:
            self._check_autocast = False
            exact = self._forward(x, False)
            err = max(float((a.float() - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(outs, exact))
            self.autocast_error = err
            if err > AUTOCAST_TOLERANCE:
                log.warning("%s: float16 autocast is off by %.2g (relative) from float32; using float32",
                            self.backbone.name, err)
                self.autocast, outs = False, exact
            else:
                log.info("%s: float16 autocast within %.2g of float32", self.backbone.name, err)
        return {a.key: t if on_device else t.cpu() for a, t in zip(self.arrays, outs)}

    def encoded(self, x: torch.Tensor, storage: StorageDtype) -> "InFlight":
        """Tokens of batch ``x`` encoded into ``storage`` where the backbone runs (``dtypes.encode_tensor``),
        then copied to the host without blocking. The caller overlaps the next batch with the wait:
        on a GPU the host only ever sees the stored bytes and does no per-value work."""
        if self.device.type != "cuda":
            return InFlight({key: encode_tensor(t, storage) for key, t in self(x, on_device=True).items()}, None)
        with torch.cuda.device(self.device):  # streams, graphs and events of this GPU, not the current one
            graph = self._graph(x, storage)
            if graph is not None:
                encoded = graph(x)  # the graph's own outputs: copied below, before the next replay overwrites them
            else:
                encoded = {key: encode_tensor(t, storage) for key, t in self(x, on_device=True).items()}
            # to("cpu", non_blocking=True) from CUDA lands in page-locked memory: an asynchronous copy
            host = {key: Encoded(*(None if t is None else t.to("cpu", non_blocking=True)
                                   for t in (e.codes, e.scale, e.peak)))
                    for key, e in encoded.items()}
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return InFlight(host, event)


    def _graph(self, x: torch.Tensor, storage: StorageDtype) -> GraphedEncode | None:
        """The CUDA graph for batches like ``x`` (captured on first use), or None: run eagerly."""
        if self.graph_batch is None or len(x) != self.graph_batch or self._check_autocast:
            return None
        key = (storage.name, tuple(x.shape), x.dtype)
        if key not in self.graphs:
            def run(inp: torch.Tensor) -> dict[str, Encoded]:
                outs = self._forward(inp.to(self.device, non_blocking=True), self.autocast)
                return {a.key: encode_tensor(t, storage) for a, t in zip(self.arrays, outs)}

            self.graphs[key] = capture(run, x, self.device, self.backbone.name)
        return self.graphs[key]


class InFlight:
    """One batch's encoded tokens on their way to the host: :meth:`wait` returns them once the copies
    are done (``{key: Encoded}`` of CPU tensors, ``TokenForward.arrays`` order)."""

    def __init__(self, tokens: dict[str, Encoded], event: "torch.cuda.Event | None") -> None:
        self._tokens, self._event = tokens, event

    def wait(self) -> dict[str, Encoded]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tokens
