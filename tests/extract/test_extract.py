"""mettle-extract end to end on the toy dataset with the tiny backbones: content, resumability,
dask workers, both storages, bad clips and the command line."""

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mettle.cache import CacheError, open_cache
from mettle.extract.cli import main as extract_cli
from mettle.extract.config import ExtractConfig, load_backbones
from mettle.extract.media import read_clip
from mettle.extract.run import extract
from mettle.extract.shard import ExtractError
from mettle.extract.tokens import TokenForward


def _cfg(toy_root, cache, **kw):
    base = dict(dataset="toy", cache=str(cache), data_root=str(toy_root), manifest_options={"num_clips": 12, "frames": True},
                backbones="tiny", shard_clips=2, batch_size=8, device="cpu")
    base.update(kw)
    return ExtractConfig(**base)


def _arrays(path):
    cache = open_cache(path)
    return {k: cache.read(k, slice(None)) for k in cache.keys()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def clean(toy_root, tmp_path_factory):
    """One uninterrupted single-process float32 extraction (media decoded by 2 worker processes), the
    reference for the others."""
    path = tmp_path_factory.mktemp("clean") / "cache"
    summary = extract(_cfg(toy_root, path, dtype="float32", decode_processes=2), progress=False)
    assert summary.clips_ok == 12 and not summary.failures
    return path


def test_cached_tokens_are_the_backbone_tokens(clean, toy_root):
    cache = open_cache(clean)
    assert cache.meta.dataset == "toy" and cache.meta.num_segments == 10 and cache.meta.shard_clips == 2
    assert {m: b.name for m, b in cache.meta.backbones.items()} == {"visual": "test_swinv2_tiny",
                                                                    "audio": "test_htsat_tiny"}
    backbones = load_backbones(_cfg(toy_root, clean))
    for row in (4, 5):  # batches of 8 segments: each of a shard's two clips spans two forward batches
        media = read_clip(cache.manifest.clips[row], toy_root, cache.manifest.frame_rule)
        for modality, b in backbones.items():
            fw = TokenForward(b, [a for a in cache.meta.arrays if a.modality == modality], torch.device("cpu"))
            live = fw(b.preprocess(media.frames if modality == "visual" else media.audio))
            for key, tokens in live.items():
                np.testing.assert_allclose(cache.read(key, [row])[0], tokens.numpy(), rtol=1e-5, atol=1e-5)
    last = cache.meta.array("visual/stage3.block0")
    assert last.grid == last.source_grid == (6, 6)
    assert cache.meta.array("audio/stage0.block0").grid == (8, 8)
    assert cache.done["profile"]["clips_per_second"] > 0


def test_blocks_of_one_shape_run_as_a_group_with_their_own_tokens(clean, toy_root):
    """TokenForward pools and encodes the blocks of one shape as one tensor (fewer operators for the
    host to issue); each block's tokens are still exactly its own forward output pooled alone."""
    from mettle.cache import pool_tokens
    from mettle.cache.dtypes import encode_tensor, get_dtype

    cache = open_cache(clean)
    media = read_clip(cache.manifest.clips[0], toy_root, cache.manifest.frame_rule)
    for modality, b in load_backbones(_cfg(toy_root, clean)).items():
        arrays = [a for a in cache.meta.arrays if a.modality == modality]
        fw = TokenForward(b, arrays, torch.device("cpu"), "float32")
        assert any(len(g) > 1 for g in fw.groups), modality
        x = b.preprocess(media.frames if modality == "visual" else media.audio)
        got = fw(x)
        with torch.no_grad():
            outs = b.forward_tokens(x, [a.block_index for a in arrays])
        float16 = get_dtype("float16")
        encoded = fw.encoded(x, float16).wait()
        for a, t in zip(arrays, outs):
            want = pool_tokens(t.float(), a.source_grid, a.grid) if a.pooled else t
            assert torch.equal(got[a.key], want), a.key
            assert torch.equal(encoded[a.key].codes, encode_tensor(want, float16).codes), a.key


@pytest.mark.slow
def test_killed_extraction_resumes_to_the_same_cache(clean, toy_root, tmp_path, monkeypatch):
    path = tmp_path / "cache"
    args = ["--dataset", "toy", "--data-root", str(toy_root), "--cache", str(path), "--set", "num_clips=12",
            "--set", "frames=true", "--backbones", "tiny", "--shard-clips", "2", "--batch-size", "8", "--device", "cpu", "--dtype",
            "float32", "-q"]
    proc = subprocess.Popen([sys.executable, "-c", "from mettle.extract.cli import main; main()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, status = time.time() + 120, path / "status"
    while time.time() < deadline and proc.poll() is None:
        if status.is_dir() and any(status.glob("*.json")):
            break  # the first shard is written: kill the run in the middle of the next ones
        time.sleep(0.005)
    assert proc.poll() is None, "the extraction ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((path / "status").glob("*.json")))
    assert 1 <= done_before < 6 and not (path / "done.json").exists()
    summary = extract(_cfg(toy_root, path, dtype="float32"), progress=False)
    assert summary.shards_skipped == done_before and summary.shards_done_now == 6 - done_before
    _same(_arrays(path), _arrays(clean))
    with monkeypatch.context() as m:  # a rerun with nothing left to do never moves a model to a device
        m.setattr("mettle.extract.run.TokenForward", None)
        again = extract(_cfg(toy_root, path, dtype="float32"), progress=False)
    assert again.shards_done_now == 0 and again.shards_skipped == 6


@pytest.mark.slow
def test_two_dask_workers_equal_one_process(clean, toy_root, tmp_path):
    summary = extract(_cfg(toy_root, tmp_path / "cache", dtype="float32", workers=2), progress=False)
    assert summary.clips_ok == 12 and summary.profile["workers"] == 2
    _same(_arrays(tmp_path / "cache"), _arrays(clean))


def test_hdf5_storage_holds_the_same_tokens(clean, toy_root, tmp_path):  # and media decoded in threads
    extract(_cfg(toy_root, tmp_path / "h5", dtype="float32", format="hdf5", decode_processes=0), progress=False)
    assert (tmp_path / "h5" / "tokens.h5").is_file() and len(list((tmp_path / "h5" / "shards").glob("*.h5"))) == 6
    _same(_arrays(tmp_path / "h5"), _arrays(clean))


def _break_clip(toy_root, tmp_path, row):
    """A copy of the toy dataset with the media of clip ``row`` gone; returns (root, clip id)."""
    from mettle.manifests import build_manifest

    root = tmp_path / "toy"
    shutil.copytree(toy_root, root)
    clip = build_manifest("toy", data_root=str(root), num_clips=12, frames=True).clips[row]
    shutil.rmtree(root / clip.media["frames"])
    for f in root.glob(clip.media["video"] + ".*"):
        f.unlink()
    return root, clip.clip_id


@pytest.fixture
def broken_toy(toy_root, tmp_path):
    """The toy dataset with one clip's media gone (row 3)."""
    return _break_clip(toy_root, tmp_path, 3)


def test_recycled_shard_buffers_hold_no_stale_rows(clean, toy_root, tmp_path):
    """Shards are filled into the buffers of shards already written: every row is overwritten, and a
    failed clip's rows are zero, not the tokens of the shard the buffer held before."""
    root, bad = _break_clip(toy_root, tmp_path, 4)  # shard 2: the first to refill shard 0's buffer
    summary = extract(_cfg(root, tmp_path / "c", dtype="float32", on_error="skip"), progress=False)
    assert list(summary.failures) == [bad]
    got, want = _arrays(tmp_path / "c"), _arrays(clean)
    for key in want:
        assert not got[key][4].any() and want[key][4].any(), key
        want[key][4] = 0
    _same(got, want)


def test_bad_clip_fail_or_skip(broken_toy, tmp_path):
    root, bad = broken_toy
    with pytest.raises(ExtractError, match=f"clip {bad} .*--on-error skip"):
        extract(_cfg(root, tmp_path / "fail"), progress=False)
    assert open_cache(tmp_path / "fail", allow_incomplete=True).clip_status[0] == "ok"  # shard 0 was kept
    summary = extract(_cfg(root, tmp_path / "skip", on_error="skip"), progress=False)
    assert list(summary.failures) == [bad] and "no frames folder or video" in summary.failures[bad]
    cache = open_cache(tmp_path / "skip")
    assert 3 not in cache.rows(None) and len(cache.rows(None)) == 11
    assert not cache.read("audio/stage0.block0", [3]).any()  # a failed clip's rows stay zero
    assert 3 not in cache.dataset(None).rows
    from mettle.train.config import resolve_config
    from mettle.train.loop import fit

    cfg = resolve_config("ave", {"hidden": 16, "temporal": "none", "dropout": 0.0}, device="cpu",
                         sets={"lcd.dim": 16, "lcd.heads": 2, "lcd.meta_tokens": 2, "optim.epochs": 1})
    res = fit(cfg, cache, progress=False)  # trains on the rest and says how many were left out
    split = cache.manifest.clips[3].splits[0]
    assert res.left_out[split] == 1 and sum(res.left_out.values()) == 1


def test_tokens_refused_in_the_put_thread_fail_or_skip(clean, toy_root, tmp_path, monkeypatch):
    """Tokens are checked as the put thread copies them into the shard buffer: a clip whose tokens are
    not finite stops the run (fail: the error reaches the caller, naming clip and array) or is recorded
    and zeroed (skip), and the clip that shared its forward batches keeps its own tokens."""
    import mettle.extract.shard as shard_mod

    real, bad = shard_mod._decode, None

    def poisoned(clip, *args):
        decoded = real(clip, *args)
        if clip.clip_id == bad:  # row 5: its 10 segments share batches of 8 with row 4
            decoded.inputs["audio"] = torch.full_like(decoded.inputs["audio"], float("nan"))
        return decoded

    bad = open_cache(clean).manifest.clips[5].clip_id
    monkeypatch.setattr(shard_mod, "_decode", poisoned)
    with pytest.raises(ExtractError, match=f"clip {bad} \\(row 5\\): audio/.*NaN or inf"):
        extract(_cfg(toy_root, tmp_path / "fail", dtype="float32"), progress=False)
    summary = extract(_cfg(toy_root, tmp_path / "skip", dtype="float32", on_error="skip"), progress=False)
    assert list(summary.failures) == [bad] and "NaN or inf" in summary.failures[bad]
    got, want = _arrays(tmp_path / "skip"), _arrays(clean)
    for key in want:
        assert not got[key][5].any() and want[key][5].any(), key
        want[key][5] = 0
    _same(got, want)


def test_resume_refuses_another_backbone(clean, toy_root, tmp_path):
    from mettle.extract.media import DECODING

    assert open_cache(clean).meta.media == DECODING  # the decoding rules travel with the tokens
    path = tmp_path / "c"
    shutil.copytree(clean, path)
    with pytest.raises(CacheError, match="audio backbone name: cache has test_htsat_tiny.*--overwrite"):
        extract(_cfg(toy_root, path, dtype="float32", backbones="tiny-shared"), progress=False)
    # a rerun without --shard-clips takes the cache's shard size (2 here) instead of being refused for 64
    summary = extract(_cfg(toy_root, path, dtype="float32", shard_clips=None), progress=False)
    assert summary.shards_done_now == 0 and summary.shards_skipped == open_cache(path).meta.num_shards == 6


def test_a_finished_cache_of_other_decoding_rules_is_read_not_added_to(clean, toy_root, tmp_path, caplog):
    """A cache finished before its decoding rules were recorded: rerunning its command keeps it as it is
    (with a warning), and writing any shard into it (--retry-failed here) is refused, not mixed."""
    import json

    path = tmp_path / "c"
    shutil.copytree(clean, path)
    meta = json.loads((path / "cache.json").read_text())
    meta.pop("media")
    (path / "cache.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        summary = extract(_cfg(toy_root, path, dtype="float32"), progress=False)
    assert summary.shards_done_now == 0 and "finished under other media decoding rules" in caplog.text
    status = json.loads((path / "status" / "shard-00000.json").read_text())
    status["clips"][next(iter(status["clips"]))] = "decode failed"
    (path / "status" / "shard-00000.json").write_text(json.dumps(status))
    with pytest.raises(CacheError, match="other media decoding rules; writing 1 shards into it now would mix"):
        extract(_cfg(toy_root, path, dtype="float32", retry_failed=True), progress=False)


def test_dask_task_keys_differ_between_caches_of_one_slug(clean, tmp_path):
    """Two extractions on one --scheduler with the same slug (dataset.preset.tokens.dtype) but another
    folder or other backbones must not share tasks: dask runs one task per key."""
    import dataclasses

    from mettle.cache import CacheWriter
    from mettle.extract.distributed import task_key

    meta = open_cache(clean).meta
    other = dataclasses.replace(meta, backbones={**meta.backbones, "audio": dataclasses.replace(
        meta.backbones["audio"], name="another_htsat")})
    assert other.slug == meta.slug
    keys = {task_key(CacheWriter(clean, meta), 0), task_key(CacheWriter(tmp_path / "elsewhere", meta), 0),
            task_key(CacheWriter(clean, other), 0), task_key(CacheWriter(clean, meta), 1)}
    assert len(keys) == 4 and all(k.startswith(f"mettle-extract-{meta.slug}-") for k in keys)
    assert task_key(CacheWriter(clean, meta), 0) == task_key(CacheWriter(clean / ".." / clean.name, meta), 0)


def test_cli_info_limit_and_errors(clean, toy_root, tmp_path):
    runner = CliRunner()
    r = runner.invoke(extract_cli, ["--info", str(clean)])
    assert r.exit_code == 0 and "ok 12, failed 0" in r.output and "visual/stage0.block0" in r.output
    args = ["--dataset", "toy", "--data-root", str(toy_root), "--cache", str(tmp_path / "c"), "--set",
            "num_clips=12", "--set", "frames=true", "--backbones", "tiny", "--limit", "3", "--tokens", "grid2", "--dtype", "int8", "-q"]
    r = runner.invoke(extract_cli, args)
    assert r.exit_code == 0, r.output
    cache = open_cache(tmp_path / "c")
    assert len(cache.manifest) == 3 and cache.meta.tokens == "grid2" and cache.meta.dtype == "int8"
    assert cache.meta.array("visual/stage0.block0").grid == (2, 2)
    for bad, message in [(["--backbones", "huge"], "--backbones 'huge' is not understood"),
                         (["--backbones", "visual=test_swinv2_tiny"], "leaves out the audio backbone"),
                         (["--tokens", "most"], "unknown token budget 'most'"),
                         (["--set", "colour=red"], "has no option 'colour'"),
                         (["--visual-weights", str(tmp_path / "none.pth")], "no such file")]:
        r = runner.invoke(extract_cli, args[:4] + args[6:12] + ["--cache", str(tmp_path / "x")] + bad)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (bad, r.output)
    r = runner.invoke(extract_cli, ["--cache", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--dataset is required" in r.output
    for bad, message in [(["--workers", "-1"], "workers=-1 must be at least 0"),  # hung on a cluster of none
                         (["--decode-threads", "0"], "decode_threads=0 must be at least 1"),
                         (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler and --workers"),
                         (["--set", f"data_root={tmp_path}"], "differ: the manifest would come from one folder")]:
        r = runner.invoke(extract_cli, args[:4] + args[6:12] + ["--cache", str(tmp_path / "x")] + bad)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (bad, r.output)
    # YAML values are typed: a quoted "false" is false (it deleted a finished cache), junk is named
    done = (tmp_path / "c" / "done.json").read_text()
    yaml_args = args + ["--config"]
    (tmp_path / "keep.yaml").write_text('overwrite: "false"\nlimit: "3"\n')
    r = runner.invoke(extract_cli, yaml_args + [str(tmp_path / "keep.yaml")])
    assert r.exit_code == 0 and (tmp_path / "c" / "done.json").read_text() == done, r.output
    for text, message in [("limit: six", "limit='six' is not a whole number"),
                          ("shard_clips: 2.5", "shard_clips=2.5 is not a whole number"),
                          ("backbones: [tiny]", "backbones=['tiny'] is not a string"),
                          ("random_init: perhaps", "random_init='perhaps' is not a boolean")]:
        (tmp_path / "bad.yaml").write_text(text + "\n")
        r = runner.invoke(extract_cli, yaml_args + [str(tmp_path / "bad.yaml")])
        assert r.exit_code == 2 and message in r.output and "Fix: " in r.output, (text, r.output)


@pytest.mark.slow
def test_full_size_random_init_backbones_on_cpu(toy_root, tmp_path):
    """The real architectures (random weights): 24 + 12 blocks, last-grid 6x6 and 8x8, about 18.6 MB per clip."""
    cfg = _cfg(toy_root, tmp_path / "c", backbones="specific", random_init=True, limit=1, shard_clips=None)
    summary = extract(cfg, progress=False)
    cache = open_cache(tmp_path / "c")
    assert summary.clips_ok == 1 and len(cache.keys("visual")) == 24 and len(cache.keys("audio")) == 12
    assert {cache.meta.array(k).grid for k in cache.keys("visual")} == {(6, 6)}
    assert {cache.meta.array(k).grid for k in cache.keys("audio")} == {(8, 8)}
    assert cache.meta.backbones["visual"].weights_id == "random-init"
    assert 18.0e6 < cache.meta.bytes_per_clip() < 19.0e6
    x = cache.read("visual/stage2.block17", [0])
    assert x.shape == (1, 10, 36, 768) and np.isfinite(x).all() and x.std() > 0


@pytest.mark.slow
def test_a_dask_worker_dying_mid_shard_loses_only_that_shard(clean, toy_root, tmp_path, monkeypatch):
    flag = tmp_path / "killed-once"
    monkeypatch.setenv("METTLE_FAULT_KILL_SHARD", f"2:{flag}")  # the worker writing shard 2 dies half-way
    summary = extract(_cfg(toy_root, tmp_path / "cache", dtype="float32", workers=2), progress=False)
    assert flag.exists() and summary.clips_ok == 12
    _same(_arrays(tmp_path / "cache"), _arrays(clean))


def test_a_write_failure_is_reported_and_resumable(clean, toy_root, tmp_path, monkeypatch):
    import errno

    from mettle.cache.store import ZarrStore

    real = ZarrStore.write_shard

    def disk_full_on_shard_3(self, shard, arrays):
        if shard == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, shard, arrays)

    monkeypatch.setattr(ZarrStore, "write_shard", disk_full_on_shard_3)
    with pytest.raises(CacheError, match="could not write shard 3 .*No space left on device.*rerun"):
        extract(_cfg(toy_root, tmp_path / "cache", dtype="float32"), progress=False)
    monkeypatch.undo()
    partial = open_cache(tmp_path / "cache", allow_incomplete=True)
    assert partial.clip_status[:6] == ["ok"] * 6 and "not extracted yet" in partial.clip_status[6]
    summary = extract(_cfg(toy_root, tmp_path / "cache", dtype="float32"), progress=False)
    assert summary.shards_skipped == 3 and summary.shards_done_now == 3
    _same(_arrays(tmp_path / "cache"), _arrays(clean))


def test_cuda_graphs_without_a_gpu_warn_and_run_eagerly(clean, toy_root, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        summary = extract(_cfg(toy_root, tmp_path / "c", dtype="float32", cuda_graphs=True, limit=4), progress=False)
    assert summary.clips_ok == 4 and "--cuda-graphs: the backbones run on cpu" in caplog.text
    got, want = _arrays(tmp_path / "c"), _arrays(clean)
    for key in want:
        assert np.array_equal(got[key], want[key][:4]), key


def test_the_precision_check_is_counted_as_one_off_work(clean, toy_root):
    """``TokenForward.one_off_s`` (extraction profiles report it) counts the float16-against-float32
    check of the first batch, once; forced on the CPU here (on CUDA it is the default)."""
    cache = open_cache(clean)
    assert cache.done["profile"]["one_off_s"] == 0.0  # CPU extraction: float32, nothing to check
    b = load_backbones(_cfg(toy_root, clean))["visual"]
    fw = TokenForward(b, [a for a in cache.meta.arrays if a.modality == "visual"], torch.device("cpu"),
                      precision="float16")
    fw._check_autocast = True  # what precision="auto" sets on CUDA
    x = b.preprocess(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    fw(x)
    first = fw.one_off_s
    assert first > 0 and fw.autocast_error is not None
    fw(x)
    assert fw.one_off_s == first


@pytest.mark.parametrize("setting,device,want", [("auto", "cuda", True), ("auto", "cpu", False), (False, "cuda", False),
                                                 ("false", "cuda", False), (True, "cuda", True), ("true", "cpu", False)])
def test_cuda_graphs_setting_is_on_for_cuda_by_default(setting, device, want):
    from mettle.extract.config import graphs_of

    assert graphs_of(ExtractConfig(dataset="toy", cache="c", cuda_graphs=setting), device) is want


def test_an_unknown_cuda_graphs_setting_is_refused_before_anything_runs(toy_root, tmp_path):
    with pytest.raises(ValueError, match=r"cuda_graphs 'sometimes' is unknown. Fix: use auto, true or false"):
        extract(_cfg(toy_root, tmp_path / "c", cuda_graphs="sometimes", limit=2), progress=False)
    assert not (tmp_path / "c").exists()


def test_shards_launch_while_the_previous_ones_last_puts_run(clean, toy_root, tmp_path, monkeypatch):
    """Consecutive shards share the put threads: the next shard's batches launch while this shard's last
    puts run, and its writer waits for them. With every put held back 50 ms the cache equals the clean
    one, and some shard launched before the previous one's puts were done."""
    import mettle.extract.run as run_module
    from mettle.extract.tokens import InFlight

    wait, launch = InFlight.wait, run_module.launch_shard

    def slow_wait(self):
        time.sleep(0.05)
        return wait(self)

    flights, overlapped = [], []

    def watched_launch(*args, **kwargs):
        if flights:
            overlapped.append(not all(f.done() for f in flights[-1].puts))
        flights.append(launch(*args, **kwargs))
        return flights[-1]

    monkeypatch.setattr(InFlight, "wait", slow_wait)
    monkeypatch.setattr(run_module, "launch_shard", watched_launch)
    summary = extract(_cfg(toy_root, tmp_path / "c", dtype="float32"), progress=False)
    assert summary.clips_ok == 12 and len(flights) == 6 and any(overlapped), overlapped
    _same(_arrays(tmp_path / "c"), _arrays(clean))
