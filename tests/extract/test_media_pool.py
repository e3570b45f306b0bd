"""Decoding in worker processes gives what decoding in this process gives: media, errors, logs."""

import pickle
from dataclasses import replace

import numpy as np
import pytest

from mettle.extract.media import MediaError, read_clip
from mettle.extract.media.pool import DecodeWorkersError, MediaPool
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


def test_a_dead_worker_is_a_clean_error(toy_root):
    import os
    import signal

    clip = build_manifest("toy", data_root=str(toy_root), num_clips=12, frames=True).clips[0]
    with MediaPool(1).start() as pool:
        pid = next(iter(pool._pool._processes))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(DecodeWorkersError, match="decode worker processes stopped.*--decode-processes 0"):
            pool.read(clip, toy_root, "linspace")


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
