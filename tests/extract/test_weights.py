"""Loading real weights: the official HTS-AT checkpoint layout, a local timm Swin-V2 file, and the errors
of files that are something else (checkpoints written here in the real key layout; nothing is downloaded)."""

import re

import pytest
import torch

from mettle.extract.backbones import (
    BackboneError, HTSATBackbone, HTSATConfig, create_backbone, load_official_checkpoint,
)
from mettle.extract.backbones.base import state_sha256
from mettle.extract.backbones.htsat.frontend import expected_frontend_tensors
from mettle.extract.backbones.htsat.model import HTSAT
from test_backbones import _audio, _frames  # tests/ holds no packages: the module is found by its folder


class Payload:
    """Anything that is not plain tensors and containers is refused by weights_only loading."""


def _official_layout(model: HTSAT) -> dict:
    state = {f"sed_model.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"sed_model.{k}": v for k, v in expected_frontend_tensors().items()})
    return {"state_dict": state, "epoch": 3, "global_step": 1000}


def test_checkpoint_round_trip_in_official_layout(tmp_path):
    cfg = HTSATConfig(embed_dim=16, depths=(2, 1, 2, 1), heads=(1, 2, 2, 4))
    torch.manual_seed(123)
    src = HTSATBackbone("src", cfg)
    for p in src.parameters():  # make every tensor matter, BatchNorm statistics included
        p.data.normal_(0, 0.05)
    src.model.bn0.running_mean.normal_(-20, 5)
    src.model.bn0.running_var.uniform_(50, 100)
    path = tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"
    torch.save(_official_layout(src.model), path)

    dst = HTSATBackbone("dst", cfg)
    report = load_official_checkpoint(dst.model, path)
    assert report["frontend"] == "checked"
    x = dst.preprocess(_audio(2))
    for a, b in zip(src.forward_tokens(x), dst.forward_tokens(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(src.model(x), dst.model(x), rtol=0, atol=0)
    # through the registry, with the weights hash recorded
    tiny = create_backbone("test_htsat_tiny", weights=path)
    assert tiny.weights_id == state_sha256(src)


def test_checkpoint_errors_name_the_keys(tmp_path):
    cfg = HTSATConfig(embed_dim=16, depths=(2, 1, 2, 1), heads=(1, 2, 2, 4))
    model = HTSAT(cfg)
    good = _official_layout(model)

    bad = {"state_dict": dict(good["state_dict"])}
    del bad["state_dict"]["sed_model.layers.1.blocks.0.mlp.fc2.weight"]
    torch.save(bad, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing: layers.1.blocks.0.mlp.fc2.weight"):
        load_official_checkpoint(HTSAT(cfg), tmp_path / "missing.ckpt")

    bad = {"state_dict": dict(good["state_dict"])}
    bad["state_dict"]["sed_model.logmel_extractor.melW"] = torch.rand(513, 64)
    torch.save(bad, tmp_path / "frontend.ckpt")
    with pytest.raises(ValueError, match="logmel_extractor.melW differs from the HTS-AT front end"):
        load_official_checkpoint(HTSAT(cfg), tmp_path / "frontend.ckpt")

    with pytest.raises(ValueError, match="does not match the HTS-AT architecture"):
        load_official_checkpoint(HTSAT(), tmp_path / "missing.ckpt")

    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "pickle.ckpt")
    with pytest.raises(ValueError, match="cannot read as a torch checkpoint .it holds pickled objects") as e:
        load_official_checkpoint(HTSAT(cfg), tmp_path / "pickle.ckpt")
    assert len(str(e.value).splitlines()) == 1 and "\x1b" not in str(e.value)  # not torch's 6 coloured lines
    (tmp_path / "page.ckpt").write_bytes(b"<html>404</html>" * 8)  # a failed download: no pickled objects in it
    with pytest.raises(ValueError, match="cannot read as a torch checkpoint") as e:
        load_official_checkpoint(HTSAT(cfg), tmp_path / "page.ckpt")
    assert "pickled objects" not in str(e.value) and "weights_only" not in str(e.value) and "damaged" in str(e.value)


@pytest.mark.slow
def test_swinv2_large_shapes_and_offline_error(tmp_path):
    b = create_backbone("swinv2_large_window12_192.ms_in22k", random_init=True)
    assert len(b.blocks) == 24
    assert [(blk.grid, blk.dim) for blk in b.blocks[:: 6]] == [((48, 48), 192), ((12, 12), 768), ((12, 12), 768),
                                                               ((12, 12), 768)]
    assert [b.blocks[i].grid for i in b.stage_ends] == [(48, 48), (24, 24), (12, 12), (6, 6)]
    taps = b.forward_tokens(b.preprocess(_frames(1, 64)), [0, 3, -1])
    assert [tuple(t.shape) for t in taps] == [(1, 2304, 192), (1, 576, 384), (1, 36, 1536)]
    # offline and no file: a clear error with the fix, not a hub traceback
    with pytest.raises(BackboneError, match="pass --visual-weights FILE"):
        create_backbone("swinv2_large_window12_192.ms_in22k")


def test_swinv2_local_weights_file(tmp_path):
    """The real loading path (timm pretrained with a local file) on a small Swin-V2 written in timm's layout."""
    import timm
    from safetensors.torch import save_file

    from mettle.extract.backbones import _timm_swinv2

    arch = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))
    torch.manual_seed(7)
    src = timm.create_model("swinv2_large_window12_192", pretrained=False, num_classes=10, **arch).eval()
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    b = _timm_swinv2("local", "swinv2_large_window12_192", path, False, **arch)
    x = b.preprocess(_frames(1))
    torch.testing.assert_close(b.final_norm(b.forward_tokens(x, 1)[0]), src.forward_features(x).flatten(1, 2))
    assert b.weights_id == "loaded"  # create_backbone replaces the marker with the content hash
    path.write_bytes(b"garbage")
    with pytest.raises(BackboneError, match="could not load the weights file .* pass --visual-weights FILE"):
        _timm_swinv2("local", "swinv2_large_window12_192", path, False, **arch)

    # Microsoft's own .pth layout: under "model", each stage's downsample at the end of the one before,
    # the classifier as head.*, the position buffers saved too
    def ms_name(k):
        return re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample",
                      k).replace("head.fc.", "head.")

    ms = {ms_name(k): v for k, v in src.state_dict().items()}
    ms.update({ms_name(n): b for n, b in src.named_buffers() if "relative_position_index" in n})
    torch.save({"model": ms}, tmp_path / "swin.pth")
    b = _timm_swinv2("local", "swinv2_large_window12_192", tmp_path / "swin.pth", False, **arch)
    torch.testing.assert_close(b.final_norm(b.forward_tokens(x, 1)[0]), src.forward_features(x).flatten(1, 2))


def test_a_swin_weights_file_of_another_model_is_refused(tmp_path):
    """timm's pretrained path loads a file non-strictly when the head differs (num_classes=0, always here):
    a file of another model loaded nothing and the random weights were recorded as loaded."""
    import timm
    from safetensors.torch import save_file

    from mettle.extract.backbones import _timm_swinv2

    arch = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))
    src = timm.create_model("swinv2_large_window12_192", pretrained=False, **arch).state_dict()
    wider = timm.create_model("swinv2_large_window12_192", pretrained=False, **{**arch, "embed_dim": 32}).state_dict()
    htsat = _official_layout(HTSAT(HTSATConfig(embed_dim=16, depths=(2, 1, 2, 1), heads=(1, 2, 2, 4))))
    cases = {"prefixed.ckpt": ({"state_dict": {"model.swin." + k: v for k, v in src.items()}}, r"missing: .* unexpected: "),
             "htsat.ckpt": (htsat, "missing: "), "wider.safetensors": (wider, r"shape: .*\(wants ")}
    for name, (state, what) in cases.items():
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
        else:
            torch.save(state, tmp_path / name)
        with pytest.raises(BackboneError, match=rf"{name} is not local's architecture \({what}.*Fix: pass --visual"):
            _timm_swinv2("local", "swinv2_large_window12_192", tmp_path / name, False, **arch)


def test_the_checkpoint_s_own_mel_matrix_is_used(tmp_path):
    """The reference multiplies by the mel matrix stored in the checkpoint: a filterbank that differs from
    librosa's by a rounding-sized amount passes the check and is the one used."""
    cfg = HTSATConfig(embed_dim=16, depths=(2, 1, 2, 1), heads=(1, 2, 2, 4))
    layout = _official_layout(HTSAT(cfg))
    mel = layout["state_dict"]["sed_model.logmel_extractor.melW"].clone()
    mel[100, 10] += 5e-5
    layout["state_dict"]["sed_model.logmel_extractor.melW"] = mel
    torch.save(layout, tmp_path / "ckpt.ckpt")
    dst = HTSAT(cfg)
    load_official_checkpoint(dst, tmp_path / "ckpt.ckpt")
    assert torch.equal(dst.logmel.mel, mel)
    assert "logmel.mel" not in dst.state_dict()  # still a fixed buffer, not a weight
    del layout["state_dict"]["sed_model.layers.1.blocks.0.mlp.fc2.weight"]  # a refused checkpoint changes nothing
    torch.save(layout, tmp_path / "bad.ckpt")
    fresh = HTSAT(cfg)
    before = fresh.logmel.mel.clone()
    with pytest.raises(ValueError, match="missing"):
        load_official_checkpoint(fresh, tmp_path / "bad.ckpt")
    assert torch.equal(fresh.logmel.mel, before)


def test_a_weights_file_for_a_random_init_miniature_is_refused(tmp_path):
    """The Swin miniatures never load weights: a file given for one was silently unused (the cache then
    said random-init, the user thought otherwise)."""
    from mettle.extract.backbones import BackboneError, create_backbone

    (tmp_path / "w.pth").write_bytes(b"")
    for name in ("test_swinv2_tiny", "test_swinv2_tiny+fbank"):
        with pytest.raises(BackboneError, match=f"{re.escape(name)} is a random-init miniature .*Fix: drop the weights"):
            create_backbone(name, weights=tmp_path / "w.pth", random_init=False)
        assert create_backbone(name, weights=None, random_init=False).record().weights_id == "random-init"
    # --visual-weights reaches a +fbank audio backbone only when it is the visual side's own Swin
    from mettle.extract.backbones import SWINV2_LARGE
    from mettle.extract.config import ExtractConfig, weights_for

    w = str(tmp_path / "w.pth")
    mixed = ExtractConfig("toy", "c", backbones=f"visual={SWINV2_LARGE},audio=test_swinv2_tiny+fbank", visual_weights=w)
    shared = ExtractConfig("toy", "c", backbones="shared", visual_weights=w)
    assert weights_for(mixed, "audio", "test_swinv2_tiny+fbank") is None
    assert weights_for(shared, "audio", SWINV2_LARGE + "+fbank") == w
