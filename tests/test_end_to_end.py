"""Training from a float32 full-token cache equals end-to-end training with the live frozen backbones."""

import pytest
import torch

from mettle.cache import open_cache
from mettle.extract.config import ExtractConfig, load_backbones
from mettle.extract.live import LiveSource
from mettle.extract.run import extract
from mettle.train.config import resolve_config
from mettle.train.loop import fit


@pytest.mark.slow
def test_cache_training_equals_end_to_end(toy_root, tmp_path):
    cfg_x = ExtractConfig(dataset="toy", cache=str(tmp_path / "cache"), data_root=str(toy_root),
                          manifest_options={"num_clips": 12, "frames": True}, backbones="tiny", tokens="full",
                          dtype="float32", device="cpu", batch_size=16)
    extract(cfg_x, progress=False)
    cache = open_cache(tmp_path / "cache")
    live = LiveSource(cache.manifest, toy_root, load_backbones(cfg_x), tokens="full", device="cpu")
    assert live.meta.arrays == cache.meta.arrays  # the same keys, grids and dims

    cfg = resolve_config("ave", {"hidden": 32, "temporal": "gru", "dropout": 0.1},
                         sets={"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "optim.batch_size": 3,
                               "optim.epochs": 2, "optim.lr": 1e-3}, device="cpu")
    a = fit(cfg, cache, progress=False, max_steps=5)
    b = fit(cfg, live, progress=False, max_steps=5)
    assert len(a.step_losses) == len(b.step_losses) == 5
    assert a.step_losses[0] != a.step_losses[-1]  # training moved
    assert torch.allclose(torch.tensor(a.step_losses), torch.tensor(b.step_losses), atol=1e-5, rtol=1e-5)
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    worst = max(float((pa[k] - pb[k]).detach().abs().max()) for k in pa)
    assert worst < 1e-5, worst
