"""Task metrics as the reference protocols define them (one function each, tested on hand-built cases)."""

from __future__ import annotations

import torch


def segment_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """AVE: the fraction of (clip, second) pairs whose predicted class equals the label.

    ``predicted`` and ``labels`` are ``(clips, seconds)`` integer tensors; background is a class
    like any other (the AVE protocol counts background seconds).
    """
    if predicted.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ in shape")
    if labels.numel() == 0:
        raise ValueError("no segments to score")
    return float((predicted == labels).float().mean())
