"""Pins for Fisher merging (adamerge/merging/fisher.py): the messages of its checks, the bounds of floor and
coefficients at their edges, and a single expert."""

import pytest
import torch

from adamerge.merging import MergeError
from adamerge.merging.fisher import fisher_merge


def _experts(k=2):
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "n": torch.tensor([1])} for _ in range(k)]
    fishers = [{"w": torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.1} for _ in range(k)]
    return states, fishers


def test_messages_of_the_count_checks():
    states, fishers = _experts()
    with pytest.raises(MergeError, match=r"^empty list of expert state dicts: need at least one$"):
        fisher_merge([], [])
    with pytest.raises(MergeError, match=r"^got 2 experts, 1 Fishers and 2 names$"):
        fisher_merge(states, fishers[:1])
    with pytest.raises(MergeError, match=r"^got 2 experts, 2 Fishers and 1 names$"):
        fisher_merge(states, fishers, names=["a"])


def test_floor_bounds():
    states, fishers = _experts()
    with pytest.raises(MergeError, match=r"^floor must be a finite number >= 0, got -1\.0$"):
        fisher_merge(states, fishers, floor=-1.0)
    out = fisher_merge(states, fishers, floor=0.0)  # 0 is allowed (the Fishers here are > 0 everywhere)
    num = sum(f["w"] / f["w"].norm() * s["w"] for s, f in zip(states, fishers))
    den = sum(f["w"] / f["w"].norm() for f in fishers)
    torch.testing.assert_close(out["w"], num / den)


def test_coefficient_bounds():
    states, fishers = _experts()
    for bad in ([0.0, 0.0], [2.0, -1.0]):  # [2, -1]: a negative weight with a positive sum
        with pytest.raises(MergeError, match=r"^coefficients must be 2 finite numbers >= 0, not all 0, got \["):
            fisher_merge(states, fishers, coefficients=bad)
    # a zero weight is allowed: expert 1 drops out, expert 0's weights are left (up to the floor's share)
    out = fisher_merge(states, fishers, coefficients=[1.0, 0.0], floor=0.0)
    torch.testing.assert_close(out["w"], states[0]["w"])


def test_one_expert_and_its_checks():
    states, fishers = _experts(1)
    out = fisher_merge(states, fishers)
    torch.testing.assert_close(out["w"], states[0]["w"])
    with pytest.raises(MergeError, match=r"^Fisher of expert '0': key 'w' has shape \(2, 3\), the weight \(3, 2\)$"):
        fisher_merge(states, [{"w": torch.ones(2, 3, dtype=torch.float64)}])
    with pytest.raises(MergeError, match=r"^Fisher of expert '0': key 'n' is not a float key of the experts$"):
        fisher_merge(states, [{"n": torch.ones(1)}])


def test_a_zero_fisher_cannot_be_normalised():
    states, fishers = _experts()
    fishers[1] = {"w": torch.zeros(3, 2, dtype=torch.float64)}
    with pytest.raises(MergeError, match=r"^the Fisher of expert '1' is zero everywhere: it cannot be normalised "
                       r"\(normalize=False merges it at the floor\)$"):
        fisher_merge(states, fishers)


def test_an_entry_no_expert_has_fisher_for_is_refused_without_a_floor():
    states, fishers = _experts()
    for f in fishers:
        f["w"][1, 0] = 0.0  # every expert's Fisher is 0 here, and floor 0 adds nothing: 0 / 0
    with pytest.raises(MergeError, match=r"^w: every expert's Fisher is 0 at some entry \(floor=0 and weights 0\); "
                       r"use floor > 0$"):
        fisher_merge(states, fishers, floor=0.0, normalize=False)
    assert bool(fisher_merge(states, fishers, floor=1e-6, normalize=False)["w"].isfinite().all())


def test_fishers_are_summed_in_float64_even_when_float32_would_overflow():
    """Two float32 Fishers at 3e38 (finite: float32's largest is 3.4e38), weighted 1 each: their sum 6e38 is
    finite in float64 only. Summed in float32 it would be inf and the merge 0 (a finite numerator over inf)."""
    states = [{"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([4.0, 5.0])}]
    fishers = [{"w": torch.full((2,), 3e38)}, {"w": torch.full((2,), 3e38)}]
    merged = fisher_merge(states, fishers, coefficients=[1.0, 1.0], normalize=False)
    assert merged["w"].dtype == torch.float32
    torch.testing.assert_close(merged["w"], torch.tensor([3.0, 2.0]))
