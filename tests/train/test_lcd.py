"""LCD: shapes, the memory-lean attention equals the naive one, no gradient into the tokens, options."""

import dataclasses

import pytest
import torch

from mettle.cache import ArraySpec
from mettle.train.config import ConfigError, LCDConfig
from mettle.train.lcd import LCD, LayerDistiller, Readout, _GroupAttend
from mettle.train.lcd_autograd import fp32_matmul


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


def test_group_attention_gradient_matches_finite_differences():
    torch.manual_seed(0)
    query = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)  # (L, h, K, D)
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # d = 4: two heads of 2
    xs = [torch.randn(4, 5, 6, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    assert torch.autograd.gradcheck(lambda q, w: _GroupAttend.apply(q, w, None, *xs)[0], (query, weight))


def _twins(share="stage", **kw):
    """The same LCD twice: grouped (folded) and per-layer reference (naive), biases made non-zero."""
    torch.manual_seed(0)
    cfg = dict(meta_tokens=3, dim=16, heads=4, share=share, **kw)
    folded = LCD(_arrays(), LCDConfig(attention="folded", **cfg))
    with torch.no_grad():
        for p in folded.parameters():
            p.add_(0.1 * torch.randn_like(p))
    naive = LCD(_arrays(), LCDConfig(attention="naive", **cfg))
    naive.load_state_dict(folded.state_dict())
    return folded, naive


@pytest.mark.parametrize("share,chunk,meta", [("stage", 64 << 20, 64 << 20), ("none", 64 << 20, 64 << 20),
                                               ("stage", 1, 64 << 20), ("stage", 64 << 20, 1)])
@pytest.mark.parametrize("kw", [{}, {"adapt": False}, {"preserve": False}])
@pytest.mark.parametrize("recompute", [True, False])
def test_grouped_attention_equals_naive(share, chunk, meta, kw, recompute):
    folded, naive = _twins(share, **kw)
    folded.chunk_bytes, folded.meta_bytes = chunk, meta  # 1: every layer its own chunk
    folded.recompute = recompute  # the part after the attention recomputed in backward, or kept
    tokens = _tokens()
    a, b = folded(tokens), naive(tokens)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    grads = dict(naive.named_parameters())
    for n, p in folded.named_parameters():
        assert torch.allclose(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4), n


def test_chunks_and_recomputation_follow_the_budget(monkeypatch):
    """lcd.chunk_mib sets how many layers a chunk holds (0: the device type's default): the part after the
    attention runs on as many layers as its activations allow, the attention inside on as many as their
    float32 tokens allow; the part after the attention is recomputed in backward only when all layers'
    activations exceed the budget."""
    import mettle.train.lcd as lcd_module

    calls = {"attend": 0, "recompute": 0}
    attend, recompute = lcd_module._GroupAttend.apply, lcd_module._Recompute.apply

    def counted(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped
    monkeypatch.setattr(lcd_module._GroupAttend, "apply", counted("attend", attend))
    monkeypatch.setattr(lcd_module._Recompute, "apply", counted("recompute", recompute))
    arrays = [ArraySpec(f"visual/stage0.block{i}", "visual", f"stage0.block{i}", i, 0, 12, (4, 4), (4, 4))
              for i in range(6)]

    def run(b, t, chunk_mib=0, default=None):
        calls.update(attend=0, recompute=0)
        lcd = LCD(arrays, LCDConfig(meta_tokens=4, dim=64, heads=4, chunk_mib=chunk_mib))
        if default is not None:
            monkeypatch.setitem(LCD.CHUNK_MIB, "cpu", default)
        lcd({a.key: torch.randn(b, t, a.tokens, a.dim) for a in arrays}).sum().backward()
        return calls["attend"], calls["recompute"]

    # one layer's meta-token activations: 8 x K x d x 4 bytes = 8 KiB a segment; 1 MiB = 128 segments
    assert run(1, 16, chunk_mib=1) == (1, 0)  # 6 x 128 KiB kept: under 1 MiB, one chunk, no recompute
    assert run(8, 16, chunk_mib=1) == (6, 6)  # 1 MiB a layer: a chunk each, recomputed
    assert run(4, 16, chunk_mib=1) == (3, 3)  # 512 KiB a layer: two a chunk
    assert run(4, 16, chunk_mib=4) == (1, 0)  # 3 MiB in all: under 4
    cpu_default = LCD.CHUNK_MIB["cpu"]
    assert run(4, 16, default=(1, 1)) == (3, 3)  # 0: the device's default (here patched to 1 MiB on the CPU)
    with pytest.raises(ConfigError, match="lcd.chunk_mib=-1"):
        LCD(arrays, LCDConfig(chunk_mib=-1))
    # wide tokens: the attention reads 2 layers at a time (4 MiB of float32 tokens a layer), the part after
    # it runs once for all 6 (6 x 128 KiB of activations), here recomputed on request
    arrays = [dataclasses.replace(a, dim=4096) for a in arrays]
    monkeypatch.setattr(LCD, "recompute", True)
    assert run(1, 16, chunk_mib=8) == (3, 1)
    # the CPU default: pieces of 8 MiB of tokens, chunks of 16 MiB of activations
    assert cpu_default == (8, 16) and run(1, 16, default=cpu_default) == (3, 1)


def test_grouped_attention_keeps_no_float32_copy_of_the_tokens():
    """The memory contract: backward keeps the caller's tokens, not a normalised float32 copy per layer."""
    arrays = [dataclasses.replace(a, dim=a.dim * 8, grid=(a.grid[0] * 4, a.grid[1] * 4)) for a in _arrays()]
    tokens = {a.key: torch.randn(2, 4, a.tokens, a.dim).half() for a in arrays}
    folded, naive = (LCD(arrays, LCDConfig(meta_tokens=3, dim=16, heads=4, attention=a)) for a in ("folded", "naive"))
    held = {t.data_ptr() for t in tokens.values()}

    def saved_bytes(lcd):
        seen = []

        def pack(t):
            if t.data_ptr() not in held:
                seen.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lcd(tokens).sum().backward()
        return sum(seen)
    f32_tokens = sum(t.numel() * 4 for t in tokens.values())
    lean, plain = saved_bytes(folded), saved_bytes(naive)
    assert lean < 0.25 * f32_tokens < plain  # attention weights and small tensors only


def test_ablation_switches_change_parameters():
    def count(**kw):
        cfg = LCDConfig(dim=16, heads=2, **kw)
        return sum(p.numel() for p in [*LayerDistiller(12, cfg).parameters(), *Readout(12, cfg).parameters()])
    full, no_adapt, no_keep = count(), count(adapt=False), count(preserve=False)
    assert no_adapt < full and no_keep < full
    with pytest.raises(ConfigError, match="not divisible"):
        LayerDistiller(12, LCDConfig(dim=10, heads=4))


@pytest.mark.parametrize("attention", ["folded", "naive"])
def test_int8_codes_with_scales_equal_the_decoded_tokens(attention):
    """LCD fed int8 codes + per-token scales (an int8 cache read as stored) computes what it computes from
    the tokens decoded on the host, outputs and gradients; also with codes beside float tokens in one
    group (AVS: a block the head also reads directly comes decoded)."""
    from mettle.cache import SCALE
    from mettle.cache.dtypes import decode, encode, get_dtype

    torch.manual_seed(0)
    arrays = _arrays()
    cfg = LCDConfig(meta_tokens=4, dim=32, heads=4, attention=attention)
    lcd = LCD(arrays, cfg)
    floats, codes = {}, {}
    for i, a in enumerate(arrays):
        c, s = encode((torch.randn(2, 3, a.tokens, a.dim) * (1 + i)).numpy(), get_dtype("int8"))
        floats[a.key] = torch.from_numpy(decode(c, s))
        codes[a.key], codes[a.key + SCALE] = torch.from_numpy(c), torch.from_numpy(s)
    mixed = {k: v for k, v in codes.items() if not k.startswith(arrays[1].key)}
    mixed[arrays[1].key] = floats[arrays[1].key]
    outs, grads = [], []
    for tokens in (floats, codes, mixed):
        lcd.zero_grad()
        out = lcd(tokens)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in lcd.parameters() if p.grad is not None]))
    assert torch.equal(outs[1], outs[0]) and torch.equal(grads[1], grads[0])  # the same float32 products
    assert torch.allclose(outs[2], outs[0], atol=1e-6) and torch.allclose(grads[2], grads[0], atol=1e-5)
    with pytest.raises(ValueError, match="codes for visual/stage0.block0 without their scales"):
        lcd({k: v for k, v in codes.items() if k != arrays[0].key + SCALE})


def test_a_callers_autocast_keeps_the_attention_in_float32_and_reaches_the_recomputation():
    """Under a caller's autocast (bfloat16 on the CPU here) the grouped attention stays float32 (its
    products write into float32 buffers), the layers after it follow autocast, and the recomputation in
    backward runs under the forward's autocast: the same gradients as keeping the activations."""
    tokens = _tokens()
    grads = []
    for recompute in (True, False):
        folded, naive = _twins()
        folded.recompute = recompute
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = folded(tokens)
        assert a.dtype == torch.float32 and torch.allclose(a, naive(tokens), atol=0.05)
        a.sum().backward()  # outside autocast, as training loops call it
        grads.append({n: p.grad for n, p in folded.named_parameters()})
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads[-1].values())
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("recompute", [True, False])
def test_backward_runs_the_products_as_the_forward_did(monkeypatch, recompute):
    """lcd.matmul (TF32 on CUDA by default) is set around the LCD's forward; autograd calls the backward
    later, outside it: the attention's backward and the recomputation run under the forward's setting
    anyway, and the process's own setting is back after each (the flag is a process flag, so this holds
    without a GPU)."""
    import mettle.train.lcd_autograd as autograd

    matmul = torch.backends.cuda.matmul
    before, seen = matmul.fp32_precision, {}
    backward = autograd._GroupAttend._backward
    monkeypatch.setattr(autograd._GroupAttend, "_backward", staticmethod(
        lambda ctx, dread: seen.setdefault("attention", matmul.fp32_precision) and backward(ctx, dread)))
    finish_calls = []
    recomputed = autograd._Recompute.forward

    def spy(ctx, fn, *inputs):  # record the setting each time the part after the attention runs
        return recomputed(ctx, lambda *a: finish_calls.append(matmul.fp32_precision) or fn(*a), *inputs)
    monkeypatch.setattr(autograd._Recompute, "forward", staticmethod(spy))
    folded, _ = _twins()
    folded.recompute = recompute
    with fp32_matmul("tf32"):  # what LCD.forward opens on a CUDA device
        out = folded._forward(_tokens(), _tokens()["visual/stage0.block0"])
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    out.sum().backward()
    assert seen == {"attention": "tf32"} and matmul.fp32_precision == before
    assert finish_calls == (["tf32"] * 4 if recompute else [])  # two chunks: forward, then recomputed in backward
    with fp32_matmul(None):  # None leaves the setting alone
        assert matmul.fp32_precision == before
    with pytest.raises(ConfigError, match="lcd.matmul='fast'"):
        LCD(_arrays(), LCDConfig(matmul="fast"))
