"""Pins for the small components (adamerge/components/losses.py): entropy on every rank of input."""

import math

import pytest
import torch

from adamerge.components.losses import entropy


def _by_hand(row):
    p = torch.softmax(row.double(), 0)
    return float(-(p * p.log()).sum())


def test_entropy_of_one_vector_and_of_a_three_dimensional_batch():
    # classes are the last dim whatever the rank: 1-D [C] → a scalar, [B, T, C] (an LLM's logits) → [B, T];
    # dim 1 is the class dim only for 2-D inputs
    assert float(entropy(torch.zeros(2))) == pytest.approx(math.log(2))
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    got = entropy(logits)
    assert got.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            assert float(got[b, t]) == pytest.approx(_by_hand(logits[b, t]), rel=1e-5)


def test_entropy_needs_a_class_dimension():
    with pytest.raises(ValueError, match=r"^entropy needs logits with a non-empty class dimension, got shape \(\)$"):
        entropy(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"got shape \(2, 0\)$"):
        entropy(torch.zeros(2, 0))
    assert entropy(torch.zeros(2, 0, 5)).shape == (2, 0)  # no rows is fine: the class dim (5) is not empty
