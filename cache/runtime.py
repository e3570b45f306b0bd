"""Runtime helpers both stages use (device choice, peak memory, cuBLAS's workspace); here because both import cache."""

from __future__ import annotations

import os
import resource

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device. Fix: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for CUDA, but torch sees no CUDA device. Fix: use --device cpu")
    return dev


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA max allocated on a GPU, else the process's peak resident set.

    On Linux the resident peak is read from ``VmHWM`` of this process's own address space:
    ``ru_maxrss`` survives ``exec`` and so reports the parent's peak in a freshly spawned child.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# cuBLAS's workspace as mettle-train sets it on CUDA: 4 MiB per stream for cuBLAS, and cuBLASLt's capped at
# as much (with torch's unified workspace, its default, cuBLASLt shares cuBLAS's). torch's own on Hopper is
# 32 MiB per stream, and a graphed training step uses two streams (the capture's and the replay's): on an
# H200 the small one took 52 MiB off a full-size graphed step's peak at batch 1 (200 -> 148 MiB) and 49 at
# batch 8 (386 -> 337) for 1-6 % of its time (3.2 -> 3.3 ms and 9.8 -> 9.9 ms timed alone; BENCHMARKS.md,
# 2026-11-28). End-to-end training lost 17-40 % of its time under it, so extraction, end-to-end training and
# the benchmarks' end-to-end mode keep the library's.
SMALL_WORKSPACE = 4 << 20  # bytes
CUBLAS_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:1", "CUBLASLT_WORKSPACE_SIZE": "4096"}  # the same, as torch's variables
CUBLAS_WORKSPACE_CHOICES = ("auto", "small", "library")
_library_sizes: tuple[int, int] | None = None  # cuBLAS's and cuBLASLt's sizes before the small one was set
_env_set = False  # the variables were set here (a torch without the run-time setter), not by the user


def cublas_workspace(setting: str, device: torch.device, backbones: bool = False) -> str:
    """Size cuBLAS's workspace for this process; returns what holds: ``small``, ``library`` or ``environment``.

    ``auto``: ``small`` on CUDA unless the user sized it (either variable of :data:`CUBLAS_ENV` set: theirs is
    kept, ``environment``) or the process runs the frozen backbones (``backbones``: end-to-end training from a
    live source, whose large products lost 17-40 % of their time under it); ``small``: set it, whatever the
    environment says; ``library``: cuBLAS's own size (or the environment's). A CPU device changes nothing.

    torch 2.14 sizes workspaces at run time (``torch.backends.cuda.cublas_workspace_size``: handles used after
    the change get the new size), so a later call with ``library`` puts back the size the small one replaced:
    a process that trains from a cache and then end to end (``scripts/bench_sweep.py``) runs each as it
    should. A torch without that function reads the variables at its first GPU product: they are set then,
    and a process that has already multiplied on the GPU keeps its size.
    """
    global _library_sizes, _env_set
    if setting not in CUBLAS_WORKSPACE_CHOICES:
        raise ValueError(f"cublas_workspace={setting!r} is not one of {', '.join(CUBLAS_WORKSPACE_CHOICES)}. "
                         "Fix: write e.g. cublas_workspace=auto")
    if device.type != "cuda":
        return "library"
    api = torch.backends.cuda if hasattr(torch.backends.cuda, "cublas_workspace_size") else None
    user = not _env_set and any(k in os.environ for k in CUBLAS_ENV)
    if setting == "library" or (setting == "auto" and (backbones or user)):
        if _library_sizes is not None:  # undo the small size set earlier in this process
            if api is not None:
                api.cublas_workspace_size(_library_sizes[0])
                api.cublaslt_workspace_size(_library_sizes[1])
            _library_sizes = None
        return "environment" if user else "library"
    if api is None:
        os.environ.update(CUBLAS_ENV)
        _env_set = True
        return "small"
    if _library_sizes is None:
        _library_sizes = (api.cublas_workspace_size(), api.cublaslt_workspace_size())
    api.cublas_workspace_size(SMALL_WORKSPACE)
    api.cublaslt_workspace_size(min(SMALL_WORKSPACE, _library_sizes[1]))
    return "small"
