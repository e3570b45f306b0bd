"""mettle-predict: a trained AVE run applied to toy video files finds the right events."""

import json

import pytest
from click.testing import CliRunner

from mettle.cache import CacheError, open_cache
from mettle.extract.predict import main as predict_cli
from mettle.extract.predict import predict
from mettle.train.config import resolve_config
from mettle.train.run import train_run
from mettle.train.tasks import get_task

SETS = {"lcd.dim": 128, "lcd.meta_tokens": 4, "lcd.heads": 4, "head.hidden": 128, "optim.epochs": 15,
        "optim.batch_size": 4, "optim.lr": 1e-3}


@pytest.fixture(scope="module")
def ave_run(toy48_cache, tmp_path_factory):
    cfg = resolve_config("ave", get_task("ave").head_defaults, sets=SETS, cache=str(toy48_cache),
                         out=str(tmp_path_factory.mktemp("runs")), device="cpu")
    run_dir, results = train_run(cfg, open_cache(toy48_cache), progress=False, plot=False)
    return run_dir


@pytest.mark.slow
def test_predict_finds_the_events_of_toy_videos(ave_run, toy48_cache, tmp_path):
    cache = open_cache(toy48_cache)
    names = cache.manifest.vocabularies["event"]
    clips = [cache.manifest.clips[r] for r in cache.rows("test")[:3]]
    videos = [toy48_cache.parent / "toy" / f"{c.media['video']}.mp4" for c in clips]
    preds = predict(ave_run, videos, device="cpu")
    right = total = 0
    for c, p in zip(clips, preds):
        truth = [names[k] for k in c.labels["segment_labels"]]
        got = [s["label"] for s in p["seconds"]]
        right += sum(a == b for a, b in zip(truth, got))
        total += len(truth)
    assert right / total >= 0.9, (right, total)
    r = CliRunner().invoke(predict_cli, [*map(str, videos), "--run", str(ave_run), "--out", str(tmp_path / "p"),
                                         "--device", "cpu"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert [s["video"] for s in saved] == [str(v) for v in videos] and all(s["events"] is not None for s in saved)
    assert len(list((tmp_path / "p").glob("*.png"))) == 3
    for args, message in [([str(tmp_path / "none.mp4")], "no such file"),
                          ([str(videos[0]), "--question", "what is playing"], "this run's task answers no questions"),
                          ([str(videos[0]), str(videos[0])], "given twice")]:
        r = CliRunner().invoke(predict_cli, [*args, "--run", str(ave_run), "--out", str(tmp_path / "q"),
                                             "--device", "cpu"])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (args, r.output)


def test_a_run_whose_cache_was_preprocessed_otherwise_is_refused(toy48_cache, tmp_path):
    """A run trained on a cache made under a preprocessing rule this mettle no longer applies (the fbank
    image's padding before 2026-11-28) would get other inputs from mettle-predict, silently."""
    from mettle.extract.backbones import BackboneError

    cfg = resolve_config("ave", get_task("ave").head_defaults, sets={**SETS, "optim.epochs": 1},
                         cache=str(toy48_cache), out=str(tmp_path), device="cpu")
    run, _ = train_run(cfg, open_cache(toy48_cache), progress=False, plot=False)
    source = json.loads((run / "source.json").read_text())
    source["backbones"]["audio"]["preprocess"]["pad"] = "zeros before normalising"
    (run / "source.json").write_text(json.dumps(source))
    cache = open_cache(toy48_cache)
    video = toy48_cache.parent / "toy" / f"{cache.manifest.clips[0].media['video']}.mp4"
    with pytest.raises(BackboneError, match=r"preprocessed otherwise .*\(pad: 'zeros before normalising', now None\)"
                                            r".*Fix: extract the cache again"):
        predict(run, [video], device="cpu")


def test_predict_errors(tmp_path):
    with pytest.raises(CacheError, match="has no config.yaml"):
        predict(tmp_path, [tmp_path / "x.mp4"])
    r = CliRunner().invoke(predict_cli, [str(tmp_path / "x.mp4"), "--run", str(tmp_path)])
    assert r.exit_code == 2 and "Fix:" in r.output and "Traceback" not in r.output


def test_a_rerun_into_the_same_folder_leaves_no_stale_pictures(tmp_path):
    """The PNGs of videos an earlier call predicted, and this one does not, go with the predictions.json
    that listed them; a file mettle did not list stays."""
    from mettle.extract.predict import write_outputs

    out = tmp_path / "p"
    write_outputs([{"video": "/v/a.mp4", "events": [["dog", 0, 2]]}, {"video": "/v/b.mp4", "events": []}], out)
    (out / "mine.png").write_bytes(b"x")
    assert {p.name for p in out.glob("*.png")} == {"a.png", "b.png", "mine.png"}
    write_outputs([{"video": "/v/b.mp4", "events": []}, {"video": "/v/c.mp4", "events": []}], out)
    assert {p.name for p in out.glob("*.png")} == {"b.png", "c.png", "mine.png"}
    assert [p["video"] for p in json.loads((out / "predictions.json").read_text())] == ["/v/b.mp4", "/v/c.mp4"]
