import numpy as np
import pytest
import torch

from mettle.extract.backbones import (
    BackboneError, HTSATConfig, create_backbone, list_backbones,
)
from mettle.extract.backbones.base import state_sha256
from mettle.extract.backbones.htsat.frontend import expected_frontend_tensors, fold_to_image
from mettle.extract.backbones.htsat.model import HTSAT


@pytest.fixture(scope="module")
def swin_tiny():
    return create_backbone("test_swinv2_tiny")


@pytest.fixture(scope="module")
def htsat_tiny():
    return create_backbone("test_htsat_tiny")


def _frames(n, size=112, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _audio(n, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal((n, 32000))).astype(np.float32)


def test_registry_and_errors(tmp_path):
    assert {"swinv2_large_window12_192.ms_in22k", "htsat.audioset", "test_swinv2_tiny",
            "test_htsat_tiny"} <= set(list_backbones())
    assert list_backbones("audio") == ["htsat.audioset", "swinv2_large_window12_192.ms_in22k+fbank",
                                       "test_htsat_tiny", "test_swinv2_tiny+fbank"]
    with pytest.raises(BackboneError, match="unknown backbone 'swin'. Fix: use one of"):
        create_backbone("swin")
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("htsat.audioset", weights=tmp_path / "missing.ckpt")
    with pytest.raises(BackboneError, match="pass --audio-weights HTSAT_AudioSet_Saved_1.ckpt"):
        create_backbone("htsat.audioset")


def test_swin_tiny_taps(swin_tiny):
    assert [b.grid for b in swin_tiny.blocks] == [(48, 48), (24, 24), (12, 12), (12, 12), (6, 6)]
    x = swin_tiny.preprocess(_frames(2))
    assert x.shape == (2, 3, 192, 192)
    taps = swin_tiny.forward_tokens(x)
    assert [tuple(t.shape) for t in taps] == [(2, b.tokens, b.dim) for b in swin_tiny.blocks]
    assert not any(t.requires_grad for t in taps)
    # the last tap after the final norm is timm's forward_features
    ref = swin_tiny.model.forward_features(x).flatten(1, 2)
    torch.testing.assert_close(swin_tiny.final_norm(taps[-1]), ref, rtol=0, atol=0)
    maps = swin_tiny.forward_stages(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 48, 48), (2, 32, 24, 24), (2, 64, 12, 12), (2, 128, 6, 6)]
    inter = swin_tiny.model.forward_intermediates(x, intermediates_only=True)
    for ours, timm_map in zip(maps, inter):
        torch.testing.assert_close(ours, timm_map)


def test_index_semantics(htsat_tiny):
    x = htsat_tiny.preprocess(_audio(1))
    all_taps = htsat_tiny.forward_tokens(x)
    assert len(all_taps) == 6
    for indices, expect in [(2, [4, 5]), ([0, -1], [0, 5]), ([3], [3]), (None, list(range(6)))]:
        got = htsat_tiny.forward_tokens(x, indices)
        assert len(got) == len(expect)
        for g, k in zip(got, expect):
            torch.testing.assert_close(g, all_taps[k])


@pytest.mark.parametrize("name, make", [("test_swinv2_tiny", _frames), ("test_htsat_tiny", _audio)])
def test_batched_equals_one_by_one(name, make):
    b = create_backbone(name)
    x = b.preprocess(make(3))
    batched = b.forward_tokens(x, [0, -1])
    for i in range(3):
        single = b.forward_tokens(x[i:i + 1], [0, -1])
        for s, t in zip(single, batched):
            torch.testing.assert_close(s[0], t[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in list_backbones() if n.startswith("test_")])  # same code as full size
def test_preprocess_stays_on_the_cpu_wherever_the_model_is(name):
    """Decode threads preprocess on the CPU while the model sits on the GPU ("meta" stands in for it)."""
    b = create_backbone(name).to("meta")
    x = b.preprocess(_frames(2) if b.modality == "visual" else _audio(2))
    assert x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 2


def test_random_init_is_reproducible():
    a, b = create_backbone("test_htsat_tiny"), create_backbone("test_htsat_tiny")
    assert state_sha256(a) == state_sha256(b) and a.weights_id == "random-init"


def test_htsat_full_size_shapes():
    b = create_backbone("htsat.audioset", random_init=True)
    assert [(blk.tokens, blk.dim) for blk in b.blocks] == \
        [(4096, 96)] * 2 + [(1024, 192)] * 2 + [(256, 384)] * 6 + [(64, 768)] * 2
    assert sum(p.numel() for p in b.parameters()) == 30_241_687  # + 1.05 M STFT kernels = the official 31.3 M
    assert len(b.model.state_dict()) + 3 == 200  # the official checkpoint's key count
    x = b.preprocess(_audio(1))
    assert x.shape == (1, 32000)  # tiled to 10 s inside the model
    taps = b.forward_tokens(x, [0, -1])
    assert [tuple(t.shape) for t in taps] == [(1, 4096, 96), (1, 64, 768)]


def test_logmel_matches_librosa():
    """Our torch.stft front end against librosa's independent mel spectrogram of the same definition."""
    import librosa

    wave = _audio(1)[0].repeat(3)
    ours = HTSAT(HTSATConfig(embed_dim=8, depths=(1, 1, 1, 1), heads=(1, 1, 1, 1))).logmel(torch.from_numpy(wave)[None])[0]
    mel = librosa.feature.melspectrogram(y=wave, sr=32000, n_fft=1024, hop_length=320, center=True, pad_mode="reflect",
                                         power=2.0, n_mels=64, fmin=50, fmax=14000)
    ref = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
    assert ours.shape == (1 + len(wave) // 320, 64)
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-3)
    # the checkpoint's conv kernels compute the same power spectrum
    k = expected_frontend_tensors()
    padded = torch.nn.functional.pad(torch.from_numpy(wave)[None, None], (512, 512), mode="reflect")
    re = torch.nn.functional.conv1d(padded, k["spectrogram_extractor.stft.conv_real.weight"], stride=320)
    im = torch.nn.functional.conv1d(padded, k["spectrogram_extractor.stft.conv_imag.weight"], stride=320)
    power = (re ** 2 + im ** 2)[0].T
    conv_db = 10 * torch.log10(torch.clamp(power @ k["logmel_extractor.melW"], min=1e-10))
    np.testing.assert_allclose(conv_db.numpy(), ref, atol=2e-3)


def test_fold_to_image_layout():
    x = torch.arange(1024 * 64, dtype=torch.float32).reshape(1, 1024, 64)
    img = fold_to_image(x)[0, 0]
    assert img.shape == (256, 256)
    for chunk, f, t in [(0, 0, 0), (1, 5, 7), (3, 63, 255), (2, 10, 100)]:
        assert img[chunk * 64 + f, t] == x[0, chunk * 256 + t, f]
    short = fold_to_image(torch.zeros(1, 1001, 64) + 3.0)
    assert short.shape == (1, 1, 256, 256) and torch.allclose(short, torch.full_like(short, 3.0))


def test_audio_tile_follows_the_dataset_protocol():
    """HTS-AT tiles each second to 10 s (AVE, LLP, MUSIC-AVQA) or 5 s (AVSBench); the cache records it."""
    from mettle.extract.config import ExtractConfig, load_backbones

    def audio(dataset, tile=None):
        return load_backbones(ExtractConfig(dataset=dataset, cache="-", backbones="tiny", audio_tile=tile))["audio"]
    assert audio("ave").tile == 10 and audio("toy-avs").tile == 5 and audio("ave", 3).tile == 3
    assert audio("toy-avs").record().preprocess["tile"] == 5
    with pytest.raises(BackboneError, match="--audio-tile 11"):
        audio("ave", 11)
    b = audio("toy-avs")
    wave = b.preprocess(_audio(2))
    tiled = b.forward_tokens(wave, [-1])[0]
    torch.testing.assert_close(tiled, b.forward_tokens(wave.repeat(1, 5), [-1])[0])  # the tiling is in the model
    b.set_preprocess(dict(b.record().preprocess, tile=10))  # as mettle-predict restores a cache's record
    assert b.tile == 10 and not torch.allclose(tiled, b.forward_tokens(wave, [-1])[0])
    with pytest.raises(BackboneError, match="audio tile 0: .*--audio-tile"):
        b.set_preprocess({"tile": 0})
    visual = load_backbones(ExtractConfig(dataset="ave", cache="-", backbones="tiny"))["visual"]
    spec = visual.preprocess_spec()
    visual.set_preprocess(dict(spec, tile=5))  # nothing of a frame's preprocessing is adjustable
    assert visual.preprocess_spec() == spec


def test_frozen_swin_attention_is_timms_bit_for_bit():
    """Each block's attention keeps its weight-only terms (swinv2_attention.py) and still gives exactly
    timm's output: float32 and autocast, plain and shifted windows; new weights are followed, and
    weights that learn get timm's own forward (their terms stay in the autograd graph)."""
    import timm

    from mettle.extract.backbones import SwinV2Backbone
    from mettle.extract.backbones.swinv2_attention import FrozenWindowAttention

    def make():  # two blocks in the first stage: the second one's windows are shifted (a mask)
        torch.manual_seed(0)
        return timm.create_model("swinv2_large_window12_192", pretrained=False, num_classes=0, embed_dim=16,
                                 depths=(2, 1, 2, 1), num_heads=(1, 1, 2, 2)).eval()

    b, ref = SwinV2Backbone("test", make()), make()
    assert b.frozen_attention == len(b.blocks) == 6
    assert all(type(blk.attn) is FrozenWindowAttention for st in b.model.layers for blk in st.blocks)
    assert ref.layers[0].blocks[1].attn_mask is not None
    x = b.preprocess(_frames(2))
    for dtype in (None, torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            assert torch.equal(b.model.forward_features(x), ref.forward_features(x)), dtype
    with torch.no_grad():
        b.model.forward_features(x)  # float32 terms kept
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b.model.load_state_dict(ref.state_dict())  # in place (same memory): the kept terms must be made again
    with torch.no_grad():
        assert torch.equal(b.model.forward_features(x), ref.forward_features(x))
    with torch.inference_mode():  # terms made in inference mode still serve later forwards
        assert torch.equal(b.model.forward_features(x), ref.forward_features(x))
    b.model.double(), ref.double()  # moved or cast: the kept terms are dropped; autocast leaves float64 alone
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(b.model.forward_features(x.double()), ref.forward_features(x.double()))
    attn = b.model.layers[0].blocks[1].attn
    attn.cpb_mlp[0].weight.requires_grad_(True)
    b.model.forward_features(x.double()).sum().backward()
    assert attn.cpb_mlp[0].weight.grad is not None and attn.cpb_mlp[0].weight.grad.abs().sum() > 0


def test_htsat_keeps_its_position_bias_until_the_weights_change():
    """HTS-AT's attention keeps its position bias (+ shifted-window mask) per dtype; loading other
    weights makes it anew: the outputs equal a fresh model's with those weights, in float32 and autocast."""
    b, fresh = create_backbone("test_htsat_tiny"), create_backbone("test_htsat_tiny")
    x = b.preprocess(_audio(2))
    with torch.no_grad():
        for autocast in (False, True, False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                b.forward_tokens(x)
        assert sum(len(m._kept) for m in b.modules() if hasattr(m, "_kept")) > 0
        for p in fresh.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b.load_state_dict(fresh.state_dict())
    fresh = create_backbone("test_htsat_tiny")
    fresh.load_state_dict(b.state_dict())  # nothing kept yet
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for ours, want in zip(b.forward_tokens(x), fresh.forward_tokens(x)):
                assert torch.equal(ours, want), autocast


def test_kept_casts_are_autocasts_bit_for_bit():
    """Frozen Linear / Conv2d weights cast once per autocast dtype (kept_casts.py) give exactly what
    autocast's per-call casts give: float16 and bfloat16, float32 outside autocast, float64 left
    alone; new weights are followed, .to() drops the kept casts, weights that learn get gradients."""
    from torch import nn

    from mettle.extract.backbones.kept import kept_bytes
    from mettle.extract.backbones.kept_casts import KeptCastConv2d, KeptCastLinear, keep_casts, per_call_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 5), nn.Linear(5, 4, bias=False))
    for p in model.parameters():
        p.requires_grad_(False)
    ref = per_call_copy(model)
    assert keep_casts(model) == 3 and keep_casts(model) == 3  # idempotent
    assert [type(m) for m in model] == [KeptCastConv2d, nn.Flatten, KeptCastLinear, KeptCastLinear]
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    assert kept_bytes(model) == 0  # outside autocast nothing is cast
    for dtype in (None, torch.float16, torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x)
            assert out.dtype == (dtype or torch.float32) and torch.equal(out, ref(x)), dtype
    assert len(model[2]._casts) == 2  # one set per autocast dtype
    assert kept_bytes(model) == 2 * 2 * sum(p.numel() for p in model.parameters())  # two 16-bit copies
    model.to("cpu")  # moves nothing: the kept casts stay
    assert len(model[2]._casts) == 2
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1)
    model.load_state_dict(ref.state_dict())  # in place: the kept casts are made again
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(model(x), ref(x))
        kept = model[2]._casts._kept[torch.float16][1][0]
        assert kept.dtype == torch.float16 and torch.equal(kept, model[2].weight.half())
    model.double(), ref.double()  # cast: kept casts dropped; autocast leaves float64 weights alone
    assert len(model[2]._casts) == 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x.double()), ref(x.double()))
    model[2].weight.requires_grad_(True)  # a weight that learns: PyTorch's own forward, in the autograd graph
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x.double()).sum().backward()
    assert model[2].weight.grad is not None and model[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, make", [("test_swinv2_tiny", _frames), ("test_htsat_tiny", _audio)])
def test_frozen_backbones_cast_their_weights_once(name, make):
    """A built backbone keeps its autocast weight casts: its tokens under autocast are bitwise those of
    the same model with per-call casts, and a second forward issues some 2-per-layer fewer copies."""
    from torch.profiler import ProfilerActivity, profile

    from mettle.extract.backbones.kept_casts import per_call_copy

    b = create_backbone(name)
    ref = per_call_copy(b)
    x = b.preprocess(make(2))
    layers = sum(1 for m in b.modules() if hasattr(m, "_casts"))
    assert layers > 0

    def copies(model):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outs = model.forward_tokens(x)
        return outs, sum(1 for e in prof.events() if e.name == "aten::_to_copy")

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        b.forward_tokens(x)  # the casts are made once
        ours, n_ours = copies(b)
        want, n_want = copies(ref)
    assert all(torch.equal(o, w) for o, w in zip(ours, want))
    assert n_want - n_ours >= layers  # every layer's weight (and bias) no longer cast per call


def test_kept_terms_that_are_weights_themselves_stay_kept():
    """A kept term may be a weight itself (float32 attention terms, a bfloat16 weight under bfloat16
    autocast): after new weights are loaded it is kept again, not made anew (nor copied onto itself,
    which would move the weight's version counter) in every forward."""
    from torch import nn

    from mettle.extract.backbones.kept_casts import keep_casts
    from mettle.extract.backbones.swinv2_attention import FrozenWindowAttention

    lin = nn.Linear(4, 3).to(torch.bfloat16).requires_grad_(False)
    keep_casts(lin)
    x = torch.randn(2, 4)
    b = create_backbone("test_swinv2_tiny")
    frames = b.preprocess(_frames(1))
    made = []
    compute = FrozenWindowAttention._compute_terms

    def counting(self, dtype):
        made.append(dtype)
        return compute(self, dtype)

    FrozenWindowAttention._compute_terms = counting
    try:
        with torch.no_grad():
            for reload in (False, True):
                if reload:
                    lin.load_state_dict(lin.state_dict())  # in place: version counters move once
                    b.load_state_dict(b.state_dict())
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    lin(x)
                version = lin.weight._version
                b.forward_tokens(frames)
                before = len(made)
                for _ in range(2):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        lin(x)
                    b.forward_tokens(frames)
                assert lin.weight._version == version and len(made) == before, reload
                assert lin._casts._kept[torch.bfloat16][1][0] is lin.weight
    finally:
        FrozenWindowAttention._compute_terms = compute


def _arrays_of(b):
    """The default cache arrays of one backbone (a one-clip plan)."""
    from mettle.cache import plan_cache
    from mettle.manifests import Clip, Manifest

    manifest = Manifest("t", (Clip("c0", ("train",), 10, 10.0, {"video": "c0"}),), {"event": ("a", "b")})
    return [a for a in plan_cache(manifest, {b.modality: b.record()}).arrays if a.modality == b.modality]


def test_autocast_fallback_to_float32_drops_the_kept_casts(monkeypatch):
    """When float16 autocast is off by too much and extraction falls back to float32, the float16
    casts the check made are dropped (they would only take memory)."""
    from mettle.extract import tokens as tokens_mod
    from mettle.extract.backbones.kept import kept_bytes
    from mettle.extract.tokens import TokenForward

    b = create_backbone("test_htsat_tiny")
    arrays = _arrays_of(b)
    monkeypatch.setattr(tokens_mod, "AUTOCAST_TOLERANCE", -1.0)  # any difference is too much
    fw = TokenForward(b, arrays, torch.device("cpu"), "float16")
    fw._check_autocast = True  # as precision "auto" does on a GPU
    fw(b.preprocess(_audio(2)))
    assert fw.autocast is False and kept_bytes(b) == 0


def test_the_log_mel_front_end_stays_float32_under_float16_autocast():
    """In float16 a loud second's power spectrum overflows (inf, then NaN in the mel product) and a silent
    second's floor of 1e-10 is 0 (log: -inf): the front end computes in float32, as the reference does."""
    from mettle.extract.backbones.htsat.frontend import LogMel

    t = torch.arange(32000) / 32000
    waves = torch.stack([torch.zeros(32000), torch.sign(torch.sin(2 * torch.pi * 200 * t)), 1e-4 * torch.randn(32000)])
    front = LogMel()
    exact = front(waves)
    with torch.autocast("cpu", dtype=torch.float16):
        mixed = front(waves)
    assert torch.isfinite(exact).all() and mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact)


def test_autocast_check_fails_on_non_finite_tokens(monkeypatch):
    """A NaN in the float16 tokens is no small error: the check falls back to float32 (NaN compared as
    greater than the tolerance is False, and max() skips a NaN that is not first)."""
    from mettle.extract.tokens import TokenForward

    b = create_backbone("test_htsat_tiny")
    fw = TokenForward(b, _arrays_of(b), torch.device("cpu"), "float16")
    fw._check_autocast = True  # as precision "auto" does on a GPU
    forward = fw._forward

    def poisoned(x, autocast):  # float16 tokens with one NaN, in a block after the first
        outs = forward(x, autocast)
        if autocast:
            outs[-1] = outs[-1].clone()
            outs[-1].view(-1)[0] = float("nan")
        return outs
    monkeypatch.setattr(fw, "_forward", poisoned)
    out = fw(b.preprocess(_audio(2)))
    assert fw.autocast is False and fw.autocast_error == float("inf")
    assert all(torch.isfinite(t).all() for t in (out.values() if isinstance(out, dict) else out))
