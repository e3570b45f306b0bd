"""AVE accuracy on hand-built cases."""

import pytest
import torch

from mettle.train.metrics import segment_accuracy


def test_ave_accuracy_cases():
    labels = torch.tensor([[0, 0, 28, 28], [3, 28, 28, 3]])
    assert segment_accuracy(labels.clone(), labels) == 1.0  # all right
    assert segment_accuracy((labels + 1) % 29, labels) == 0.0  # all wrong
    background = torch.full_like(labels, 28)
    assert segment_accuracy(background, labels) == pytest.approx(4 / 8)  # background-only predictions
    with pytest.raises(ValueError, match="shape"):
        segment_accuracy(labels[:1], labels)
