"""Extraction options: typed defaults, backbone sets, and loading the backbones they name."""

from __future__ import annotations

import logging
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mettle.cache import DEFAULT_DTYPE, DEFAULT_TOKENS

from .backbones import SWINV2_LARGE, Backbone, BackboneError, create_backbone, get_backbone_spec

log = logging.getLogger(__name__)

# Named backbone sets (modality -> registered backbone). "specific" is the paper's main setting.
BACKBONE_SETS: dict[str, dict[str, str]] = {
    "specific": {"visual": SWINV2_LARGE, "audio": "htsat.audioset"},
    "shared": {"visual": SWINV2_LARGE, "audio": SWINV2_LARGE + "+fbank"},
    "tiny": {"visual": "test_swinv2_tiny", "audio": "test_htsat_tiny"},
    "tiny-shared": {"visual": "test_swinv2_tiny", "audio": "test_swinv2_tiny+fbank"},
}


@dataclass
class ExtractConfig:
    """Everything ``mettle-extract`` takes. Identity options (backbones, weights, preset, tokens,
    dtype, format, shard size) shape the cache; runtime options (device, workers, batch size ...)
    only change how fast it is written."""

    dataset: str
    cache: str
    data_root: str | None = None
    manifest_options: dict[str, Any] = field(default_factory=dict)
    backbones: str = "specific"
    visual_weights: str | None = None
    audio_weights: str | None = None
    random_init: bool = False
    preset: str | None = None  # None: the dataset's default (segmentation for AVSBench)
    tokens: str = DEFAULT_TOKENS
    dtype: str = DEFAULT_DTYPE
    format: str = "zarr"
    shard_clips: int | None = None
    device: str = "auto"
    precision: str = "auto"
    cuda_graphs: str | bool = "auto"  # full batches as one CUDA graph each (graphs.py): auto = on CUDA (see graphs_of)
    batch_size: int = 32
    decode_threads: int = 2
    decode_processes: int | None = None  # None: by device (see decode_processes_of); 0: decode in threads
    workers: int = 0
    scheduler: str | None = None
    limit: int | None = None
    overwrite: bool = False
    retry_failed: bool = False
    on_error: str = "fail"
    audio_tile: int | None = None  # seconds each 1-s audio segment is tiled to; None: the dataset's protocol

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AT_LEAST = {"batch_size": 1, "decode_threads": 1, "decode_processes": 0, "workers": 0, "limit": 1, "shard_clips": 1,
            "audio_tile": 1}


def typed_options(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` converted to ExtractConfig's field types, or a CacheError naming the option and the fix.

    YAML hands over what it parsed: a quoted ``"false"`` is a non-empty string, which Python reads as
    true (an ``overwrite: "false"`` line deleted a finished cache); ``2.5`` clips per shard, or ``six``,
    must not reach the code that compares them. Booleans take YAML's and the command line's spellings.
    """
    from typing import get_args, get_origin, get_type_hints

    from mettle.cache import CacheError
    from mettle.manifests.options import parse_bool

    hints = get_type_hints(ExtractConfig)
    out: dict[str, Any] = {}
    for key, value in values.items():
        hint = hints[key]
        kinds = set(get_args(hint)) if isinstance(hint, types.UnionType) else {get_origin(hint) or hint}
        fix = f"Fix: write e.g. {key}: {_example(key)}"
        if value is None:
            if type(None) not in kinds:
                raise CacheError(f"{where}: {key} needs a value. {fix}")
        elif key == "cuda_graphs":
            pass  # auto | true | false, or a boolean: checked by graph_setting
        elif dict in kinds:
            if not isinstance(value, dict):
                raise CacheError(f"{where}: {key} must be a mapping of option: value. Fix: write e.g. {key}: {{seed: 1}}")
        elif bool in kinds:
            flag = parse_bool(str(value).strip())
            if flag is None:
                raise CacheError(f"{where}: {key}={value!r} is not a boolean. Fix: write {key}: true or false")
            value = flag
        elif int in kinds:
            if isinstance(value, bool) or not isinstance(value, int):
                try:
                    value = int(str(value).strip())
                except ValueError:
                    raise CacheError(f"{where}: {key}={value!r} is not a whole number. {fix}") from None
            if key in AT_LEAST and value < AT_LEAST[key]:
                raise CacheError(f"{where}: {key}={value} must be at least {AT_LEAST[key]}. {fix}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a folder called 2026
        elif not isinstance(value, str):
            raise CacheError(f"{where}: {key}={value!r} is not a string. {fix}")
        out[key] = value
    return out


def _example(key: str) -> str:
    default = ExtractConfig.__dataclass_fields__[key].default
    examples = {"cache": "./cache", "dataset": "ave", "data_root": "./data/ave", "limit": 100, "shard_clips": 16,
                "decode_processes": 4, "audio_tile": 10, "scheduler": "tcp://HOST:8786"}
    return str(examples.get(key, default if default is not None and not callable(default) else "..."))


def decode_processes_of(cfg: ExtractConfig, device_type: str) -> int:
    """Processes decoding media for a local run: ``cfg.decode_processes``, or by default one per CPU
    (at most 8) when the backbones run on a GPU, and none (threads) when they run on the CPU.

    Why the default depends on the device: PyAV holds the GIL, so decoding threads cannot keep up
    with a GPU (two were no faster than one), while on the CPU the backbones already keep every core
    busy and worker processes only add their copies (toy clips, 2 cores, median of 3: 82 % of the
    pure forward decoding in threads, 77 % in 2 processes).
    """
    from .media.pool import default_processes

    n = cfg.decode_processes
    if n is None:
        n = default_processes() if device_type != "cpu" else 0
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"--decode-processes {n!r} must be 0 (decode in threads) or more")
    return n


def graph_setting(value: str | bool) -> str:
    """``cuda_graphs`` as auto | true | false (booleans, as YAML and the flags give them, accepted)."""
    setting = ("true" if value else "false") if isinstance(value, bool) else value
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"cuda_graphs {value!r} is unknown. Fix: use auto, true or false "
                         "(--cuda-graphs / --no-cuda-graphs)")
    return setting


def graphs_of(cfg: ExtractConfig, device_type: str) -> bool:
    """Whether the backbones' batches run as CUDA graphs: ``cfg.cuda_graphs`` auto (on CUDA devices), true
    or false (YAML's booleans too). ValueError for anything else.

    Why on by default: on one H200 (2026-11-27, full-size backbones, 192 toy clips, batch 32) graphed
    extraction ran at 77 % of the pure forward against 47 % eagerly: launching ~2,400 operators a
    batch from Python capped the eager run. Each graph keeps its own memory pool (about one batch's
    activations per backbone and batch shape), so ``--no-cuda-graphs`` is the way to spare GPU memory.
    """
    setting = graph_setting(cfg.cuda_graphs)
    if setting == "true" and device_type != "cuda":
        log.warning("--cuda-graphs: the backbones run on %s, not a CUDA device; running without graphs", device_type)
    return device_type == "cuda" and setting != "false"


def parse_backbones(spec: str) -> dict[str, str]:
    """``specific`` | ``shared`` | ``tiny`` | ``tiny-shared`` | ``visual=NAME,audio=NAME``. Both modalities are
    needed: every task trains on both, so a one-sided cache would be refused only at training, after the
    extraction's hours."""
    if spec in BACKBONE_SETS:
        return dict(BACKBONE_SETS[spec])
    out: dict[str, str] = {}
    for part in spec.split(","):
        modality, sep, name = part.partition("=")
        modality, name = modality.strip(), name.strip()
        if not sep or modality not in ("visual", "audio") or not name or modality in out:
            raise BackboneError(f"--backbones {spec!r} is not understood. Fix: use one of {', '.join(BACKBONE_SETS)}, "
                                "or visual=NAME,audio=NAME (see mettle-extract --list-backbones)")
        bspec = get_backbone_spec(name)
        if bspec.modality != modality:
            raise BackboneError(f"--backbones: {name} is a {bspec.modality} backbone, not {modality}. "
                                f"Fix: write {bspec.modality}={name}")
        out[modality] = name
    missing = [m for m in ("visual", "audio") if m not in out]
    if missing:
        raise BackboneError(f"--backbones {spec!r} leaves out the {missing[0]} backbone, and every task trains on "
                            f"both modalities. Fix: add {missing[0]}=NAME (see mettle-extract --list-backbones), "
                            f"or use one of {', '.join(BACKBONE_SETS)}")
    return out


def weights_for(cfg: ExtractConfig, modality: str, name: str) -> str | None:
    """The weights file of one backbone: its modality's flag; a ``+fbank`` audio backbone of the visual
    side's own Swin shares its weights, so it falls back to ``--visual-weights``."""
    if modality == "visual":
        return cfg.visual_weights
    if cfg.audio_weights is None and name.endswith("+fbank") \
            and parse_backbones(cfg.backbones).get("visual") == name[: -len("+fbank")]:
        return cfg.visual_weights  # the very Swin the visual side loads (a mixed set keeps them apart)
    return cfg.audio_weights


AUDIO_TILE = {"avsbench-s4": 5, "avsbench-ms3": 5, "toy-avs": 5}  # the reference protocols; others tile to 10 s


def audio_tile_for(cfg: ExtractConfig) -> int:
    """Seconds HTS-AT tiles each 1-s segment to: ``cfg.audio_tile`` or the dataset's reference protocol."""
    from .backbones.htsat import TILE, check_tile

    return check_tile(cfg.audio_tile if cfg.audio_tile is not None else AUDIO_TILE.get(cfg.dataset, TILE))


def load_backbones(cfg: ExtractConfig) -> dict[str, Backbone]:
    """Build the frozen backbones of ``cfg`` (modality -> backbone), weights loaded and fingerprinted."""
    tile = audio_tile_for(cfg)
    out = {}
    for modality, name in parse_backbones(cfg.backbones).items():
        weights = weights_for(cfg, modality, name)
        if weights is not None and not Path(weights).is_file():
            flag = "--visual-weights" if modality == "visual" or cfg.audio_weights is None else "--audio-weights"
            raise BackboneError(f"{flag} {weights}: no such file. Fix: pass the path of the weights file")
        out[modality] = create_backbone(name, weights=weights, random_init=cfg.random_init)
        out[modality].set_preprocess({"tile": tile})
    return out
