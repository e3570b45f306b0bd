"""cuBLAS's workspace as mettle-train sizes it (cache/runtime.py, ``cublas_workspace``). torch's run-time
setters need a GPU, so these tests stand in for them; tests/test_gpu_train.py checks the real ones."""

import os

import pytest
import torch

from mettle.cache import runtime
from mettle.cache.runtime import CUBLAS_ENV, SMALL_WORKSPACE, cublas_workspace

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
HOPPER = 32 << 20  # torch's own size per stream on Hopper, for cuBLAS and cuBLASLt


class FakeSizes:
    """torch.backends.cuda's cublas_workspace_size / cublaslt_workspace_size: query, or set and return."""

    def __init__(self):
        self.sizes = {"cublas": HOPPER, "cublaslt": HOPPER}

    def setter(self, which):
        def size(value=None):
            if value is not None:
                self.sizes[which] = value
            return self.sizes[which]
        return size


@pytest.fixture
def fake(monkeypatch):
    for key in CUBLAS_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(runtime, "_library_sizes", None)
    monkeypatch.setattr(runtime, "_env_set", False)
    sizes = FakeSizes()
    monkeypatch.setattr(torch.backends.cuda, "cublas_workspace_size", sizes.setter("cublas"), raising=False)
    monkeypatch.setattr(torch.backends.cuda, "cublaslt_workspace_size", sizes.setter("cublaslt"), raising=False)
    return sizes


def test_auto_sets_the_small_workspace_on_cuda_only(fake):
    assert cublas_workspace("auto", CPU) == "library" and fake.sizes == {"cublas": HOPPER, "cublaslt": HOPPER}
    assert cublas_workspace("auto", CUDA) == "small"
    assert fake.sizes == {"cublas": SMALL_WORKSPACE, "cublaslt": SMALL_WORKSPACE}
    assert not any(k in os.environ for k in CUBLAS_ENV)  # set at run time: nothing leaks to child processes


def test_library_and_the_backbones_put_back_the_size_the_small_one_replaced(fake):
    """A process that trains from a cache, then end to end (bench_sweep.py), runs each with its own size."""
    assert cublas_workspace("auto", CUDA) == "small"
    assert cublas_workspace("auto", CUDA, backbones=True) == "library"
    assert fake.sizes == {"cublas": HOPPER, "cublaslt": HOPPER}
    assert cublas_workspace("small", CUDA, backbones=True) == "small" and fake.sizes["cublas"] == SMALL_WORKSPACE
    assert cublas_workspace("library", CUDA) == "library" and fake.sizes["cublas"] == HOPPER


def test_a_users_setting_is_kept_by_auto_and_library_and_replaced_by_small(fake, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:16")
    assert cublas_workspace("auto", CUDA) == "environment" and fake.sizes["cublas"] == HOPPER
    assert cublas_workspace("library", CUDA) == "environment" and fake.sizes["cublas"] == HOPPER
    assert cublas_workspace("small", CUDA) == "small" and fake.sizes["cublas"] == SMALL_WORKSPACE
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:16"


def test_without_the_run_time_setter_the_variables_are_set(fake, monkeypatch):
    """An older torch reads CUBLAS_WORKSPACE_CONFIG / CUBLASLT_WORKSPACE_SIZE at its first GPU product."""
    monkeypatch.delattr(torch.backends.cuda, "cublas_workspace_size")
    assert cublas_workspace("auto", CUDA) == "small"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:1" and os.environ["CUBLASLT_WORKSPACE_SIZE"] == "4096"
    assert cublas_workspace("auto", CUDA) == "small"  # its own variables are not the user's
    # (the fixture's delenv removes them again at teardown)


def test_an_unknown_setting_names_the_choices(fake):
    with pytest.raises(ValueError, match="cublas_workspace='tiny' is not one of auto, small, library"):
        cublas_workspace("tiny", CUDA)


def test_a_live_source_runs_the_backbones():
    from mettle.cache import TokenSource
    from mettle.extract.live import LiveSource

    assert LiveSource.runs_backbones and not TokenSource.runs_backbones
