"""Pins for TALL masks / Consensus merging (adamerge/merging/consensus.py): the documented defaults against a
computation by hand, a single task (nothing may index a second one), and the streamed pool's checks."""

import pytest
import torch
from conftest import ListPool

from adamerge.merging import MergeError
from adamerge.merging.consensus import consensus_mask, consensus_ta, consensus_ta_pool, tall_masks

# Entries chosen so that λ = 0.6 and the mutants' λ = 1.6 disagree: |τ_t| / |τ_MTL − τ_t| lies between 0.6
# and 1.6 for several of them, and so that 2 of 3 tasks claim some entries (k = 2 vs 3 differ).
PRE = {"w": torch.zeros(2, 3), "n": torch.tensor([1, 2])}
TAUS = [
    {"w": torch.tensor([[1.0, 0.1, 2.0], [0.5, -1.0, 0.3]]), "n": torch.tensor([0, 0])},
    {"w": torch.tensor([[1.0, 0.2, -0.5], [0.6, -1.2, 0.1]]), "n": torch.tensor([0, 0])},
    {"w": torch.tensor([[0.2, 1.5, 1.0], [-0.1, 0.9, 0.2]]), "n": torch.tensor([0, 0])},
]


def _by_hand_masks(lam):
    total = sum(t["w"] for t in TAUS)
    return [t["w"].abs() > lam * (total - t["w"]).abs() for t in TAUS]


def test_tall_mask_default_lambda_is_0_6():
    want = _by_hand_masks(0.6)
    assert not all(torch.equal(a, b) for a, b in zip(want, _by_hand_masks(1.6)))  # the data tells them apart
    got = tall_masks(PRE, TAUS)
    assert all(torch.equal(g["w"], w) for g, w in zip(got, want)) and all(set(g) == {"w"} for g in got)


def test_consensus_ta_defaults_by_hand():
    # k = 2, λ = 0.6, α = 0.3: θ_0 + 0.3 · [Σ m_t ≥ 2] ⊙ Σ τ_t
    claims = sum(m.to(torch.int64) for m in _by_hand_masks(0.6))
    assert bool((claims == 2).any())  # k = 2 and k = 3 differ here
    want = 0.3 * (claims >= 2) * sum(t["w"] for t in TAUS)
    out = consensus_ta(PRE, TAUS)
    torch.testing.assert_close(out["w"], want)
    assert torch.equal(out["n"], PRE["n"])
    mask = consensus_mask(tall_masks(PRE, TAUS))  # the default k is 2 here too
    assert torch.equal(mask["w"], claims >= 2)


def test_one_task():
    tau = TAUS[0]
    (mask,) = tall_masks(PRE, [tau], lam=0.6)
    assert torch.equal(mask["w"], tau["w"] != 0)  # τ_MTL = τ: |τ| > 0.6 · 0
    assert torch.equal(consensus_mask([mask], k=1)["w"], mask["w"])
    with pytest.raises(MergeError, match=r"^merged multi-task vector: shape mismatch at key 'w': expected "
                       r"\(2, 3\), got \(3, 2\)$"):
        tall_masks(PRE, [tau], merged={"w": torch.zeros(3, 2)})


def test_the_pool_checks_its_first_task_vector_and_names_each_one():
    # One task: the pool's stream is checked against θ_0 at its first task vector (there is no second).
    wrong = {"w": torch.zeros(3, 2), "n": torch.tensor([0, 0])}
    with pytest.raises(MergeError, match=r"^shape mismatch at key 'w': pretrained \(2, 3\), task vector \(3, 2\)$"):
        consensus_ta_pool(ListPool(PRE, [wrong]))
    bad = {"w": torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]), "n": torch.tensor([0, 0])}
    with pytest.raises(MergeError, match=r"^task vector 1: key 'w' contains NaN values$"):
        consensus_ta_pool(ListPool(PRE, [TAUS[0], bad]))


class _ChangingPool(ListPool):
    """A pool whose second pass yields one task vector more than its first (e.g. an expert added meanwhile)."""

    def __init__(self, pretrained, taus):
        super().__init__(pretrained, taus)
        self.passes = 0

    def task_vectors(self, tasks=None):
        self.passes += 1
        yield from super().task_vectors(tasks) if self.passes > 1 else list(super().task_vectors(tasks))[:-1]


def test_a_pool_that_changes_between_the_two_passes_is_refused():
    # λ_t are matched to the second pass's task vectors one to one; an extra task vector must not be dropped
    with pytest.raises(ValueError, match="zip"):
        consensus_ta_pool(_ChangingPool(PRE, TAUS))
