"""Decoding in worker processes gives what decoding in this process gives: media, errors, logs."""

import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mettle.extract.media import MediaError, read_clip
from mettle.extract.media.pool import MediaPool
from mettle.manifests import build_manifest


def test_media_error_survives_pickling():
    e = MediaError("clip7", "/data/x.mp4", "cannot open (bad header)", "re-download it")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is MediaError and str(back) == str(e)
    assert (back.clip_id, back.path, back.reason, back.fix) == (e.clip_id, e.path, e.reason, e.fix)


def test_worker_processes_decode_what_this_process_decodes(toy_root, tmp_path):
    clips = build_manifest("toy", data_root=str(toy_root), num_clips=12, frames=True).clips
    missing = replace(clips[1], media={"video": "nowhere/x"})
    with MediaPool(2).start() as pool:
        assert pool.processes == 2
        for clip in clips[:3]:
            here, there = read_clip(clip, toy_root), pool.read(clip, toy_root, "linspace")
            assert np.array_equal(here.frames, there.frames) and np.array_equal(here.audio, there.audio)
            assert here.sources == there.sources and here.padded_samples == there.padded_samples
        with pytest.raises(MediaError, match=f"clip {missing.clip_id}: .*no frames folder or video found") as err:
            pool.read(missing, toy_root, "linspace")
        assert err.value.clip_id == missing.clip_id


def _ours() -> set:
    """This machine's shared-memory segments of the kind multiprocessing makes (others may come and go)."""
    shm_dir = Path("/dev/shm")
    if not shm_dir.is_dir():
        pytest.skip("no /dev/shm to look into")
    return {p.name for p in shm_dir.glob("psm_*")}


def test_media_cross_in_shared_memory_and_leave_no_segment(toy_root, monkeypatch):
    """The frames and audio come through shared-memory segments, which the parent unlinks; when none
    can be made, they are pickled as before."""
    from mettle.extract.media import pool as pool_module

    _ours()
    arrived = []
    unshare = pool_module._unshare
    monkeypatch.setattr(pool_module, "_unshare", lambda x: arrived.append(x) or unshare(x))
    clips = build_manifest("toy", data_root=str(toy_root), num_clips=12, frames=True).clips[:4]
    with MediaPool(2).start() as pool:
        for clip in clips:
            here, there = read_clip(clip, toy_root), pool.read(clip, toy_root, "linspace")
            assert np.array_equal(here.frames, there.frames) and np.array_equal(here.audio, there.audio)
            assert (here.frames.dtype, here.audio.dtype) == (there.frames.dtype, there.audio.dtype)
            assert there.frames.flags.owndata and there.audio.flags.owndata  # private copies, not views
    assert [type(x).__name__ for x in arrived] == ["_Shared"] * 8  # frames and audio of 4 clips, none pickled
    assert not {x.name for x in arrived} & _ours()  # every segment unlinked
    a = np.arange(1 << 15, dtype=np.float32)  # 128 KiB: shared
    shared = pool_module._share(a)
    assert isinstance(shared, pool_module._Shared) and shared.name in _ours()
    assert np.array_equal(unshare(shared), a) and shared.name not in _ours()
    small = a[:100]
    assert pool_module._share(small) is small


def test_shared_memory_failures_leave_no_segment(toy_root, monkeypatch):
    """A /dev/shm that cannot hold the pages pickles instead; a segment the parent cannot read is a
    MediaError naming the clip, and the clip's other segment is unlinked all the same."""
    from multiprocessing import shared_memory

    from mettle.extract.media import pool as pool_module

    before = _ours()
    a = np.arange(1 << 15, dtype=np.float32)
    clip = build_manifest("toy", data_root=str(toy_root), num_clips=12, frames=True).clips[0]
    media = read_clip(clip, toy_root)
    gone = pool_module._Shared("psm_mettle_test_gone", media.frames.shape, media.frames.dtype)
    audio = pool_module._share(media.audio)
    with pytest.raises(MediaError, match=f"clip {clip.clip_id}: .*could not be received .*--decode-processes 0"):
        pool_module._receive(replace(media, frames=gone, audio=audio), clip, toy_root)
    assert audio.name not in _ours()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)  # /dev/shm too small for the pages (no SIGBUS later)
    assert pool_module._share(a) is a  # pickled instead, and the segment made is gone
    assert _ours() - before == set()
    monkeypatch.setattr(shared_memory, "SharedMemory", full)  # no segment at all
    assert pool_module._share(a) is a


def test_a_worker_killed_mid_clip_costs_nothing(toy_root):
    import os
    import signal

    clip = build_manifest("toy", data_root=str(toy_root), num_clips=12, frames=True).clips[0]
    with MediaPool(1).start() as pool:
        os.kill(next(iter(pool._pool._processes)), signal.SIGKILL)
        media = pool.read(clip, toy_root, "linspace")  # the pool is replaced, the clip decoded again alone
        assert np.array_equal(media.frames, read_clip(clip, toy_root).frames)
        assert np.array_equal(pool.read(clip, toy_root, "linspace").audio, media.audio)  # the new pool works


class _Broken:
    """An executor whose every task dies with its process, as when FFmpeg crashes on a file."""

    def submit(self, *args):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        f = Future()
        f.set_exception(BrokenProcessPool("a process died"))
        return f

    def shutdown(self, **kw):
        pass


def test_a_clip_that_crashes_its_decoder_twice_is_a_media_error(toy_root, monkeypatch):
    clip = build_manifest("toy", data_root=str(toy_root), num_clips=12, frames=True).clips[2]
    with MediaPool(1) as pool:
        monkeypatch.setattr(pool, "_pool", _Broken())
        media = pool.read(clip, toy_root, "linspace")  # crashed once (with the pool), fine alone
        assert np.array_equal(media.audio, read_clip(clip, toy_root).audio)
        monkeypatch.setattr(pool, "_pool", _Broken())
        monkeypatch.setattr(MediaPool, "_new", staticmethod(lambda n: _Broken()))
        with pytest.raises(MediaError, match=f"clip {clip.clip_id}: .*decoder crashed on this clip.*--on-error skip"):
            pool.read(clip, toy_root, "linspace")


def test_a_worker_hands_a_clip_error_back_with_its_records(toy_root):
    """The worker's function returns a clip's MediaError (the parent re-emits the clip's log records,
    then raises it) instead of raising it, which would lose what was logged before it."""
    from mettle.extract.media import pool as pool_module

    clip = build_manifest("toy", data_root=str(toy_root), num_clips=12, frames=True).clips[0]
    media, error, records = pool_module._read(clip, toy_root, "linspace")
    assert media is not None and error is None and records == []
    media = pool_module._receive(media, clip, toy_root)  # unlinks the segments _read made here
    assert np.array_equal(media.audio, read_clip(clip, toy_root).audio)
    got, error, records = pool_module._read(replace(clip, media={"video": "nowhere/x"}), toy_root, "linspace")
    assert got is None and isinstance(error, MediaError) and error.clip_id == clip.clip_id and records == []


def test_workers_that_cannot_start_are_a_clean_error(monkeypatch):
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor

    from mettle.extract.media.pool import DecodeWorkersError

    def dying(n):  # as when the workers fail to import the main script
        return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=sys.exit,
                                   initargs=(3,))
    monkeypatch.setattr(MediaPool, "_new", staticmethod(dying))
    with pytest.raises(DecodeWorkersError, match="decode worker processes stopped.*__main__.*--decode-processes 0"):
        MediaPool(1).start()


def test_refuses_zero_processes():
    with pytest.raises(ValueError, match="--decode-processes 0 .*threads"):
        MediaPool(0)


def test_decode_processes_default_by_device(monkeypatch):
    from mettle.extract.config import ExtractConfig, decode_processes_of
    from mettle.extract.media import pool

    import os

    assert pool.default_processes() == min(8, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(pool, "default_processes", lambda: 6)
    cfg = ExtractConfig(dataset="toy", cache="-")
    assert decode_processes_of(cfg, "cuda") == 6 and decode_processes_of(cfg, "cpu") == 0
    cfg.decode_processes = 3
    assert decode_processes_of(cfg, "cpu") == 3 == decode_processes_of(cfg, "cuda")
    cfg.decode_processes = -1
    with pytest.raises(ValueError, match="--decode-processes -1"):
        decode_processes_of(cfg, "cpu")
