"""Runtime helpers both stages use (device choice, peak memory); here because both import cache."""

from __future__ import annotations

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
