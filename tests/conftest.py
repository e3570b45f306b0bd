"""Shared fixtures. Tests run offline on CPU: no hub downloads, small generated data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _gpu_tests_need_cuda(request):
    """Tests marked ``gpu`` (run with ``pytest -m gpu``) skip where no CUDA device is."""
    if request.node.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A 12-clip toy dataset with videos and the extracted frames + waves layout."""
    from mettle.manifests.toy import ToyParams, generate_toy

    return generate_toy(tmp_path_factory.mktemp("toy") / "toy", ToyParams(num_clips=12, frames=True))


@pytest.fixture(scope="session")
def toy_manifest(toy_root):
    from mettle.manifests import build_manifest

    return build_manifest("toy", data_root=str(toy_root), num_clips=12, frames=True)


@pytest.fixture(scope="session")
def small_toy_cache(toy_root, tmp_path_factory) -> Path:
    """A 6-clip AVE-format toy cache (tiny backbones): a cache without the labels other tasks need."""
    from mettle.extract.config import ExtractConfig
    from mettle.extract.run import extract

    path = tmp_path_factory.mktemp("small_toy_cache") / "cache"
    extract(ExtractConfig(dataset="toy", cache=str(path), data_root=str(toy_root),
                          manifest_options={"num_clips": 12, "frames": True}, backbones="tiny", device="cpu",
                          limit=6), progress=False)
    return path


@pytest.fixture(scope="session")
def toy48_cache(tmp_path_factory) -> Path:
    """The default 48-clip toy dataset (32 / 8 / 8) extracted with the tiny backbones; data in ``../toy``."""
    from mettle.extract.config import ExtractConfig
    from mettle.extract.run import extract

    root = tmp_path_factory.mktemp("toy48")
    extract(ExtractConfig(dataset="toy", cache=str(root / "cache"), data_root=str(root / "toy"),
                          manifest_options={"num_clips": 48, "seed": 0}, backbones="tiny", device="cpu"),
            progress=False)
    return root / "cache"
