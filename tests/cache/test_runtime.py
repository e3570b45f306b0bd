"""cuBLAS's workspace as mettle-train sizes it (cache/runtime.py, ``cublas_workspace``)."""

import pytest
import torch

from mettle.cache.runtime import CUBLAS_SMALL, cublas_workspace

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU


@pytest.fixture
def clean_env(monkeypatch):
    for key in CUBLAS_SMALL:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_auto_sets_the_small_workspace_on_cuda_only(clean_env):
    import os

    assert cublas_workspace("auto", CPU) == "library"
    assert not any(k in os.environ for k in CUBLAS_SMALL)
    assert cublas_workspace("auto", CUDA) == "small"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:1" and os.environ["CUBLASLT_WORKSPACE_SIZE"] == "4096"


def test_a_users_setting_is_kept_by_auto_and_replaced_by_small(clean_env):
    import os

    clean_env.setenv("CUBLASLT_WORKSPACE_SIZE", "65536")
    assert cublas_workspace("auto", CUDA) == "environment"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "65536" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert cublas_workspace("library", CUDA) == "library"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "65536"
    assert cublas_workspace("small", CUDA) == "small"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "4096"


def test_an_unknown_setting_names_the_choices(clean_env):
    with pytest.raises(ValueError, match="cublas_workspace='tiny' is not one of auto, small, library"):
        cublas_workspace("tiny", CUDA)


def test_auto_keeps_the_librarys_workspace_where_the_backbones_run(clean_env):
    """End-to-end training (a live source) runs the backbones' large products: they want the full workspace."""
    import os

    from mettle.cache import TokenSource
    from mettle.extract.live import LiveSource

    assert LiveSource.runs_backbones and not TokenSource.runs_backbones
    assert cublas_workspace("auto", CUDA, backbones=True) == "library"
    assert not any(k in os.environ for k in CUBLAS_SMALL)
    assert cublas_workspace("small", CUDA, backbones=True) == "small"
