"""Frozen backbones with one tap API: per-block tokens (B, N, D) and per-stage maps (B, C, H, W).

Registered names carry identity:

* ``swinv2_large_window12_192.ms_in22k``: timm Swin-V2-L, 24 blocks (2-2-18-2), grids 48/24/12/6 at 192 px.
* ``htsat.audioset``: our HTS-AT, 12 blocks (2-2-6-2), grids 64/32/16/8; the official AudioSet
  checkpoint loads into it.
* ``swinv2_large_window12_192.ms_in22k+fbank``: the modality-shared setting, audio segments as
  192 x 192 Kaldi fbank images through the same Swin-V2-L (audio modality, visual taps).
* ``test_swinv2_tiny``, ``test_htsat_tiny``, ``test_swinv2_tiny+fbank``: random-init miniatures with the same grids and interfaces,
  seconds on CPU, for tests and the demo.
"""

from __future__ import annotations

from pathlib import Path

from mettle.manifests.errors import first_line

from ._registry import BackboneSpec, create_backbone, get_backbone_spec, list_backbones, register_backbone
from .base import RANDOM_INIT, Backbone, BackboneError, BlockInfo
from .htsat import HTSATBackbone, HTSATConfig, load_official_checkpoint
from .swinv2 import SwinV2Backbone, SwinV2SpectrogramBackbone

SWINV2_LARGE = "swinv2_large_window12_192.ms_in22k"


def _timm_swinv2(name: str, arch: str, weights: Path | None, random_init: bool, cls=SwinV2Backbone,
                 **overrides) -> SwinV2Backbone:
    import timm

    if random_init or weights is not None:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **overrides)
        if weights is not None and not random_init:
            _load_swin_file(model, Path(weights), name)
    else:
        try:
            model = timm.create_model(arch, pretrained=True, num_classes=0, **overrides)
        except Exception as e:  # hub errors, offline mode: all end in the same advice
            raise BackboneError(
                f"could not load the pretrained weights (download) for {name} ({e.__class__.__name__}: "
                f"{first_line(e)[:200]}). Fix: pass --visual-weights FILE (a timm .safetensors/.pth of this "
                "model), go online, or pass --random-init") from None
    backbone = cls(name, model)
    if not random_init:
        backbone.weights_id = "loaded"
    return backbone


def _load_swin_file(model, weights: Path, name: str) -> None:
    """Load a local Swin-V2 weights file into ``model``, every tensor or none.

    Why not timm's ``pretrained_cfg_overlay={"file": ...}``: timm loads non-strictly whenever the head
    differs from the pretrained one (here always: ``num_classes=0``), so a file of another model loaded
    nothing, said nothing, and the random weights were recorded as loaded. Accepted: timm's layout
    (``model.safetensors`` of ``timm/swinv2_large_window12_192.ms_in22k``) and Microsoft's ``.pth``
    (``{"model": ...}``), through timm's own key filter; the classifier head is dropped."""
    from timm.models import load_state_dict
    from timm.models.swin_transformer_v2 import checkpoint_filter_fn

    fix = (f"Fix: pass --visual-weights FILE with the weights of {SWINV2_LARGE} (timm's model.safetensors from the "
           "Hugging Face hub, or Microsoft's swinv2 .pth), or pass --random-init")
    try:
        state = checkpoint_filter_fn(load_state_dict(str(weights), weights_only=True), model)
    except Exception as e:  # not a checkpoint, pickled objects, another layout: one line, with the fix
        raise BackboneError(f"could not load the weights file {weights} for {name} ({e.__class__.__name__}: "
                            f"{first_line(e)[:200]}). {fix}") from None
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (wants {tuple(own[k].shape)})" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        what = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                         for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
                         if keys)
        raise BackboneError(f"the weights file {weights} is not {name}'s architecture ({what}). {fix}")
    model.load_state_dict(state, strict=True)


def _no_weights(name: str, weights: Path | None) -> None:
    """The Swin miniatures are random-init only: a weights file given for one would be silently unused."""
    if weights is not None:
        raise BackboneError(f"{name} is a random-init miniature and loads no weights file ({weights}). Fix: drop "
                            f"the weights option, or use {SWINV2_LARGE} with it")


@register_backbone(SWINV2_LARGE, "visual", "Swin-V2-L (timm), ImageNet-22k, 192 px, 24 blocks")
def _swinv2_large(weights: Path | None, random_init: bool) -> SwinV2Backbone:
    return _timm_swinv2(SWINV2_LARGE, SWINV2_LARGE, weights, random_init)


@register_backbone("test_swinv2_tiny", "visual", "random-init Swin-V2 miniature (dim 16, 1-1-2-1 blocks), same grids")
def _swinv2_tiny(weights: Path | None, random_init: bool) -> SwinV2Backbone:
    _no_weights("test_swinv2_tiny", weights)
    return _timm_swinv2("test_swinv2_tiny", "swinv2_large_window12_192", None, True,
                        embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))


@register_backbone(SWINV2_LARGE + "+fbank", "audio",
                   "modality-shared: 192-bin Kaldi fbank images of the audio through the same Swin-V2-L")
def _swinv2_large_fbank(weights: Path | None, random_init: bool) -> SwinV2Backbone:
    return _timm_swinv2(SWINV2_LARGE + "+fbank", SWINV2_LARGE, weights, random_init, cls=SwinV2SpectrogramBackbone)


@register_backbone("test_swinv2_tiny+fbank", "audio", "modality-shared miniature: fbank images through test_swinv2_tiny")
def _swinv2_tiny_fbank(weights: Path | None, random_init: bool) -> SwinV2Backbone:
    _no_weights("test_swinv2_tiny+fbank", weights)
    return _timm_swinv2("test_swinv2_tiny+fbank", "swinv2_large_window12_192", None, True,
                        cls=SwinV2SpectrogramBackbone, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))


def _htsat(name: str, cfg: HTSATConfig, weights: Path | None, random_init: bool) -> HTSATBackbone:
    backbone = HTSATBackbone(name, cfg)
    if random_init:
        return backbone
    if weights is None:
        raise BackboneError(
            f"{name} needs its weights file: HTS-AT's AudioSet checkpoint is not downloadable automatically. "
            "Fix: pass --audio-weights HTSAT_AudioSet_Saved_1.ckpt (from the HTS-AT authors' release), "
            "or pass --random-init")
    try:
        load_official_checkpoint(backbone.model, weights)
    except ValueError as e:
        raise BackboneError(str(e)) from None
    backbone.weights_id = "loaded"
    return backbone


@register_backbone("htsat.audioset", "audio", "HTS-AT, AudioSet checkpoint, 12 blocks (2-2-6-2)")
def _htsat_audioset(weights: Path | None, random_init: bool) -> HTSATBackbone:
    return _htsat("htsat.audioset", HTSATConfig(), weights, random_init)


@register_backbone("test_htsat_tiny", "audio", "random-init HTS-AT miniature (dim 16, 2-1-2-1 blocks), same grids")
def _htsat_tiny(weights: Path | None, random_init: bool) -> HTSATBackbone:
    return _htsat("test_htsat_tiny", HTSATConfig(embed_dim=16, depths=(2, 1, 2, 1), heads=(1, 2, 2, 4)),
                  weights, True if weights is None else random_init)


__all__ = [
    "RANDOM_INIT", "SWINV2_LARGE", "Backbone", "BackboneError", "BackboneSpec", "BlockInfo", "HTSATBackbone",
    "HTSATConfig", "SwinV2Backbone", "SwinV2SpectrogramBackbone", "create_backbone", "get_backbone_spec", "list_backbones",
    "load_official_checkpoint", "register_backbone",
]
