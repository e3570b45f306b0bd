"""Frozen backbone -> the cached blocks' tokens, pooled to their stored grids.

Shared by the extractor and the live token source (end-to-end mode): both call
:class:`TokenForward`, so live tokens and cached tokens are the same computation.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Sequence

import torch

from mettle.cache import ArraySpec, pool_tokens
from mettle.cache.dtypes import Encoded, StorageDtype, encode_tensor

from .backbones import Backbone
from .backbones.kept import clear_kept
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
            against the eager run), and a smaller batch as a graph of its own from the second time its
            size comes (each shard's last batch is partial, of the same size in every full shard).
            None: always eager.
        copy_streams: on CUDA, :meth:`encoded` copies inputs to the device and tokens to the host on
            streams of their own, overlapping the forward of the batches around them (on an H200 the
            copies, on the compute stream, were most of what made ``encoded`` run at 92 % of the pure
            forward's speed, eighth session of 2026-11-27; False: on the compute stream, as before).

    ``__call__(x)`` takes a preprocessed batch ``(B, ...)`` and returns ``{key: (B, n, d)}`` on the CPU,
    in ``arrays`` order (float32; unpooled blocks float16 under autocast). :meth:`encoded` is the
    extractor's form: tokens encoded into the storage dtype on the device and copied to the host
    without waiting.
    """

    def __init__(self, backbone: Backbone, arrays: Sequence[ArraySpec], device: torch.device,
                 precision: str = "auto", graph_batch: int | None = None, copy_streams: bool = True) -> None:
        if precision not in ("auto", "float32", "float16"):
            raise ValueError(f"--precision {precision!r} is unknown. Fix: use auto, float32 or float16")
        self.backbone = backbone.to(device)
        self.arrays = list(arrays)
        self.device = device
        self.indices = [a.block_index for a in self.arrays]
        self.groups = _group_arrays(self.arrays)
        self.autocast = precision == "float16" or (precision == "auto" and device.type == "cuda")
        self._check_autocast = precision == "auto" and self.autocast
        self.autocast_error: float | None = None
        self.graph_batch = graph_batch if device.type == "cuda" else None
        self.graphs: dict[tuple, GraphedEncode | None] = {}  # (storage, shape, dtype) -> graph, None: eager
        self._partial_seen: dict[tuple, int] = {}  # partial batches' keys -> times run eagerly
        self.one_off_s = 0.0  # host seconds in the precision check and graph captures (profiles report it)
        self.copy_streams = copy_streams and device.type == "cuda"
        self._streams: dict[str, torch.cuda.Stream] = {}  # "upload", "download": made on first use

    def _forward(self, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
        """Tokens of each group of arrays for batch ``x`` (on the device): ``(G * B, n, d)`` per group
        (``self.groups``: arrays of one shape, stacked member after member), pooled groups in float32,
        unpooled ones in the backbone's dtype (float16 under autocast).

        Why groups: on a GPU the host's cost is the operators it issues (BENCHMARKS.md), and the blocks
        of a stage share their shapes: Swin-V2-L's 24 and HTS-AT's 12 blocks form 4 groups each,
        converted, pooled, encoded and copied to the host as one instead of block by block.
        """
        # no autocast cast cache: frozen weights never use it, and a CUDA graph capture cannot hold it
        ctx = torch.autocast(self.device.type, dtype=torch.float16, cache_enabled=False) if autocast else nullcontext()
        with torch.no_grad(), ctx:  # not inference_mode: live tokens feed autograd graphs (as inputs)
            outs = self.backbone.forward_tokens(x, self.indices)
        grouped = []
        for members in self.groups:
            a = self.arrays[members[0]]
            t = outs[members[0]] if len(members) == 1 else torch.cat([outs[i] for i in members])
            grouped.append(pool_tokens(t.float(), a.source_grid, a.grid) if a.pooled else t)
        return grouped

    def _members(self, grouped: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-group tensors -> one ``(B, n, d)`` view per array, in ``arrays`` order."""
        out: list[torch.Tensor | None] = [None] * len(self.arrays)
        for members, t in zip(self.groups, grouped):
            for m, part in zip(members, t.chunk(len(members))):
                out[m] = part
        return out  # type: ignore[return-value]

    def _tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`_forward` at the chosen precision; the first call checks float16 autocast against
        float32 (``precision="auto"``), block by block, and falls back to float32 beyond ``AUTOCAST_TOLERANCE``."""
        outs = self._forward(x, self.autocast)
        if self._check_autocast:
            self._check_autocast = False
            if self.device.type == "cuda":  # this batch's own forward is not one-off work: wait for it first
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            exact = self._forward(x, False)
            errs = [float((a.float() - b).norm() / b.norm().clamp_min(1e-12))
                    for a, b in zip(self._members(outs), self._members(exact))]
            err = max(e if math.isfinite(e) else math.inf for e in errs)  # NaN (non-finite tokens) fails the check
            self.autocast_error = err
            if not err <= AUTOCAST_TOLERANCE:
                log.warning("%s: float16 autocast is off by %.2g (relative) from float32; using float32",
                            self.backbone.name, err)
                self.autocast, outs = False, exact
                clear_kept(self.backbone)  # its float16 casts and terms would only take memory now
            else:
                log.info("%s: float16 autocast within %.2g of float32", self.backbone.name, err)
            self.one_off_s += time.perf_counter() - t0
        return outs

    def __call__(self, x: torch.Tensor, on_device: bool = False) -> dict[str, torch.Tensor]:
        """Tokens of the arrays for input batch ``x``, on the CPU (for the cache), or left on the model's
        device with ``on_device`` (end-to-end training consumes them there: no round trip)."""
        outs = self._members(self._tokens(x.to(self.device, non_blocking=True)))
        return {a.key: t if on_device else t.cpu() for a, t in zip(self.arrays, outs)}

    def _encode_groups(self, grouped: list[torch.Tensor], storage: StorageDtype) -> list[Encoded]:
        """Encode each group's tokens (:meth:`_forward`) as one tensor."""
        return [encode_tensor(t, storage) for t in grouped]

    def _split(self, grouped: Sequence[Encoded]) -> dict[str, Encoded]:
        """Per-group encodings -> ``{key: Encoded}`` in ``arrays`` order (views of the group's tensors)."""
        out: list[Encoded | None] = [None] * len(self.arrays)
        for members, e in zip(self.groups, grouped):
            b = len(e.peak) // len(members)
            for j, m in enumerate(members):
                rows = slice(j * b, (j + 1) * b)
                out[m] = Encoded(e.codes[rows], None if e.scale is None else e.scale[rows], e.peak[rows])
        return {a.key: o for a, o in zip(self.arrays, out)}

    def encoded(self, x: torch.Tensor, storage: StorageDtype) -> "InFlight":
        """Tokens of batch ``x`` encoded into ``storage`` where the backbone runs (``dtypes.encode_tensor``),
        then copied to the host without blocking. The caller overlaps the next batch with the wait:
        on a GPU the host only ever sees the stored bytes and does no per-value work."""
        if self.device.type != "cuda":
            return InFlight(self._split(self._encode_groups(self._tokens(x.to(self.device)), storage)), None)
        with torch.cuda.device(self.device):  # streams, graphs and events of this GPU, not the current one
            compute = torch.cuda.current_stream(self.device)
            x = self._upload(x, compute)
            graph = self._graph(x, storage)
            if graph is not None:
                grouped = list(graph(x).values())  # the graph's own outputs: the next replay overwrites them
            else:
                grouped = self._encode_groups(self._tokens(x), storage)
            host, event = self._download(grouped, compute, own=graph is None)
        return InFlight(self._split(host), event)  # views: nothing is read before wait()

    def _stream(self, name: str) -> torch.cuda.Stream:
        if name not in self._streams:
            self._streams[name] = torch.cuda.Stream(self.device)
        return self._streams[name]

    def _upload(self, x: torch.Tensor, compute: torch.cuda.Stream) -> torch.Tensor:
        """Batch ``x`` on the device. With :attr:`copy_streams` a page-locked batch is copied on an upload
        stream, which the compute stream waits for: the copy runs while the batches before it compute."""
        if not self.copy_streams or x.device.type != "cpu" or not x.is_pinned():
            return x.to(self.device, non_blocking=True)  # pageable: CUDA waits for the stream's work anyway
        upload = self._stream("upload")
        with torch.cuda.stream(upload):
            on_device = x.to(self.device, non_blocking=True)
        compute.wait_stream(upload)
        on_device.record_stream(compute)  # its memory is not handed out again before the compute read it
        return on_device

    def _download(self, grouped: list[Encoded], compute: torch.cuda.Stream,
                  own: bool) -> tuple[list[Encoded], torch.cuda.Event]:
        """Copies of the encoded tokens to page-locked host memory, queued without waiting, and the event
        that marks them done. With :attr:`copy_streams` they run on a download stream behind the compute
        stream, so that they overlap the next batch's forward; a graph's outputs (``own`` False) are
        first copied on the device (tens of microseconds), since the next replay overwrites them."""
        if not self.copy_streams:
            stream = compute
        else:
            if not own:
                grouped = [Encoded(*(None if t is None else t.clone() for t in _parts(e))) for e in grouped]
            stream = self._stream("download")
            stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            # to("cpu", non_blocking=True) from CUDA lands in page-locked memory: an asynchronous copy
            host = [Encoded(*(None if t is None else t.to("cpu", non_blocking=True) for t in _parts(e))) for e in grouped]
        if stream is not compute:
            for e in grouped:
                for t in _parts(e):
                    if t is not None:
                        t.record_stream(stream)  # freed by the compute stream's allocator only after the copy
        event = torch.cuda.Event(blocking=True)  # the put thread waits on it: sleeping, not spinning on a core
        event.record(stream)
        return host, event

    def _graph(self, x: torch.Tensor, storage: StorageDtype) -> GraphedEncode | None:
        """The CUDA graph for batches like ``x`` (captured on first use), or None: run eagerly."""
        if self.graph_batch is None or len(x) > self.graph_batch or self._check_autocast:
            return None
        key = (storage.name, tuple(x.shape), x.dtype)
        if key not in self.graphs and len(x) < self.graph_batch:  # a partial batch: captured once it recurs
            seen = self._partial_seen[key] = self._partial_seen.get(key, 0) + 1
            if seen < 2:
                return None
        if key not in self.graphs:
            def run(inp: torch.Tensor) -> dict[str, Encoded]:
                outs = self._forward(inp.to(self.device, non_blocking=True), self.autocast)
                return {f"group{i}": e for i, e in enumerate(self._encode_groups(outs, storage))}

            t0 = time.perf_counter()
            self.graphs[key] = capture(run, x, self.device, self.backbone.name)
            self.one_off_s += time.perf_counter() - t0
        return self.graphs[key]


def _parts(e: Encoded) -> tuple:
    """An encoding's tensors in :class:`Encoded`'s field order (``scale`` may be None)."""
    return e.codes, e.scale, e.peak


def _group_arrays(arrays: Sequence[ArraySpec]) -> list[list[int]]:
    """Indices of the arrays that share source grid, stored grid and width, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault((tuple(a.source_grid), tuple(a.grid), a.dim), []).append(i)
    return list(groups.values())


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
