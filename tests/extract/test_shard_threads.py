"""The extractor's host threads around one shard (extract/shard.py): stage threads joining each batch's
inputs (extract/batches.py), and the put threads' shared backlog."""

import threading
import time

import torch

from mettle.extract import batches, shard
from mettle.extract.run import extract
from mettle.extract.tokens import TokenForward

import test_extract  # tests/ holds no packages: the module is found by its folder
from test_extract import _arrays, _cfg, _same

clean = test_extract.clean  # the reference cache (a fixture)


def test_batches_are_joined_on_stage_threads_while_earlier_ones_launch(clean, toy_root, tmp_path, monkeypatch):
    """Each batch's inputs (ends and starts of clips: 10 segments a clip, batches of 8) are joined on a stage
    thread, not the launching one. With every join held back 30 ms, some join runs while an earlier batch
    launches, and the cache equals the clean one."""
    events = []  # (what, thread name, start, end)
    join, encoded = shard.stage_inputs, TokenForward.encoded

    def slow_join(inputs, pinned):
        start = time.perf_counter()
        time.sleep(0.03)
        out = join(inputs, pinned)
        events.append(("join", threading.current_thread().name, start, time.perf_counter()))
        return out

    def watched(self, x, storage):
        start = time.perf_counter()
        out = encoded(self, x, storage)
        events.append(("launch", threading.current_thread().name, start, time.perf_counter()))
        return out

    monkeypatch.setattr(shard, "stage_inputs", slow_join)
    monkeypatch.setattr(TokenForward, "encoded", watched)
    summary = extract(_cfg(toy_root, tmp_path / "c", dtype="float32"), progress=False)
    assert summary.clips_ok == 12
    _same(_arrays(tmp_path / "c"), _arrays(clean))
    joins = [e for e in events if e[0] == "join"]
    launches = [e for e in events if e[0] == "launch"]
    assert len(joins) == len(launches) == 36  # 6 shards x 2 modalities x 3 batches (8 + 8 + 4 segments)
    assert all(e[1].startswith("stage") for e in joins) and not any(e[1].startswith("stage") for e in launches)
    assert any(j[2] < l[3] and l[2] < j[3] for j in joins for l in launches)  # a join during a launch


def test_joined_batches_keep_their_inputs_memory_layout():
    """``stage_inputs`` joins the ends and starts of clips as ``torch.cat`` would, keeping the frames'
    channels-last layout (a batch laid out otherwise runs other CPU kernels: its tokens would differ in the
    last bits from those of a batch of one clip) and the audio's contiguous one; one piece on a CPU is
    handed over as it is."""
    frames = [torch.randn(10, 3, 8, 8).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    audio = [torch.randn(10, 1, 16, 4) for _ in range(2)]
    for clips in (frames, audio):
        pieces = [clips[0][8:], clips[1][:6]]
        got, want = batches.stage_inputs(pieces, pinned=False), torch.cat(pieces)
        assert torch.equal(got, want) and got.stride() == want.stride(), (got.stride(), want.stride())
    bf16 = [x.bfloat16() for x in audio]  # a dtype numpy lacks: joined by torch
    bf = [bf16[0][8:], bf16[1][:6]]
    assert torch.equal(batches.stage_inputs(bf, pinned=False), torch.cat(bf))
    one = audio[0][:8]
    assert batches.stage_inputs([one], pinned=False) is one  # one clip's part, on a CPU: no copy


def test_a_failed_launchs_puts_are_cancelled_and_forgotten():
    """``Putter.discard``: puts of a launch that failed are cancelled and leave the shared backlog, so the
    next shard's settling neither waits for them nor meets their cancellation."""
    import threading

    from mettle.extract.shard import Putter

    gate = threading.Event()
    with Putter(threads=1, backlog=4) as putter:
        running = putter.submit(gate.wait)  # occupies the one thread
        queued = [putter.submit(lambda: None) for _ in range(2)]
        putter.discard(queued)
        assert all(f.cancelled() for f in queued) and list(putter.backlog) == [running]
        gate.set()
        putter.settle(0)
        assert not putter.backlog
