"""Decode clips' media in worker processes.

Why processes: PyAV does a clip's per-frame work (packet decode calls, resampling, array
conversion: some 400 audio frames and 80 video packets for a 10-s toy clip, ~40 ms) in Python
that holds the GIL. Measured on the toy clips, two decode threads were no faster than one, and
they stall the thread that drives the backbones, whose every operator call needs the GIL too.
Worker processes decode in parallel and leave the parent's GIL alone.

The uint8 frames and float32 audio of :class:`~.clip.ClipMedia` (a few MB a clip; ~8 MB for a real
AVE clip) cross in shared memory, not through the result pipe: receiving a pickled result holds
the parent's GIL while it reads the pipe 64 KiB at a time and unpickles (py-spy, 8.2 MB clips:
6.7 ms of the parent's GIL a clip pickled, 1.6 ms through shared memory; BENCHMARKS.md). The worker writes each array into a new segment and returns its name; the
parent copies it out and unlinks it at once. Where no segment can be made (/dev/shm full, say),
the arrays are pickled as before. Segments the parent never receives (clips in flight when the run
stops on an error, Ctrl-C or a killed parent, or when a dying worker breaks the pool) are unlinked
by multiprocessing's resource tracker, which the parent and its spawned workers share, when the
last of them exits (it warns of "leaked shared_memory objects" then); only killing the whole
process group at once (the tracker with it) can leave them in /dev/shm.

Workers are spawned, not forked (a forked child of a process that has run torch's OpenMP pool can
hang), import no torch and ignore Ctrl-C (the parent handles it). A worker's log records (a short
sound track, a skipped packet) are sent back with the media or the error and re-emitted in the
parent, where logging is configured.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from mettle.manifests import Clip

from .clip import ClipMedia, read_clip
from .errors import MediaError

_records: list[tuple[str, int, str]] = []  # in a worker: (logger, level, message) since the last clip


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _records.append((record.name, record.levelno, record.getMessage()))


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it shuts the pool down
    root = logging.getLogger("mettle")
    root.handlers[:] = [_Collect()]
    root.setLevel(logging.DEBUG)
    root.propagate = False


SHARED_MIN_BYTES = 1 << 16  # smaller arrays are pickled: a segment costs a few system calls


@dataclasses.dataclass(frozen=True)
class _Shared:
    """An array left in a shared-memory segment by a worker: what the parent needs to copy it out."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def _share(a: np.ndarray) -> np.ndarray | _Shared:
    """(In a worker.) ``a`` written into a new shared-memory segment, or ``a`` itself when it is small,
    holds Python objects, or no segment can be made. The segment outlives this call: the parent
    unlinks it (and the resource tracker, which parent and spawned workers share, does when the run
    ends if the parent never receives it)."""
    if a.nbytes < SHARED_MIN_BYTES or a.dtype.hasobject:
        return a
    try:
        shm = shared_memory.SharedMemory(create=True, size=a.nbytes)
    except OSError as e:
        logging.getLogger(__name__).debug("no shared memory for %d bytes (%s): pickling them", a.nbytes, e)
        return a
    try:
        fd = getattr(shm, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            # claim the pages now: writing to a segment that a full /dev/shm cannot back (a container's
            # 64 MB default) kills the process with SIGBUS, where this raises ENOSPC
            try:
                os.posix_fallocate(fd, 0, a.nbytes)
            except OSError as e:
                shm.unlink()
                logging.getLogger(__name__).debug("/dev/shm cannot hold %d bytes (%s): pickling them", a.nbytes, e)
                return a
        np.ndarray(a.shape, a.dtype, buffer=shm.buf)[...] = a  # no view left to dangle once the segment closes
        return _Shared(shm.name, a.shape, a.dtype)
    except BaseException:
        shm.unlink()
        raise
    finally:
        shm.close()


def _unshare(x: np.ndarray | _Shared) -> np.ndarray:
    """(In the parent.) The array a worker left in shared memory, as a private copy; the segment is
    unlinked as soon as it is open (its mapping stays valid), so nothing after can leave it behind.
    Plain arrays pass through."""
    if not isinstance(x, _Shared):
        return x
    shm = shared_memory.SharedMemory(name=x.name)
    try:
        shm.unlink()
        return np.ndarray(x.shape, x.dtype, buffer=shm.buf).copy()  # numpy copies without the GIL; no view survives
    finally:
        shm.close()


def _drop(x: np.ndarray | _Shared) -> None:
    """Unlink a segment that will not be read (a failure on the way); anything else: nothing to do."""
    if isinstance(x, _Shared):
        try:
            shm = shared_memory.SharedMemory(name=x.name)
        except OSError:
            return
        shm.close()
        shm.unlink()


def _receive(media: ClipMedia, clip: Clip, data_root: Path) -> ClipMedia:
    """(In the parent.) ``media`` with its shared arrays copied out; every segment is unlinked, also
    when one of them cannot be read (a MediaError naming the clip: the run's --on-error applies)."""
    arrays = {"frames": media.frames, "audio": media.audio}
    out: dict[str, np.ndarray] = {}
    for name, x in arrays.items():
        try:
            out[name] = _unshare(x)
        except BaseException as e:
            for rest in list(arrays.values())[len(out) + 1:]:
                _drop(rest)
            if isinstance(e, OSError):
                raise MediaError(clip.clip_id, data_root, f"its decoded {name} could not be received from the "
                                 f"decode worker ({e})", "rerun; if it recurs, pass --decode-processes 0") from None
            raise
    return dataclasses.replace(media, **out)


def _read(clip: Clip, data_root: Path, frame_rule: str
          ) -> tuple[ClipMedia | None, MediaError | None, list[tuple[str, int, str]]]:
    """(media, None, log records) or (None, the clip's MediaError, log records): the records come back
    either way, since what was logged before an error helps to read it. The media's arrays come as
    :class:`_Shared` where they could be put in shared memory."""
    _records.clear()
    try:
        media = read_clip(clip, data_root, frame_rule)
        frames = _share(media.frames)
        try:
            audio = _share(media.audio)
        except BaseException:
            _drop(frames)
            raise
        return dataclasses.replace(media, frames=frames, audio=audio), None, list(_records)
    except MediaError as e:
        return None, e, list(_records)
    finally:
        _records.clear()


def _ready() -> int:
    import importlib
    import time

    importlib.import_module("av")  # most of a worker's start-up: paid before the first clip
    time.sleep(0.05)  # long enough that the start-up tasks spread over all the workers
    return os.getpid()


def default_processes() -> int:
    """One decode process per CPU this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


class DecodeWorkersError(RuntimeError):
    """The decode worker processes could not start; the message says what to do."""


_BROKEN = ("the decode worker processes stopped ({}). Fix: when a script calls extract(), put the call under "
           "`if __name__ == \"__main__\":` (spawned workers import the main script); if they ran out of memory, "
           "pass fewer --decode-processes; --decode-processes 0 decodes in threads instead")


class MediaPool:
    """``processes`` spawned workers running :func:`~.clip.read_clip`; use as a context manager.

    ``read(clip, data_root, frame_rule)`` blocks until that clip is decoded and returns its
    :class:`ClipMedia` (or raises its :class:`~.errors.MediaError`); call it from as many threads as
    there are processes to keep them all busy.

    A worker that dies while decoding (FFmpeg crashing on a damaged file) takes the clips then in
    flight with it: the pool is replaced, and each of those clips is decoded again alone in a fresh
    process, so that only the clip that crashes its decoder twice fails, with a MediaError naming
    it (``--on-error skip`` records it and goes on).
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"--decode-processes {processes} must be >= 1 (0 decodes in threads instead)")
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = self._new(processes)

    @staticmethod
    def _new(processes: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)

    def __enter__(self) -> MediaPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> MediaPool:
        """Start every worker now and wait until each has imported PyAV (otherwise the first clips pay it)."""
        pids: set[int] = set()
        try:
            for _ in range(8):  # the executor starts workers as tasks find none idle: ask until all have answered
                pids.update(f.result() for f in [self._pool.submit(_ready) for _ in range(2 * self.processes)])
                if len(pids) >= self.processes:
                    break
        except BrokenProcessPool as e:
            self.close()
            raise DecodeWorkersError(_BROKEN.format(e)) from None
        except BaseException:
            self.close()
            raise
        return self

    def read(self, clip: Clip, data_root: Path, frame_rule: str) -> ClipMedia:
        pool = self._pool
        try:
            media, error, records = pool.submit(_read, clip, data_root, frame_rule).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # the first thread to see it replaces the pool
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new(self.processes)
            media, error, records = self._read_alone(clip, data_root, frame_rule)
        for name, level, message in records:
            logging.getLogger(name).log(level, "%s", message)
        if error is not None:
            raise error
        return _receive(media, clip, data_root)

    @staticmethod
    def _read_alone(clip: Clip, data_root: Path, frame_rule: str):
        alone = MediaPool._new(1)
        try:
            return alone.submit(_read, clip, data_root, frame_rule).result()
        except BrokenProcessPool:
            error = MediaError(clip.clip_id, data_root, "the media decoder crashed on this clip (its process died, "
                               "twice)", "re-encode or re-download the clip's media; --on-error skip leaves it out")
            return None, error, []
        finally:
            alone.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
