"""The bad-media matrix: every kind of damage is handled as the README's fault matrix says.

One copy of the 12-clip toy dataset, a different damage per clip, extracted with --on-error skip:
damage that leaves usable media is repaired (resampled, downmixed, resized, padded) and the clip is
"ok"; damage that does not is recorded as a failed clip with its reason, and its rows stay zero.
"""

import shutil

import numpy as np
import pytest

from mettle.cache import open_cache
from mettle.extract.config import ExtractConfig
from mettle.extract.run import extract
from mettle.manifests import build_manifest
from mettle.manifests.toy.generate import write_video


def _drop_extracted(root, clip):
    shutil.rmtree(root / clip.media["frames"])
    (root / clip.media["audio"]).unlink()


@pytest.mark.slow
def test_bad_media_matrix(toy_root, tmp_path, caplog):
    root = tmp_path / "toy"
    shutil.copytree(toy_root, root)
    clips = build_manifest("toy", data_root=str(root), num_clips=12, frames=True).clips
    video = {c.clip_id: root / f"{c.media['video']}.mp4" for c in clips}
    expect = {}

    c = clips[0]  # corrupt video, nothing else: failed
    _drop_extracted(root, c)
    video[c.clip_id].write_bytes(b"\x00garbage" * 500)
    expect[c.clip_id] = "cannot open"
    c = clips[1]  # truncated MP4: its index (moov, written last) is gone, nothing can be read: failed
    _drop_extracted(root, c)
    data = video[c.clip_id].read_bytes()
    video[c.clip_id].write_bytes(data[: int(len(data) * 0.85)])
    expect[c.clip_id] = "cannot open"
    c = clips[8]  # truncated Matroska: what decodes is used, the missing sound is zero-padded: ok
    _drop_extracted(root, c)
    video[c.clip_id].unlink()
    t = np.arange(10 * 44100) / 44100
    mkv = root / f"{c.media['video']}.mkv"
    write_video(mkv, np.full((80, 112, 112, 3), 200, np.uint8), 8,
                (0.3 * np.sin(2 * np.pi * 660 * t)).astype(np.float32), 44100)
    mkv.write_bytes(mkv.read_bytes()[: int(mkv.stat().st_size * 0.9)])
    expect[c.clip_id] = "ok"
    c = clips[2]  # truncated .npy wave: failed
    wave = root / c.media["audio"]
    wave.write_bytes(wave.read_bytes()[:500])
    expect[c.clip_id] = "not a readable .npy array"
    c = clips[3]  # frame folder present but empty: failed
    for f in (root / c.media["frames"]).iterdir():
        f.unlink()
    expect[c.clip_id] = "no frames"
    c = clips[4]  # 4 s at 100 x 60, 22.05 kHz mono-ish: resized, resampled, padded: ok
    _drop_extracted(root, c)
    t = np.arange(4 * 22050) / 22050
    write_video(video[c.clip_id], np.full((32, 60, 100, 3), 90, np.uint8), 8,
                (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    expect[c.clip_id] = "ok"
    c = clips[5]  # silent wave: ok
    np.save(root / c.media["audio"], np.zeros(320000, np.float32))
    expect[c.clip_id] = "ok"
    c = clips[6]  # a wave with NaN: failed
    np.save(root / c.media["audio"], np.full(320000, np.nan, np.float32))
    expect[c.clip_id] = "NaN or inf"
    c = clips[7]  # no media at all: failed
    _drop_extracted(root, c)
    video[c.clip_id].unlink()
    expect[c.clip_id] = "no frames folder or video found"

    with caplog.at_level("WARNING", logger="mettle"):  # decoded in worker processes: their records come back
        summary = extract(ExtractConfig(dataset="toy", cache=str(tmp_path / "cache"), data_root=str(root),
                                        manifest_options={"num_clips": 12, "frames": True}, backbones="tiny",
                                        device="cpu", shard_clips=4, on_error="skip", decode_processes=2),
                          progress=False)
    assert any(clips[4].clip_id in r.getMessage() and "zero-padded" in r.getMessage() for r in caplog.records)
    cache = open_cache(tmp_path / "cache")
    status = dict(zip([c.clip_id for c in cache.manifest.clips], cache.clip_status))
    for clip_id, want in expect.items():
        if want == "ok":
            assert status[clip_id] == "ok", (clip_id, status[clip_id])
        else:
            assert want in status[clip_id] and clip_id in summary.failures, (clip_id, status[clip_id])
    assert sum(s == "ok" for s in status.values()) == 12 - 6
    failed_rows = [i for i, s in enumerate(cache.clip_status) if s != "ok"]
    assert not cache.read("visual/stage0.block0", failed_rows).any()
    assert np.isfinite(cache.read("audio/stage3.block0", slice(None))).all()
