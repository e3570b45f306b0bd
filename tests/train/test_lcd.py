"""LCD: shapes, the folded attention equals the naive one, no gradient into the tokens, options."""

import pytest
import torch

from mettle.cache import ArraySpec
from mettle.train.config import ConfigError, LCDConfig
from mettle.train.lcd import LCD, LayerDistiller


def _arrays():
    return [ArraySpec("visual/stage0.block0", "visual", "stage0.block0", 0, 0, 12, (4, 4), (4, 4)),
            ArraySpec("visual/stage1.block0", "visual", "stage1.block0", 1, 1, 20, (2, 2), (2, 2))]


def test_shapes_and_no_gradient_into_tokens():
    cfg = LCDConfig(meta_tokens=3, dim=16, heads=4)
    lcd = LCD(_arrays(), cfg)
    tokens = {"visual/stage0.block0": torch.randn(2, 5, 16, 12), "visual/stage1.block0": torch.randn(2, 5, 4, 20)}
    out = lcd(tokens)
    assert out.shape == (2, 5, 3, 16) and out.dtype == torch.float32
    out.square().sum().backward()
    assert all(t.grad is None and not t.requires_grad for t in tokens.values())
    grads = {n: p.grad for n, p in lcd.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.0.meta"].abs().sum() > 0 and grads["layers.1.gate"].abs() > 0


def test_float16_tokens_are_accepted():
    lcd = LCD(_arrays()[:1], LCDConfig(meta_tokens=2, dim=8, heads=2))
    assert lcd({"visual/stage0.block0": torch.randn(1, 2, 16, 12).half()}).dtype == torch.float32


def test_folded_attention_equals_naive():
    torch.manual_seed(0)
    folded = LayerDistiller(24, LCDConfig(meta_tokens=5, dim=32, heads=4, attention="folded"))
    naive = LayerDistiller(24, LCDConfig(meta_tokens=5, dim=32, heads=4, attention="naive"))
    naive.load_state_dict(folded.state_dict())
    with torch.no_grad():  # make the biases matter
        for p in folded.parameters():
            p.add_(0.1 * torch.randn_like(p))
        naive.load_state_dict(folded.state_dict())
    x = torch.randn(7, 30, 24) * 3
    a, b = folded(x), naive(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(folded.named_parameters(), naive.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), n


def test_ablation_switches_change_parameters():
    full = sum(p.numel() for p in LayerDistiller(12, LCDConfig(dim=16, heads=2)).parameters())
    no_adapt = sum(p.numel() for p in LayerDistiller(12, LCDConfig(dim=16, heads=2, adapt=False)).parameters())
    no_keep = sum(p.numel() for p in LayerDistiller(12, LCDConfig(dim=16, heads=2, preserve=False)).parameters())
    assert no_adapt < full and no_keep < full
    with pytest.raises(ConfigError, match="not divisible"):
        LayerDistiller(12, LCDConfig(dim=10, heads=4))
