"""AVVP and AVQA end to end on their toy variants: generate, extract (tiny backbones), train, score."""

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from click.testing import CliRunner

from mettle.cache import CacheError, open_cache
from mettle.extract.config import ExtractConfig
from mettle.extract.run import extract
from mettle.train.cli import main as train_cli
from mettle.train.config import resolve_config
from mettle.train.loop import fit
from mettle.train.tasks import get_task

SMALL = {"lcd.dim": 128, "lcd.meta_tokens": 4, "lcd.heads": 4, "head.hidden": 128, "optim.batch_size": 8,
         "optim.lr": 1e-3}


def _cache(tmp_path_factory, dataset, clips):
    root = tmp_path_factory.mktemp(dataset)
    extract(ExtractConfig(dataset=dataset, cache=str(root / "cache"), data_root=str(root / "data"),
                          manifest_options={"num_clips": clips}, backbones="tiny", device="cpu"), progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def llp_cache(tmp_path_factory):
    return _cache(tmp_path_factory, "toy-llp", 48)


@pytest.fixture(scope="module")
def avqa_cache(tmp_path_factory):
    return _cache(tmp_path_factory, "toy-avqa", 96)


def test_toy_llp_is_real_llp_format(tmp_path):
    from mettle.extract.media import read_clip
    from mettle.manifests import build_manifest

    m = build_manifest("toy-llp", data_root=str(tmp_path / "llp"), num_clips=6, frames=True)
    assert m.vocabularies["event"][21] == "Telephone_bell_ringing" and m.frame_rule == "first"
    val = [c for c in m.clips if c.splits == ("val",)][0]
    assert val.labels["audio_events"] and val.labels["video_labels"]
    assert {e[0] for e in val.labels["audio_events"] + val.labels["visual_events"]} == set(val.labels["video_labels"])
    from_folder = read_clip(val, tmp_path / "llp", m.frame_rule)  # 1-fps frames + .npy waves
    (tmp_path / "llp" / "frames").rename(tmp_path / "llp" / "frames.off")
    (tmp_path / "llp" / "wave").rename(tmp_path / "llp" / "wave.off")
    from_video = read_clip(val, tmp_path / "llp", m.frame_rule)  # one frame per second of the video
    diff = np.abs(from_folder.frames.astype(int) - from_video.frames.astype(int)).mean()
    assert from_folder.frames.shape == from_video.frames.shape and diff < 12, diff


@pytest.mark.slow
def test_avvp_on_the_toy_llp_cache_learns(llp_cache, tmp_path):
    source, task = open_cache(llp_cache), get_task("avvp")
    items = task.items(source, "test")
    zero = {"video": np.zeros((len(items), 25), np.float32), "frame": np.zeros((len(items), 10, 2, 25), np.float32)}
    import torch

    baseline = task.metrics({k: torch.from_numpy(v) for k, v in zero.items()}, None, source.manifest, items)
    # 35 epochs: at 20, seg_event sat on the threshold (seeds 0 / 1: 41.8 / 39.9 with the toy audio's former AAC
    # coder, 35.3 / 38.6 with the fast one); at 35 it was 46.1-53.5 in all four runs (2026-11-28)
    cfg = resolve_config("avvp", task.head_defaults, sets={**SMALL, "optim.epochs": 35}, cache=str(llp_cache),
                         out=str(tmp_path), device="cpu")
    res = fit(cfg, source, progress=False)
    assert set(res.test) >= {"seg_a", "seg_v", "seg_av", "seg_type", "seg_event", "evt_a", "evt_type", "evt_event"}
    assert res.test["seg_type"] > baseline["seg_type"] + 30, (res.test, baseline)
    assert res.test["seg_event"] > 40 and res.best_epoch >= 0
    assert len(task.table(res.test)) == 4


def test_avvp_han_losses_are_the_reference_recipe_and_off_by_default():
    """head.han_losses adds AVVP-ECCV20's two modality losses (each modality's time-pooled probability,
    the visual one's targets smoothed to 0.9 y + 0.05); at its default the run fingerprint is unchanged."""
    import hashlib

    import torch
    import torch.nn.functional as F

    from mettle.manifests import build_manifest
    from mettle.train.config import EXECUTION_OPTIONS

    task = get_task("avvp")
    manifest = build_manifest("toy-llp", num_clips=6)
    torch.manual_seed(0)
    head = task.build_head({**task.head_defaults, "han_losses": True, "hidden": 16, "heads": 2}, 8, 2, manifest)
    out = head({"audio": torch.randn(3, 10, 2, 8), "visual": torch.randn(3, 10, 2, 8)})
    y = (torch.rand(3, 25) > 0.8).float()
    want = (F.binary_cross_entropy(out["video"], y) + F.binary_cross_entropy(out["modality"][:, 0], y)
            + F.binary_cross_entropy(out["modality"][:, 1], 0.9 * y + 0.05))
    torch.testing.assert_close(task.loss(out, y), want)
    assert out["modality"].shape == (3, 2, 25)
    task.build_head(task.head_defaults, 8, 2, manifest)  # the default: the video loss alone
    torch.testing.assert_close(task.loss(out, y), F.binary_cross_entropy(out["video"], y))

    on = resolve_config("avvp", task.head_defaults, sets={"head.han_losses": "true"})
    default = resolve_config("avvp", task.head_defaults)
    assert on.head["han_losses"] is True and on.fingerprint() != default.fingerprint()
    legacy = default.to_dict()  # the fingerprint's recipe before han_losses (and init_keys) existed
    for k in (*EXECUTION_OPTIONS, "init_keys", "head.han_losses"):
        section, _, key = k.rpartition(".")
        (legacy[section] if section else legacy).pop(key)
    assert default.fingerprint() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:8]


def test_head_options_reach_the_loss_through_train_run(llp_cache, tmp_path):
    """train_run builds the model (to refuse a bad source early) and hands it to fit: the loss must be that
    model's task's, whose build_head read the head options. Before, fit's own fresh task trained AVVP with
    label_smoothing=0 and without the HAN losses whatever was set."""
    from mettle.train.run import train_run

    source = open_cache(llp_cache)
    losses = {}
    for name, sets in {"plain": {}, "han": {"head.han_losses": "true"}, "smooth": {"head.label_smoothing": "0.5"}}.items():
        cfg = resolve_config("avvp", get_task("avvp").head_defaults, sets={**SMALL, "optim.epochs": 1, **sets},
                             cache=str(llp_cache), out=str(tmp_path / name), device="cpu")
        run_dir, _ = train_run(cfg, source, progress=False, plot=False)
        losses[name] = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert losses["han"] > 1.5 * losses["plain"] and losses["smooth"] != losses["plain"], losses


def test_avvp_refuses_a_cache_without_video_labels(small_toy_cache, tmp_path):
    r = CliRunner().invoke(train_cli, ["--task", "avvp", "--cache", str(small_toy_cache), "--out", str(tmp_path), "-q"])
    assert r.exit_code == 2 and "needs clip labels 'video_labels'" in r.output


@pytest.mark.slow
def test_avqa_grounding_then_avqa_learns(avqa_cache, tmp_path):
    source = open_cache(avqa_cache)
    qs = source.manifest.questions
    prior = defaultdict(Counter)
    for q in qs:
        if q.split == "train":
            prior[q.qtype][q.answer] += 1
    test = [q for q in qs if q.split == "test"]
    prior_acc = 100 * sum(prior[q.qtype].most_common(1)[0][0] == q.answer for q in test) / len(test)

    runner, out = CliRunner(), str(tmp_path / "runs")
    sets = [f"--set={k}={v}" for k, v in SMALL.items()]
    r = runner.invoke(train_cli, ["--task", "avqa-grounding", "--cache", str(avqa_cache), "--out", out, "-q",
                                  "--device", "cpu", *sets, "--set", "optim.epochs=10"])
    assert r.exit_code == 0, r.output
    grounding = next((tmp_path / "runs").glob("avqa-grounding__*"))
    assert json.loads((grounding / "results.json").read_text())["val"]["match_accuracy"] > 60
    r = runner.invoke(train_cli, ["--task", "avqa", "--cache", str(avqa_cache), "--out", out, "-q", "--device", "cpu",
                                  *sets, "--set", "optim.epochs=15", "--init-from", str(grounding)])
    assert r.exit_code == 0, r.output
    assert "| A-Count | A-Comp | A-Avg |" in r.output
    results = json.loads(next((tmp_path / "runs").glob("avqa__*/results.json")).read_text())
    assert results["initialised_tensors"] > 100  # the LCDs and the grounding module
    acc = results["test"]
    assert set(acc) >= {"Audio/Counting", "Visual/Counting", "Audio-Visual/Existential", "Audio-Visual/Temporal",
                        "Audio", "Visual", "Audio-Visual", "overall"}
    assert acc["overall"] > prior_acc + 10, (acc, prior_acc)


def test_avqa_match_weight_adds_the_reference_matching_loss(avqa_cache, tmp_path):
    """head.match_weight: the answer cross-entropy plus that weight times the grounding's match loss (the
    reference QA training's loss_qa + 0.5 * loss_match); the outputs' answers score as before."""
    import torch
    import torch.nn.functional as F

    from mettle.train.run import train_run

    task = get_task("avqa")
    source = open_cache(avqa_cache)
    task.items(source, "train")
    head = task.build_head({**task.head_defaults, "match_weight": 0.5, "hidden": 16}, 8, 2, source.manifest)
    meta = {"audio": torch.randn(3, 10, 2, 8), "visual": torch.randn(3, 10, 2, 8)}
    out = head(meta, question=torch.ones(3, 14, dtype=torch.long))
    assert out["answer"].shape == (3, len(source.manifest.vocabularies["answer"])) and out["match"].shape == (3, 10, 2)
    y = torch.tensor([0, 1, 2])
    labels = torch.stack([torch.ones(3, 10), torch.zeros(3, 10)], -1)
    want = F.cross_entropy(out["answer"], y) + 0.5 * F.binary_cross_entropy_with_logits(out["match"], labels)
    torch.testing.assert_close(task.loss(out, y), want)
    cfg = resolve_config("avqa", task.head_defaults, sets={**SMALL, "optim.epochs": 2, "head.match_weight": 0.5},
                         cache=str(avqa_cache), out=str(tmp_path), device="cpu")
    assert cfg.fingerprint() != resolve_config("avqa", task.head_defaults, sets={**SMALL, "optim.epochs": 2},
                                               cache=str(avqa_cache), out=str(tmp_path), device="cpu").fingerprint()
    _, results = train_run(cfg, source, progress=False, plot=False)  # trains, selects and scores with the dict outputs
    assert 0 <= results["test"]["overall"] <= 100 and results["epochs"] == 2


def test_avqa_refuses_a_dataset_without_questions(small_toy_cache):
    cfg = resolve_config("avqa", get_task("avqa").head_defaults, cache=str(small_toy_cache), device="cpu")
    with pytest.raises(CacheError, match="task avqa needs questions"):
        fit(cfg, open_cache(small_toy_cache), progress=False)


def test_the_question_state_is_the_packed_sequences_last_state():
    """The AVQA head reads the LSTM state after each question's last word (no packing, which needs the
    lengths on the host); it is the final state of the packed sequence."""
    import torch
    from torch import nn

    from mettle.train.tasks.avqa import AVQAHead

    torch.manual_seed(0)
    head = AVQAHead(meta_dim=16, vocab=30, answers=5, hidden=16).eval()
    question = torch.zeros(4, 14, dtype=torch.long)
    for k, n in enumerate((3, 14, 0, 7)):
        question[k, :n] = torch.randint(1, 30, (n,))
    captured = {}
    head.out.register_forward_hook(lambda mod, inp, out: captured.setdefault("in", inp[0]))
    meta = {"audio": torch.randn(4, 10, 2, 16), "visual": torch.randn(4, 10, 2, 16)}
    head(meta, question)
    lengths = (question != 0).sum(1).clamp(min=1)
    packed = nn.utils.rnn.pack_padded_sequence(head.embed(question), lengths, batch_first=True, enforce_sorted=False)
    _, (h, _) = head.encoder(packed)
    assert torch.allclose(captured["in"][:, 16:], h[-1], atol=1e-6)


class _Rows:
    """A token source as the tasks' ``items`` read it: a manifest and its rows per split."""

    def __init__(self, manifest):
        self.manifest = manifest

    def rows(self, split):
        return list(self.manifest.indices(split))


def test_avqa_grounding_uses_the_real_music_avqa_videos_only():
    """The reference grounding step trains and validates on ``avqa-{train,val}_real.json``: of the packaged
    original release's 3815 val and 6399 test videos, 3069 and 5126 are real (counted from the official
    ``_real`` files). Synthetic IDs carry a letter prefix (``sa``, ``vv``, ...), real ones are 8 digits."""
    from mettle.manifests import build_manifest, synthetic_videos

    assert len(synthetic_videos()) == 1866
    manifest = build_manifest("music-avqa")
    source, task = _Rows(manifest), get_task("avqa-grounding")
    for split, videos, real in (("val", 3815, 3069), ("test", 6399, 5126)):
        rows, kept = source.rows(split), task.items(source, split)
        assert (len(rows), len(kept)) == (videos, real)
        ids = {manifest.clips[r].clip_id for r in kept}
        assert all(i.isdigit() for i in ids)
        assert all(not manifest.clips[r].clip_id.isdigit() for r in set(rows) - set(kept))
    toy = build_manifest("toy-avqa", num_clips=12)  # other datasets keep every clip
    assert task.items(_Rows(toy), "train") == _Rows(toy).rows("train")


def test_grounding_negatives_are_never_the_positive():
    """Negatives come from another clip of the batch, a random second of it in training; a batch of one clip
    (an epoch's last) takes the clip's other seconds, so the two logits of a pair never coincide."""
    import torch

    from mettle.train.tasks.avqa import GroundingHead

    torch.manual_seed(0)
    head = GroundingHead(16, 32)
    meta = {"audio": torch.randn(3, 10, 4, 16), "visual": torch.randn(3, 10, 4, 16)}
    for batch in (3, 1):
        part = {k: v[:batch] for k, v in meta.items()}
        head.eval()
        out = head(part)
        assert out.shape == (batch, 10, 2) and not torch.isclose(out[..., 0], out[..., 1]).any()
        head.train()
        drawn = [head(part) for _ in range(50)]
        assert not torch.equal(drawn[0][..., 1], drawn[1][..., 1])  # a random second: the draws differ
        assert not any(torch.isclose(d[..., 0], d[..., 1]).any() for d in drawn)
    task = get_task("avqa-grounding")
    assert task.loss(out, None) > 0 and task.metrics(out, None, None, [0])["match_accuracy"] >= 0
