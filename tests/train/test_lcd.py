"""LCD: shapes, the memory-lean attention equals the naive one, no gradient into the tokens, options."""

import pytest
import torch

from mettle.cache import ArraySpec
from mettle.train.config import ConfigError, LCDConfig
from mettle.train.lcd import LCD, LayerDistiller, Readout, _NormAttend


def _arrays():
    return [ArraySpec("visual/stage0.block0", "visual", "stage0.block0", 0, 0, 12, (4, 4), (4, 4)),
            ArraySpec("visual/stage0.block1", "visual", "stage0.block1", 1, 0, 12, (4, 4), (4, 4)),
            ArraySpec("visual/stage1.block0", "visual", "stage1.block0", 2, 1, 20, (2, 2), (2, 2))]


def _tokens(b=2, t=5, dtype=torch.float32):
    return {"visual/stage0.block0": torch.randn(b, t, 16, 12, dtype=dtype),
            "visual/stage0.block1": torch.randn(b, t, 16, 12, dtype=dtype),
            "visual/stage1.block0": torch.randn(b, t, 4, 20, dtype=dtype)}


@pytest.mark.parametrize("share", ["stage", "none"])
def test_shapes_and_no_gradient_into_tokens(share):
    lcd = LCD(_arrays(), LCDConfig(meta_tokens=3, dim=16, heads=4, share=share))
    tokens = _tokens()
    out = lcd(tokens)
    assert out.shape == (2, 5, 3, 16) and out.dtype == torch.float32
    out.square().sum().backward()
    assert all(t.grad is None and not t.requires_grad for t in tokens.values())
    grads = {n: p.grad for n, p in lcd.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.0.meta"].abs().sum() > 0 and grads["layers.2.gate"].abs() > 0
    assert grads["layers.1.query"].abs().sum() > 0


def test_stage_sharing_shares_projections_only():
    shared = LCD(_arrays(), LCDConfig(meta_tokens=2, dim=16, heads=2, share="stage"))
    own = LCD(_arrays(), LCDConfig(meta_tokens=2, dim=16, heads=2, share="none"))
    assert shared.owner == [0, 0, 1] and len(shared.readouts) == 2
    assert own.owner == [0, 1, 2] and len(own.readouts) == 3
    per_readout = sum(p.numel() for p in Readout(12, LCDConfig(dim=16, heads=2)).parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(own) - count(shared) == per_readout
    with pytest.raises(ConfigError, match="lcd.share='layer'"):
        LCD(_arrays(), LCDConfig(share="layer"))


def test_float16_tokens_are_accepted():
    lcd = LCD(_arrays()[:1], LCDConfig(meta_tokens=2, dim=8, heads=2))
    assert lcd({"visual/stage0.block0": torch.randn(1, 2, 16, 12).half()}).dtype == torch.float32


def test_norm_attend_gradient_matches_finite_differences():
    torch.manual_seed(0)
    query = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 5, 6, dtype=torch.float64) * 2 + 1
    assert torch.autograd.gradcheck(lambda q: _NormAttend.apply(q, x)[0], (query,))


def _pair(cfg_kwargs, width=24):
    torch.manual_seed(0)
    folded = LayerDistiller(width, LCDConfig(attention="folded", **cfg_kwargs))
    naive = LayerDistiller(width, LCDConfig(attention="naive", **cfg_kwargs))
    readout = Readout(width, LCDConfig(**cfg_kwargs))
    with torch.no_grad():  # make the biases matter
        for p in [*folded.parameters(), *readout.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    naive.load_state_dict(folded.state_dict())
    return folded, naive, readout


def test_folded_attention_equals_naive():
    folded, naive, readout = _pair(dict(meta_tokens=5, dim=32, heads=4))
    x = torch.randn(7, 30, 24) * 3
    a = folded(x, readout)
    a.sum().backward()
    grads_a = [p.grad.clone() for p in [*folded.parameters(), *readout.parameters()]]
    readout.zero_grad()
    b = naive(x, readout)
    b.sum().backward()
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    for (n, p), g in zip([*naive.named_parameters(), *readout.named_parameters()], grads_a):
        assert torch.allclose(p.grad, g, atol=1e-4, rtol=1e-4), n


def test_folded_attention_keeps_no_float32_copy_of_the_tokens():
    """The memory contract: backward keeps the caller's tokens, not a normalised float32 copy per layer."""
    folded, naive, readout = _pair(dict(meta_tokens=4, dim=32, heads=4), width=128)
    x = torch.randn(8, 256, 128).half()

    def saved_bytes(layer):
        seen = []

        def pack(t):
            if t.data_ptr() != x.data_ptr():
                seen.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, readout).sum().backward()
        return sum(seen)
    lean, plain = saved_bytes(folded), saved_bytes(naive)
    assert lean < 0.5 * x.numel() * 4 < plain  # the attention weights and small tensors only


def test_ablation_switches_change_parameters():
    def count(**kw):
        cfg = LCDConfig(dim=16, heads=2, **kw)
        return sum(p.numel() for p in [*LayerDistiller(12, cfg).parameters(), *Readout(12, cfg).parameters()])
    full, no_adapt, no_keep = count(), count(adapt=False), count(preserve=False)
    assert no_adapt < full and no_keep < full
    with pytest.raises(ConfigError, match="not divisible"):
        LayerDistiller(12, LCDConfig(dim=10, heads=4))
