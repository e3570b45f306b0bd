"""One shard, the unit of extraction: decode its clips, run the backbones in batches, fill a buffer.

Clips are decoded ahead of the forward pass (worker processes or threads, see ``media/pool.py``),
segments of consecutive clips are batched together (``batch_size`` segments per forward), tokens are
encoded into the storage dtype on the backbone's device and copied to the host while the next batch
runs, and put threads copy each batch's tokens into a :class:`ShardBuffer` as they arrive. The
shard is then written whole by the caller. The put threads (:class:`Putter`) serve consecutive
shards: :func:`launch_shard` returns once a shard's batches are launched, and the caller waits for
its last puts (``ShardInFlight.finish``) off the launching thread, so that the next shard's batches
follow without the device draining in between.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from mettle.cache import OK, CacheError, CacheMeta, ShardBuffer, ShardStatus
from mettle.cache.runtime import peak_memory
from mettle.manifests import Manifest

from .batches import Pending, stage_inputs
from .media import MediaError, read_clip, read_masks
from .media.pool import MediaPool
from .tokens import InFlight, TokenForward

log = logging.getLogger(__name__)


class ExtractError(RuntimeError):
    """Extraction stopped on a bad clip (``--on-error fail``); the message names the clip and the fix."""


@dataclass
class Decoded:
    """One clip decoded and preprocessed off the main thread: per modality the model input
    ``(T, ...)`` float32 on the CPU, or the reason preprocessing refused the media."""

    inputs: dict[str, torch.Tensor]
    errors: dict[str, str]


def _decode(clip, data_root: Path, frame_rule: str, preprocess: Mapping[str, Callable],
            media_pool: MediaPool | None) -> Decoded:
    read = media_pool.read if media_pool is not None else read_clip
    media = read(clip, data_root, frame_rule)  # MediaError propagates to the caller's .result()
    inputs, errors = {}, {}
    for modality, fn in preprocess.items():
        try:
            inputs[modality] = fn(media.frames if modality == "visual" else media.audio)
        except ValueError as e:
            errors[modality] = str(e)
    return Decoded(inputs, errors)


def submit_decodes(pool: Executor, manifest: Manifest, data_root: Path, rows: Sequence[int],
                   backbones: Mapping[str, Any], media_pool: MediaPool | None = None) -> list[Future]:
    """Start decoding and preprocessing the clips at ``rows`` (in that order) on the threads of ``pool``.

    Each future gives a :class:`Decoded` (or raises :class:`MediaError`). The media are decoded by
    ``media_pool``'s processes when one is given (see ``media/pool.py``: PyAV holds the GIL), else in
    the thread; preprocessing (resizing frames, tiling audio: torch operators, which release the
    GIL) runs in the thread, so the thread that drives the backbones only runs them.
    """
    preprocess = {m: b.preprocess for m, b in backbones.items()}
    return [pool.submit(_decode, manifest.clips[r], data_root, manifest.frame_rule, preprocess, media_pool)
            for r in rows]


PUT_THREADS = 3  # batches put into the buffer at once (numpy's copies release Python's lock)
STAGE_THREADS = 2  # batches' inputs joined at once, off the launching thread (numpy's copies release the lock)
STAGE_AHEAD = 2  # batches joined (or being joined) and not yet launched: page-locked memory, like MAX_BACKLOG
MAX_BACKLOG = 6  # batches launched and not yet put: bounds the page-locked host memory in flight


class Putter:
    """The put threads and the batches launched but not yet put, shared by consecutive shards.

    Why shared: a shard's last batches are put while the next shard's first ones are launched, so the
    GPU does not drain at every shard's end (on the H200, 2026-11-27, six shards of 192 clips drained
    it six times: ~0.3-0.5 s of a 3 s extraction, by the run's breakdown). ``MAX_BACKLOG`` bounds the
    batches in flight across shards (their page-locked host memory). Use as a context manager: on
    exit puts not yet started are cancelled (a ``ShardInFlight.finish`` still waiting for one on
    another thread gets CancelledError: let such waiters end first) and running ones finish.
    """

    def __init__(self, threads: int = PUT_THREADS, backlog: int = MAX_BACKLOG) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="put")
        self.backlog: deque[Future] = deque()
        self.limit = backlog

    def submit(self, fn: Callable[..., None], *args: Any) -> Future:
        """Queue one put. The caller makes room first (``settle(limit - 1)``) before it launches the batch, so
        that the bound holds for the batch's page-locked memory too, as :func:`launch_shard` does."""
        fut = self.pool.submit(fn, *args)
        self.backlog.append(fut)
        return fut

    def settle(self, keep: int) -> None:
        """Wait until at most ``keep`` puts are in flight; forget those done (raising their errors)."""
        while len(self.backlog) > keep:
            self.backlog.popleft().result()
        while self.backlog and self.backlog[0].done():
            self.backlog.popleft().result()

    def discard(self, futures: Sequence[Future]) -> None:
        """Cancel ``futures`` (a failed launch's puts) and forget them: later shards' settling does not
        meet them."""
        for f in futures:
            f.cancel()
        gone = set(map(id, futures))
        self.backlog = deque(f for f in self.backlog if id(f) not in gone)

    def __enter__(self) -> "Putter":
        return self

    def __exit__(self, *exc: Any) -> None:
        for f in self.backlog:
            f.cancel()
        self.pool.shutdown(wait=True)


@dataclass
class ShardInFlight:
    """A shard whose batches are all launched (:func:`launch_shard`) and whose last puts may still run.
    :meth:`finish` waits for them and returns the filled buffer with the shard's status."""

    buffer: ShardBuffer
    puts: list[Future]
    done: Callable[[], ShardStatus]

    def finish(self) -> tuple[ShardBuffer, ShardStatus]:
        for f in self.puts:
            f.result()  # ExtractError (--on-error fail) of a bad clip's tokens, raised here
        return self.buffer, self.done()


def process_shard(meta: CacheMeta, manifest: Manifest, shard: int, decodes: list[Future],
                  forwards: Mapping[str, TokenForward], batch_size: int, on_error: str = "fail",
                  on_clip: Callable[[], None] | None = None, data_root: Path | None = None,
                  recycle: ShardBuffer | None = None) -> tuple[ShardBuffer, ShardStatus]:
    """Fill one shard's buffer with put threads of its own (:func:`launch_shard`, then wait). Returns it
    with the shard's status (per clip ``ok`` or the error)."""
    with Putter() as putter:
        return launch_shard(meta, manifest, shard, decodes, forwards, batch_size, putter, on_error, on_clip,
                            data_root, recycle).finish()


def launch_shard(meta: CacheMeta, manifest: Manifest, shard: int, decodes: list[Future],
                 forwards: Mapping[str, TokenForward], batch_size: int, putter: Putter, on_error: str = "fail",
                 on_clip: Callable[[], None] | None = None, data_root: Path | None = None,
                 recycle: ShardBuffer | None = None) -> ShardInFlight:
    """Run one shard's clips through the backbones, handing each batch's tokens to ``putter``; returns
    once every batch is launched. ``finish()`` on the result waits for the shard's puts and gives the
    filled buffer with the shard's status (per clip ``ok`` or the error); only once it is finished
    *and written* may its buffer be passed as another shard's ``recycle``.

    With ``on_error="fail"`` the first bad clip raises :class:`ExtractError`: here, or from a put, in
    ``finish`` or in a later :meth:`Putter.settle`, which may be during the next shard's launch (the
    error then names a clip of this shard); with ``"skip"`` its rows are zero and its status holds
    the reason. ``recycle``: a written shard's buffer to reuse (see
    :class:`ShardBuffer`: every row is put or cleared here).

    Threads: this one waits for decoded clips and launches the batches; stage threads (``STAGE_THREADS``)
    join each batch's inputs (the ends and starts of several clips) meanwhile, up to ``STAGE_AHEAD``
    batches ahead of the launches (on the H200, 2026-11-27, joining on this thread took 2.05 s of a 7.63-s
    extraction, time the device may wait through); put
    threads (``PUT_THREADS``) wait for a batch's tokens each and copy them into the buffer (numpy
    copies release Python's lock; batches write disjoint rows). Why: on a GPU extraction is bound by
    the host thread that launches kernels (BENCHMARKS.md), and the copies into the buffer were a
    seventh of its time there; under CUDA graphs one put thread, copying ~3 GB/s, became the
    bottleneck (H200, 2026-11-27: the launching thread waited 1.28 s of 3.01 s for it).
    """
    t_start = time.perf_counter()
    rows = meta.shard_rows(shard)
    buffer = ShardBuffer(meta, shard, recycle)
    clip_ids = [manifest.clips[r].clip_id for r in rows]
    status = {cid: OK for cid in clip_ids}
    pending = {m: Pending() for m in forwards}
    # this thread: decode (waiting for decoded clips), stage (waiting for a batch's inputs to be joined), launch, backlog
    # (waiting for the put threads; forward_s = stage + launch + backlog); the put threads, summed: wait
    # (for the device's copies), put (into the buffer)
    timing = {"decode": 0.0, "stage": 0.0, "launch": 0.0, "backlog": 0.0, "wait": 0.0, "put": 0.0, "end": 0.0}
    one_off_before = sum(fw.one_off_s for fw in forwards.values())  # the forwards live across shards
    puts: list[Future] = []

    status_lock = threading.Lock()  # every thread records failures (a clip's first reason stays) and times

    def fail(local: int, reason: str) -> None:
        if on_error == "fail":
            raise ExtractError(f"clip {clip_ids[local]} (row {rows[local]}): {reason}. To record bad clips and go on, "
                               "pass --on-error skip")
        with status_lock:
            first = status[clip_ids[local]] == OK
            if first:
                status[clip_ids[local]] = reason
        if first:
            log.warning("clip %s failed: %s", clip_ids[local], reason)

    def put(tokens: InFlight, places: list[tuple[int, slice, slice]]) -> None:
        """(A put thread.) Wait for one batch's tokens and copy each clip's part into the buffer.

        Each array becomes numpy once a batch, and the clips' parts are numpy slices: this thread
        holds Python's lock between the copies, which the launching thread needs for every operator
        (a torch call per clip and array made it ~3x longer)."""
        t0 = time.perf_counter()
        arrived = tokens.wait()
        t1 = time.perf_counter()
        encoded = {key: (e.codes.numpy(), None if e.scale is None else e.scale.numpy(), e.peak.numpy())
                   for key, e in arrived.items()}
        for local, segments, part in places:
            for key, (codes, scale, peak) in encoded.items():
                if status[clip_ids[local]] != OK:
                    break
                try:
                    buffer.put_codes(key, local, segments, codes[part], None if scale is None else scale[part],
                                     float(peak[part].max()))
                except CacheError as err:
                    fail(local, f"{key}: {err}")
        with status_lock:  # summed over the put threads: busy time, not wall time
            t2 = time.perf_counter()
            timing["wait"] += t1 - t0
            timing["put"] += t2 - t1
            timing["end"] = max(timing["end"], t2)  # when the shard's last put ended

    def launch(ahead: int) -> None:
        """Launch staged batches, oldest first, until at most ``ahead`` are left (those already joined
        go too), and hand each to the put threads."""
        while staged and (len(staged) > ahead or staged[0][1].done()):
            modality, joined, places = staged.popleft()
            t0 = time.perf_counter()
            x = joined.result()
            t1 = time.perf_counter()
            putter.settle(putter.limit - 1)  # room for this batch
            t2 = time.perf_counter()
            tokens = forwards[modality].encoded(x, storage)
            puts.append(putter.submit(put, tokens, places))
            timing["stage"] += t1 - t0
            timing["backlog"] += t2 - t1
            timing["launch"] += time.perf_counter() - t2

    def flush(modality: str, final: bool = False) -> None:
        """Stage the whole batches queued for ``modality`` (with ``final``, the rest too): each is joined on a
        stage thread while this one launches the batches before it (:func:`launch`)."""
        p = pending[modality]
        queued = p.queued
        n = queued if final else queued - queued % batch_size
        pinned = forwards[modality].device.type == "cuda"
        for s in range(0, n, batch_size):
            size = min(batch_size, n - s)
            staged.append((modality, stager.submit(stage_inputs, p.take(size), pinned), p.place(size)))
            launch(STAGE_AHEAD)  # the bound holds within a clip's several batches too

    def fill() -> None:
        for local, fut in enumerate(decodes):
            if not fut.done():
                launch(0)  # about to wait for a decode: what is staged runs meanwhile
            t0 = time.perf_counter()
            try:
                decoded = fut.result()
            except MediaError as e:
                decoded = None
                fail(local, str(e))
            if decoded is not None and "masks" in meta.targets:
                try:
                    buffer.put_target("masks", local, read_masks(manifest.clips[rows[local]], data_root))
                except MediaError as e:
                    decoded = None
                    fail(local, str(e))
            timing["decode"] += time.perf_counter() - t0
            if decoded is not None:
                for modality in forwards:
                    if modality in decoded.errors:
                        fail(local, f"{modality} preprocessing: {decoded.errors[modality]}")
                        continue
                    x = decoded.inputs[modality]
                    if len(x) != meta.num_segments:
                        fail(local, f"{len(x)} {modality} segments decoded, the cache holds {meta.num_segments}")
                        continue
                    p = pending[modality]
                    p.inputs.append(x)
                    p.clips.append([local, len(x), 0])
                    if p.queued >= batch_size:
                        flush(modality)
            launch(STAGE_AHEAD)  # batches joined since
            if on_clip is not None:
                on_clip()
        for modality in forwards:
            flush(modality, final=True)
        launch(0)

    storage = buffer.dtype
    staged: deque[tuple[str, Future, list]] = deque()  # (modality, the joined batch, its places), oldest first
    with ThreadPoolExecutor(STAGE_THREADS, thread_name_prefix="stage") as stager:
        try:
            fill()
        except BaseException:  # nothing more of this shard is put (a running put finishes)
            for _, joined, _ in staged:
                joined.cancel()
            putter.discard(puts)
            raise
    launched = time.perf_counter()
    one_off = sum(fw.one_off_s for fw in forwards.values()) - one_off_before  # before the next shard's launches
    device = next(iter(forwards.values())).device if forwards else torch.device("cpu")

    def done() -> ShardStatus:
        """(After every put.) Zero the failed clips' rows; the shard's status."""
        for local, cid in enumerate(clip_ids):
            if status[cid] != OK:
                buffer.clear(local)
        extra = {"autocast": {m: fw.autocast for m, fw in forwards.items()}, "stage_s": timing["stage"],
                 "launch_s": timing["launch"], "wait_s": timing["wait"], "put_s": timing["put"],
                 "backlog_s": timing["backlog"], "one_off_s": one_off}
        # the shard's own span, launch to last put: not the wait for the writer thread, which finishes shards in turn
        return ShardStatus(shard, status, seconds=max(launched, timing["end"]) - t_start, decode_s=timing["decode"],
                           forward_s=timing["stage"] + timing["launch"] + timing["backlog"], device=str(device),
                           peak_memory=peak_memory(device), worker=f"{socket.gethostname()}:{os.getpid()}",
                           extra=extra)

    return ShardInFlight(buffer, puts, done)
