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


# cuBLAS's workspace as mettle-train sets it on CUDA: one 4 MiB block per stream for cuBLAS (the format
# :KIB:COUNT) and 4 MiB (in KiB) for cuBLASLt. torch's own default on Hopper is 32 MiB per stream, and a
# graphed training step uses two streams (the capture's and the replay's): on an H200 the small one took
# 52 MiB off a full-size graphed step's peak at batch 1 (200 -> 148 MiB) and 49 at batch 8 (386 -> 337) for
# 1-6 % of its time (3.2 -> 3.3 ms and 9.8 -> 9.9 ms timed alone; BENCHMARKS.md, 2026-11-28). End-to-end
# training lost 17-40 % of its time under it, so extraction and the benchmarks' end-to-end mode keep the
# library's.
CUBLAS_SMALL = {"CUBLAS_WORKSPACE_CONFIG": ":4096:1", "CUBLASLT_WORKSPACE_SIZE": "4096"}
CUBLAS_WORKSPACE_CHOICES = ("auto", "small", "library")


def cublas_workspace(setting: str, device: torch.device, backbones: bool = False) -> str:
    """Size cuBLAS's workspace for this process; returns what holds: ``small``, ``library`` or ``environment``.

    ``auto``: ``small`` on CUDA unless the user set either variable of :data:`CUBLAS_SMALL` (theirs is kept:
    ``environment``) or the process runs the frozen backbones (``backbones``: end-to-end training from a
    live source, whose large products lost 17-40 % of their time under it: ``library``); ``small``: set
    them, whatever was there; ``library``: leave cuBLAS's defaults. A CPU device changes nothing
    (``library``). torch reads the variables once, when its first cuBLAS call makes a workspace: set later
    in a process that already multiplied on the GPU, they do not apply (the result then says what was
    asked, not what cuBLAS kept; there is no way to ask it).
    """
    if setting not in CUBLAS_WORKSPACE_CHOICES:
        raise ValueError(f"cublas_workspace={setting!r} is not one of {', '.join(CUBLAS_WORKSPACE_CHOICES)}. "
                         "Fix: write e.g. cublas_workspace=auto")
    if device.type != "cuda" or setting == "library" or (setting == "auto" and backbones):
        return "library"
    if setting == "auto" and any(k in os.environ for k in CUBLAS_SMALL):
        return "environment"
    os.environ.update(CUBLAS_SMALL)
    return "small"
