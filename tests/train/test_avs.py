"""AVS on the AVSBench-format toy: masks in the cache, MTI + decoder training, overlays, refusals."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mettle.cache import CacheError, describe, open_cache
from mettle.extract.config import ExtractConfig
from mettle.extract.run import extract
from mettle.train.cli import main as train_cli
from mettle.train.config import resolve_config
from mettle.train.loop import fit
from mettle.train.tasks import get_task

SMALL = ["--set=lcd.dim=64", "--set=lcd.meta_tokens=4", "--set=lcd.heads=2", "--set=head.channels=32",
         "--set=optim.batch_size=4", "--set=optim.lr=2e-3"]


@pytest.fixture(scope="module")
def avs_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-avs")
    extract(ExtractConfig(dataset="toy-avs", cache=str(root / "cache"), data_root=str(root / "data"),
                          manifest_options={"num_clips": 48}, backbones="tiny", device="cpu"), progress=False)
    return root / "cache"


def test_toy_avs_is_avsbench_s4_and_masks_are_cached(avs_cache):
    cache = open_cache(avs_cache)
    m = cache.meta
    assert m.preset == "segmentation" and m.tokens == "full" and m.num_segments == 5
    assert m.keys("visual") == ["visual/stage0.block0", "visual/stage1.block0", "visual/stage2.block1",
                                "visual/stage3.block0"]  # the 4 stage outputs (the last one is also the last stage)
    assert m.keys("audio") == ["audio/stage3.block0"] and m.targets["masks"]["shape"] == [5, 224, 224]
    train, val = cache.rows("train")[0], cache.rows("val")[0]
    masks = cache.read("targets/masks", [train, val])
    assert (masks[0, 0] != 255).all() and (masks[0, 1:] == 255).all()  # S4 training clips: frame 1 only
    assert (masks[1] != 255).all() and masks[1].max() == 1 and 0 < masks[1].mean() < 0.2
    assert any("targets/masks" in line for line in describe(cache))


@pytest.mark.slow
def test_avs_s4_learns_and_writes_overlays(avs_cache, tmp_path):
    source, task = open_cache(avs_cache), get_task("avs-s4")
    items = task.items(source, "test")
    masks = torch.from_numpy(source.read("targets/masks", items))
    trivial = {name: task.metrics(torch.full((len(items), 5, 48, 48), v), masks, source.manifest, items)
               for name, v in (("empty", -10.0), ("full", 10.0))}
    r = CliRunner().invoke(train_cli, ["--task", "avs-s4", "--cache", str(avs_cache), "--out", str(tmp_path), "-q",
                                       "--device", "cpu", *SMALL, "--set", "optim.epochs=8", "--save-masks", "2"])
    assert r.exit_code == 0, r.output
    assert "| mIoU |" in r.output and "F-score per frame" in r.output
    run = next(tmp_path.glob("avs-s4__*"))
    results = json.loads((run / "results.json").read_text())
    best_trivial = max(t["miou"] for t in trivial.values())
    assert results["test"]["miou"] > best_trivial + 15, (results["test"], trivial)
    assert results["test"]["fscore"] > max(t["fscore"] for t in trivial.values()) + 25
    pngs = sorted((run / "masks").glob("*.png"))
    assert len(pngs) == 2 and len(results["mask_overlays"]) == 2
    from PIL import Image

    assert Image.open(pngs[0]).size == (5 * 224 + 4 * 4, 224)


def test_avs_refuses_a_cache_without_masks(small_toy_cache):
    cfg = resolve_config("avs-s4", get_task("avs-s4").head_defaults, cache=str(small_toy_cache), device="cpu")
    with pytest.raises(CacheError, match="needs clip labels 'masks'"):
        fit(cfg, open_cache(small_toy_cache), progress=False)
    r = CliRunner().invoke(train_cli, ["--task", "ave", "--cache", str(small_toy_cache), "--save-masks", "1", "-q"])
    assert r.exit_code == 2 and "does not predict masks" in r.output


def test_mti_head_shapes_and_gates_get_gradients():
    from mettle.train.tasks.avs import MTIHead

    head = MTIHead([("s0", 8, (8, 8)), ("s1", 12, (4, 4))], meta_dim=6, channels=16, heads=2)
    meta = {"audio": torch.randn(2, 3, 4, 6), "visual": torch.randn(2, 3, 4, 6)}
    tokens = {"s0": torch.randn(2, 3, 64, 8), "s1": torch.randn(2, 3, 16, 12)}
    out = head(meta, tokens=tokens)
    assert out.shape == (2, 3, 8, 8)
    out.sum().backward()
    assert head.gate.grad is not None and (head.gate.grad != 0).all()
    assert np.isfinite(head.inject[0].in_proj_weight.grad.numpy()).all()


def test_the_loss_averages_the_frames_with_masks():
    """Frames without a mask (255) weigh nothing; the mean and the Dice term are over frames with one, as
    selecting those frames would give; none at all gives 0 and zero gradients."""
    import torch.nn.functional as F

    from mettle.train.tasks.avs import MISSING, upsample

    task = get_task("avs-ms3")
    task.dice_weight = 0.7
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = (torch.rand(2, 3, 8, 8) > 0.5).to(torch.uint8)
    targets[0, 1] = MISSING
    targets[1, 2] = MISSING
    loss = task.loss(logits, targets)
    valid = (targets != MISSING).flatten(2).all(-1)
    x, y = upsample(logits, 8)[valid].flatten(1), targets[valid].float().flatten(1)
    p = torch.sigmoid(x)
    want = F.binary_cross_entropy_with_logits(x, y) + 0.7 * (1 - (2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)).mean()
    assert valid.sum() == 4 and torch.allclose(loss, want, atol=1e-6)
    loss.backward()
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[1, 2] == 0) and logits.grad[0, 0].abs().sum() > 0
    logits.grad = None
    none = task.loss(logits, torch.full_like(targets, MISSING))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.all(logits.grad == 0)
