"""One CUDA graph per batch shape for the extractor's forward + pool + encode (``--cuda-graphs``).

Why: on an H200 (BENCHMARKS.md, 2026-11-27) extraction was bound by the host, not the GPU: the
thread driving the backbones spent half its time issuing some 2,400 operators per batch of both
backbones (the forward, then pooling, encoding and copies), and the GPU waited for it. A captured
graph replays all of them with one launch.

Contract: :class:`GraphedEncode` wraps ``fn(x) -> {key: Encoded}`` (device tensors) for inputs of
one shape and dtype. ``__call__(x)`` copies ``x`` (host, ideally page-locked, or device) into the
graph's input buffer, replays, and returns the graph's *own* output tensors: they are overwritten by
the next replay, so the caller must queue whatever reads them (the copies to the host) on the same
stream before calling again, as ``TokenForward.encoded`` does. Capture refuses what a graph cannot
hold (host synchronisation inside ``fn``, for one); the caller then stays with eager execution.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from mettle.cache.dtypes import Encoded
from mettle.manifests.errors import first_line

log = logging.getLogger(__name__)

GRAPH_TOLERANCE = 1e-3  # relative L2 error allowed between a replay and the eager run on the same batch

EncodeFn = Callable[[torch.Tensor], dict[str, Encoded]]


class GraphedEncode:
    """``fn`` captured as a CUDA graph for inputs shaped like ``example`` (see the module docstring)."""

    def __init__(self, fn: EncodeFn, example: torch.Tensor, device: torch.device, warmup: int = 2) -> None:
        self.shape, self.dtype = tuple(example.shape), example.dtype
        self.input = torch.empty(self.shape, dtype=self.dtype, device=device)
        self.input.copy_(example)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # first calls allocate workspaces, plan FFTs, pick kernels: not in the graph
            for _ in range(warmup):
                fn(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # captured on the warm-up's stream, of this GPU: torch.cuda.graph's own stream is made once per
        # process, on whichever GPU was current then; thread_local: other threads' CUDA calls during a capture
        # are allowed (stage threads allocate page-locked memory, put threads wait on events)
        with torch.cuda.device(device), torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
            self.output = fn(self.input)

    def __call__(self, x: torch.Tensor) -> dict[str, Encoded]:
        if tuple(x.shape) != self.shape or x.dtype != self.dtype:
            raise ValueError(f"this graph takes {self.dtype} {self.shape}; got {x.dtype} {tuple(x.shape)}")
        self.input.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.output


def capture(fn: EncodeFn, x: torch.Tensor, device: torch.device, name: str) -> GraphedEncode | None:
    """Capture ``fn`` for batches shaped like ``x`` and check one replay against the eager run on
    ``x``; None (with a warning naming ``name``) when capture fails or the replay differs."""
    try:
        graph = GraphedEncode(fn, x, device)
        replay = graph(x)
        eager = fn(x.to(device, non_blocking=True))
        err = max(_rel_err(replay[k], eager[k]) for k in eager)
    except (RuntimeError, ValueError) as e:  # what CUDA and torch raise when a capture is refused
        log.warning("%s: CUDA graph capture failed (%s); running without graphs", name, first_line(e))
        return None
    if not err <= GRAPH_TOLERANCE:
        log.warning("%s: a CUDA graph replay is off by %.2g (relative) from the eager run; running without graphs",
                    name, err)
        return None
    log.info("%s: batches of %s run as one CUDA graph (replay within %.2g of eager)", name, tuple(x.shape), err)
    return graph


def _rel_err(a: Encoded, b: Encoded) -> float:
    x, y = a.codes.float(), b.codes.float()
    if a.scale is not None:
        x, y = x * a.scale.unsqueeze(-1), y * b.scale.unsqueeze(-1)
    return float((x - y).norm() / y.norm().clamp_min(1e-12))
