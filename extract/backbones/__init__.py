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

    if random_init:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **overrides)
    else:
        overlay = {"file": str(weights)} if weights is not None else None
        try:
            model = timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **overrides)
        except Exception as e:  # hub errors, offline mode, bad file: all end in the same advice
            where = f"the weights file {weights}" if weights else "the pretrained weights (download)"
            raise BackboneError(
                f"could not load {where} for {name} ({e.__class__.__name__}: {first_line(e)[:200]}). "
                "Fix: pass --visual-weights FILE (a timm .safetensors/.pth of this model), go online, "
                "or pass --random-init") from None
    backbone = cls(name, model)
    if not random_init:
        backbone.weights_id = "loaded"
    return backbone


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
