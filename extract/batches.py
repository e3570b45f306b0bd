"""Batches of backbone inputs made from consecutive clips' preprocessed segments.

A batch of ``batch_size`` segments may join the end of one clip and the start of the next
(:class:`Pending` keeps the queue and where each batch's rows go); :func:`stage_inputs` joins a batch's
pieces into one tensor, on a stage thread of ``shard.launch_shard``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch


def stage_inputs(inputs: list[torch.Tensor], pinned: bool) -> torch.Tensor:
    """The queued inputs as one batch tensor; in page-locked memory with ``pinned``. (A stage thread of
    :func:`~mettle.extract.shard.launch_shard`.)

    Why page-locked: copying pageable memory to a GPU waits for everything queued on the stream first
    (CUDA's rule for pageable host-to-device copies), so each batch's input copy would stall the host
    until the previous batch had finished. From page-locked memory the copy is queued like a kernel.
    Why numpy: its copy releases Python's lock and runs on this thread alone, where ``torch.cat`` on a
    CPU would start an intra-op thread team for each stage thread (as many threads as cores, beside the
    launching, decode and put threads); one thread joins a 14 MB batch in ~2 ms on this machine.
    """
    if not pinned and len(inputs) == 1:
        return inputs[0]
    first = inputs[0]
    # on a CPU, frames come channels-last and the forward reads them so: a batch joined from several clips'
    # frames runs the same kernels as one clip's own (the tokens are then equal bit for bit); a GPU batch
    # is contiguous, as it has been since graphs were measured (a graph's input buffer is contiguous)
    layout = torch.channels_last if not pinned and first.dim() == 4 and not first.is_contiguous() and \
        first.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((sum(len(x) for x in inputs), *first.shape[1:]), dtype=first.dtype, pin_memory=pinned,
                      memory_format=layout)
    try:
        arrays = [x.numpy() for x in inputs]
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16): torch's copy, with its own threads
        return torch.cat(inputs, out=out)
    np.concatenate(arrays, out=out.numpy())
    return out


@dataclass
class Pending:
    """One modality's segments waiting for a full batch (a batch may join the end of one clip and the
    start of the next: the backbone then always runs ``batch_size`` segments but at a shard's end)."""

    inputs: deque = field(default_factory=deque)  # preprocessed (n, ...) not yet staged
    clips: deque = field(default_factory=deque)  # [local row, segments, first segment not yet run]

    @property
    def queued(self) -> int:
        """Segments in ``inputs``."""
        return sum(len(x) for x in self.inputs)

    def take(self, size: int) -> list[torch.Tensor]:
        """The next ``size`` queued segments, as views of the clips' inputs (joined on a stage thread)."""
        pieces, at = [], 0
        while at < size:
            x = self.inputs[0]
            m = min(len(x), size - at)
            pieces.append(x[:m])
            if m == len(x):
                self.inputs.popleft()
            else:
                self.inputs[0] = x[m:]
            at += m
        return pieces

    def place(self, size: int) -> list[tuple[int, slice, slice]]:
        """Where the next ``size`` queued segments go: ``(local row, the clip's segments, the batch's rows)``."""
        places, at = [], 0
        while at < size:
            clip = self.clips[0]
            local, count, first = clip
            m = min(count - first, size - at)
            places.append((local, slice(first, first + m), slice(at, at + m)))
            at += m
            clip[2] = first + m
            if clip[2] == count:
                self.clips.popleft()
        return places
