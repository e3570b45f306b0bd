import hashlib

import numpy as np
import pytest

from mettle.extract.media import (
    MediaError, cut_segments, decode_audio, decode_video_frames, frame_indices, read_clip, read_wave_npy,
    segment_starts,
)
from mettle.manifests import Clip
from mettle.manifests.toy.generate import write_video
from mettle.manifests.toy.synth import TOY_CLASSES


def test_frame_rules():
    np.testing.assert_array_equal(frame_indices(80, 10, "linspace"), np.linspace(1, 80, 10, dtype=int) - 1)
    np.testing.assert_array_equal(frame_indices(12, 10, "first"), np.arange(10))
    np.testing.assert_array_equal(frame_indices(3, 5, "linspace"), [0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="needs 10"):
        frame_indices(9, 10, "first")


def test_segment_windows():
    np.testing.assert_array_equal(segment_starts(10, 10), np.arange(10))
    np.testing.assert_allclose(segment_starts(60, 10), np.linspace(0, 59, 10))
    wave = np.arange(10 * 4, dtype=np.float32)
    out, padded = cut_segments(wave[:-3], 4, segment_starts(10, 10))
    assert out.shape == (10, 4) and padded == 3
    np.testing.assert_array_equal(out[9], [36, 0, 0, 0])


def test_both_layouts_give_the_same_clip(toy_manifest, toy_root, tmp_path):
    """Frames + .npy (extracted layout) and the raw video agree up to codec loss."""
    clip = toy_manifest.clips[3]
    extracted = read_clip(clip, toy_root, toy_manifest.frame_rule)
    assert extracted.sources["visual"].is_dir() and extracted.sources["audio"].suffix == ".npy"
    only_video = tmp_path / "v"
    (only_video / "videos").mkdir(parents=True)
    (only_video / "videos" / f"{clip.clip_id}.mp4").symlink_to(toy_root / "videos" / f"{clip.clip_id}.mp4")
    decoded = read_clip(clip, only_video, toy_manifest.frame_rule)
    assert decoded.frames.shape == extracted.frames.shape == (10, 112, 112, 3)
    assert decoded.frames.dtype == np.uint8 and decoded.audio.dtype == np.float32
    diff = np.abs(decoded.frames.astype(float) - extracted.frames).mean(axis=(1, 2, 3))  # per segment
    assert diff.max() < 8, diff  # the same frames, up to codec loss (other frames of the second: up to 22)
    # the sound is the same second by second: loud where the script plays a sound, quiet elsewhere
    rms_npy, rms_vid = (np.sqrt((a.audio ** 2).mean(1)) for a in (extracted, decoded))
    assert np.corrcoef(rms_npy, rms_vid)[0, 1] > 0.95


def test_toy_content_matches_labels(toy_manifest, toy_root):
    """Event seconds show the event's colour and carry sound; that is what makes the toy learnable."""
    colours = {0: 0, 1: 1, 2: 2}  # dominant channel of the red, green, blue shapes
    for clip in toy_manifest.clips[:8]:
        media = read_clip(clip, toy_root, toy_manifest.frame_rule)
        rms = np.sqrt((media.audio ** 2).mean(1))
        for t, lab in enumerate(clip.labels["segment_labels"]):
            if lab == len(TOY_CLASSES):
                continue
            assert rms[t] > 0.05, (clip.clip_id, t)
            if lab in colours:
                frame = media.frames[t].reshape(-1, 3).astype(int)
                strong = frame[frame[:, colours[lab]] > 180]
                assert len(strong) > 50, (clip.clip_id, t)


def test_toy_is_deterministic(tmp_path, toy_root):
    from mettle.manifests.toy import ToyParams, generate_toy

    again = generate_toy(tmp_path / "again", ToyParams(num_clips=12, frames=True), processes=2)  # in 2 processes
    files = sorted(str(p.relative_to(toy_root)) for p in toy_root.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert "videos/toy000_0005.mp4" in files and "frames/toy000_0005/00000010.jpg" in files and "frames/toy000_0005/00000011.jpg" not in files
    for rel in files:
        digest = [hashlib.sha256((root / rel).read_bytes()).hexdigest() for root in (toy_root, again)]
        assert digest[0] == digest[1], rel
    other = generate_toy(tmp_path / "other", ToyParams(num_clips=12, seed=1))
    assert (other / "Annotations.txt").read_text() != (toy_root / "Annotations.txt").read_text()
    with pytest.raises(FileExistsError, match="other parameters"):
        generate_toy(tmp_path / "other", ToyParams(num_clips=12, seed=2))


def test_truncated_video_still_decodes(tmp_path):
    frames = np.full((40, 64, 64, 3), 128, np.uint8)
    audio = 0.3 * np.sin(np.linspace(0, 2000 * np.pi, 44100 * 5)).astype(np.float32)
    path = tmp_path / "clip.mkv"
    write_video(path, frames, 8, audio, 44100)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])
    wave = decode_audio("c", path)
    assert 2 * 32000 < len(wave) < 5 * 32000 + 2048
    picked = decode_video_frames("c", path, 5, "linspace")
    assert picked.shape == (5, 64, 64, 3)


def test_missing_and_bad_media_raise_typed_errors(tmp_path):
    clip = Clip("c1", ("train",), 10, 10.0, {"frames": "frames/c1", "audio": "wave/c1.npy", "video": "videos/c1"})
    with pytest.raises(MediaError, match="clip c1: .*no frames folder or video found"):
        read_clip(clip, tmp_path)
    (tmp_path / "wave").mkdir()
    np.save(tmp_path / "wave" / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MediaError, match="not a readable .npy array"):
        read_wave_npy("c1", tmp_path / "wave" / "obj.npy")
    good = np.zeros(320000, np.float32)
    np.save(tmp_path / "wave" / "t.npy", good)
    (tmp_path / "wave" / "t.npy").write_bytes((tmp_path / "wave" / "t.npy").read_bytes()[:1000])
    with pytest.raises(MediaError, match="not a readable .npy array"):
        read_wave_npy("c1", tmp_path / "wave" / "t.npy")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "c1.mp4").write_bytes(b"not a video at all")
    with pytest.raises(MediaError, match="c1: .*c1.mp4: cannot open"):
        read_clip(clip, tmp_path)


def test_video_without_audio_stream(tmp_path):
    path = tmp_path / "videos" / "c2.mp4"
    write_video(path, np.zeros((16, 32, 32, 3), np.uint8), 8, None, 44100)
    clip = Clip("c2", ("train",), 2, 2.0, {"video": "videos/c2"})
    with pytest.raises(MediaError, match="no audio stream"):
        read_clip(clip, tmp_path)


def _numbered_video(path, seconds, fps=10):
    """A video whose frames name themselves: frame k's left half is grey 16 (k // 16), its right half
    16 (k % 16), flat levels far enough apart for the codec to keep them."""
    k = np.arange(seconds * fps)
    frames = np.zeros((len(k), 32, 32, 3), np.uint8)
    frames[:, :, :16] = (16 * (k // 16)).astype(np.uint8)[:, None, None, None]
    frames[:, :, 16:] = (16 * (k % 16)).astype(np.uint8)[:, None, None, None]
    write_video(path, frames, fps, None, 44100)
    return path


def _decoded_indices(frames):
    return [16 * int(round(f[4:28, 2:14].mean() / 16)) + int(round(f[4:28, 18:30].mean() / 16)) for f in frames]


def test_video_frames_are_a_one_fps_folder_of_mid_second_frames(tmp_path, caplog):
    """Frames from a video are the ones a 1-fps, mid-second extraction (MUSIC-AVQA's script, ffmpeg's fps=1)
    would have written, with the folder rule applied to them: at 10 fps, second i is frame 10 i + 5."""
    path = _numbered_video(tmp_path / "v.mp4", 12)
    # linspace over a 12-file folder picks files 0, 3, 7, 11: seconds 0.5, 3.5, 7.5, 11.5
    assert _decoded_indices(decode_video_frames("c", path, 4, "linspace", 12.0)) == [5, 35, 75, 115]
    assert _decoded_indices(decode_video_frames("c", path, 4, "linspace")) == [5, 35, 75, 115]  # the video's length
    assert _decoded_indices(decode_video_frames("c", path, 3, "first", 12.0)) == [5, 15, 25]
    # a 60-s MUSIC-AVQA clip from a 12-s video: a folder of 60 files, whose seconds past the end repeat the last
    with caplog.at_level("WARNING"):
        picked = _decoded_indices(decode_video_frames("c", path, 10, "linspace", 60.0))
    assert picked[:2] == [5, 65] and set(picked[2:]) == {115}, picked  # linspace(1, 60, 10): files 0, 6, 13, ...
    assert "shorter than the clip's 60 s" in caplog.text
    with pytest.raises(MediaError, match="the 'first' rule needs 10"):  # no clip duration: the video's 5 s
        decode_video_frames("c", _numbered_video(tmp_path / "short.mp4", 5), 10, "first")


def _stereo_wav(path, rate, seconds=2.0):
    import av

    t = np.arange(int(rate * seconds)) / rate
    planes = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 3000 * t)])
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray((planes.T * 32767).astype(np.int16).reshape(1, -1)),
                                           format="s16", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return path


@pytest.mark.parametrize("rate", [16000, 32000, 44100])
def test_decoded_audio_is_what_librosa_load_gives(tmp_path, rate):
    """The reference pipelines' waveforms come from librosa.load(sr=32000, mono=True): the channels' mean,
    soxr_hq. FFmpeg's mono layout summed 0.707 (L + R) (+3 dB) and its resampler leaked above 8 kHz."""
    import librosa

    path = _stereo_wav(tmp_path / "a.wav", rate)
    ours, (ref, _) = decode_audio("c", path), librosa.load(str(path), sr=32000, mono=True)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_a_ten_second_music_avqa_wave_holds_its_segments_back_to_back(tmp_path):
    """The reference loaders view MUSIC-AVQA's audio_wave/<id>.npy as (10, 32000): segment k is its k-th second,
    though the video lasts 60 s. A 60-s track is spread over the 60 s (windows at linspace(0, 59, 10))."""
    clip = Clip("q1", ("test",), 10, 60.0, {"audio": "audio_wave/q1.npy", "frames": "frames/q1"})
    (tmp_path / "frames" / "q1").mkdir(parents=True)
    from PIL import Image

    for k in range(60):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "frames" / "q1" / f"{k + 1:08d}.jpg")
    (tmp_path / "audio_wave").mkdir()
    np.save(tmp_path / "audio_wave" / "q1.npy", np.repeat(np.arange(10, dtype=np.float32), 32000) / 10)
    media = read_clip(clip, tmp_path)
    assert media.padded_samples == 0
    np.testing.assert_allclose(media.audio.mean(1), np.arange(10) / 10, rtol=1e-6)
    np.save(tmp_path / "audio_wave" / "q1.npy", np.repeat(np.arange(60, dtype=np.float32), 32000) / 60)
    media = read_clip(clip, tmp_path)
    np.testing.assert_allclose(media.audio[:, 0], np.floor(np.linspace(0, 59, 10)) / 60, rtol=1e-6)
    # a 30-s track is cut on the clip's 60-s axis, as the frames are: the windows past its end are zero-padded
    np.save(tmp_path / "audio_wave" / "q1.npy", np.repeat(np.arange(30, dtype=np.float32), 32000) / 60)
    media = read_clip(clip, tmp_path)
    np.testing.assert_allclose(media.audio[:5, 0], np.floor(np.linspace(0, 59, 10))[:5] / 60, rtol=1e-6)
    assert media.padded_samples > 0 and not media.audio[5:].any()
    # a track a little longer than the ten segments (codec padding) still holds them back to back
    np.save(tmp_path / "audio_wave" / "q1.npy", np.repeat(np.arange(10, dtype=np.float32), 32000) / 10)
    wave = np.load(tmp_path / "audio_wave" / "q1.npy")
    np.save(tmp_path / "audio_wave" / "q1.npy", np.concatenate([wave, np.zeros(300, np.float32)]))
    np.testing.assert_allclose(read_clip(clip, tmp_path).audio.mean(1), np.arange(10) / 10, rtol=1e-6)


@pytest.mark.parametrize("container, codec, fmt", [("adts", "aac", "fltp"), ("flac", "flac", "s16")])
def test_audio_whose_sample_rate_changes_mid_stream_keeps_its_length(tmp_path, container, codec, fmt):
    """Two streams back to back (2 s at 44.1 kHz, then 2 s at 22.05 kHz) in one file: each run of one rate is
    converted and resampled on its own. From the first frame's rate, AAC's second half came out 2x too short;
    FLAC, which decodes to 16-bit samples, raised from the float converter set up by its first frame."""
    import av

    def encode(path, rate):
        t = np.arange(2 * rate) / rate
        x = np.tile(0.3 * np.sin(2 * np.pi * 440 * t), (2, 1))
        x = x.astype(np.float32) if fmt == "fltp" else (x.T * 32767).astype(np.int16).reshape(1, -1)
        step = 1024
        with av.open(str(path), "w", format=container) as out:
            stream = out.add_stream(codec, rate=rate, layout="stereo")
            for i in range(0, len(t), step):
                part = x[:, i:i + step] if fmt == "fltp" else x[:, 2 * i:2 * (i + step)]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(part), format=fmt, layout="stereo")
                frame.sample_rate, frame.pts = rate, i
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        return path.read_bytes()

    path = tmp_path / f"both.{codec}"
    path.write_bytes(encode(tmp_path / f"a.{codec}", 44100) + encode(tmp_path / f"b.{codec}", 22050))
    wave = decode_audio("c", path)
    assert 3.9 < len(wave) / 32000 < 4.3, len(wave) / 32000


def test_frame_choice_is_exact_in_time_units_that_do_not_round_evenly():
    """Float rounding must not pick the frame: 10 fps in a 1/1000 time base made a 30-s video end at
    30.000000000000004 s (its padded seconds took frame 299, not the last second's middle, 295), and at 15 fps in
    a 1/15360 base the exact ties at mid-second went to either frame (the rule: the earlier, offset 7)."""
    from mettle.extract.media.video import _one_per_second

    pts = [k * 100 for k in range(300)]  # 10 fps, time base 1/1000: 30 s
    picks = _one_per_second("c", pts, 1 / 1000, 10, "linspace", 60.0)  # seconds 0, 6, 13, ..., 59 of 60
    assert picks[:5] == [5, 65, 135, 195, 265] and set(picks[5:]) == {295}
    pts = [k * 1024 for k in range(15 * 30)]  # 15 fps, time base 1/15360: 30 s
    picks = _one_per_second("c", pts, 1 / 15360, 30, "first", 30.0)
    assert [p - 15 * s for s, p in enumerate(picks)] == [7] * 30
