"""Weight averaging and task arithmetic against numbers written out in the test."""

import copy

import pytest
import torch

from adamerge.merging import MergeError, dare_all, task_arithmetic, weight_average

PRE = {
    "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
    "b": torch.tensor([0.5, -0.5]),
    "ids": torch.tensor([0, 1, 2]),
}
EXPERTS = [
    {
        "w": torch.tensor([[2.0, 2.0], [3.0, 0.0]]),
        "b": torch.tensor([0.5, 1.5]),
        "ids": torch.tensor([0, 1, 2]),
    },
    {
        "w": torch.tensor([[0.0, 2.0], [5.0, 4.0]]),
        "b": torch.tensor([1.5, -0.5]),
        "ids": torch.tensor([0, 1, 2]),
    },
]
TAUS = [
    {k: e[k] - PRE[k] for k in ("w", "b")} for e in EXPERTS
]  # [[1,0],[0,-4]],[0,2] and [[-1,0],[2,0]],[1,0]


def test_weight_average_numbers():
    out = weight_average(EXPERTS)
    assert torch.equal(out["w"], torch.tensor([[1.0, 2.0], [4.0, 2.0]]))
    assert torch.equal(out["b"], torch.tensor([1.0, 0.5]))
    assert torch.equal(out["ids"], torch.tensor([0, 1, 2]))


def test_weight_average_of_identical_experts_is_that_expert():
    out = weight_average([EXPERTS[0]] * 3)
    for k in PRE:
        assert torch.equal(out[k], EXPERTS[0][k])


def test_weight_average_half_in_float32():
    a = {"w": torch.tensor([1000.0, 1.0], dtype=torch.float16)}
    b = {"w": torch.tensor([1001.0, 2.0], dtype=torch.float16)}
    out = weight_average([a, b])
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.tensor([1000.5, 1.5]).half())


def test_task_arithmetic_numbers():
    out = task_arithmetic(PRE, TAUS, lam=0.5)
    # Σ τ = [[0, 0], [2, -4]], [1, 2]
    assert torch.allclose(out["w"], torch.tensor([[1.0, 2.0], [4.0, 2.0]]))
    assert torch.allclose(out["b"], torch.tensor([1.0, 0.5]))
    assert torch.equal(out["ids"], PRE["ids"])


def test_task_arithmetic_lambda_zero_and_no_mutation():
    before = copy.deepcopy((PRE, TAUS))
    out = task_arithmetic(PRE, TAUS, lam=0.0)
    for k, v in PRE.items():
        assert torch.equal(out[k], v) and out[k] is not v
    for a, b in zip(before[1], TAUS):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(before[0][k], PRE[k]) for k in PRE)


def test_task_arithmetic_with_dare_is_dare_then_sum():
    got = task_arithmetic(PRE, TAUS, lam=0.3, dare=0.5, seed=7)
    d = dare_all(TAUS, drop=0.5, seed=7)
    for k in ("w", "b"):
        assert torch.allclose(got[k], PRE[k] + 0.3 * (d[0][k] + d[1][k]))


@pytest.mark.parametrize("lam", [-1.0, float("nan"), float("inf")])
def test_task_arithmetic_bad_lambda(lam):
    with pytest.raises(MergeError, match="lam must be a finite number >= 0"):
        task_arithmetic(PRE, TAUS, lam=lam)


def test_bad_lists():
    with pytest.raises(MergeError, match="empty list of state dicts"):
        weight_average([])
    with pytest.raises(MergeError, match="empty list of task vectors"):
        task_arithmetic(PRE, [])
    with pytest.raises(MergeError, match="state dict 1 is missing key 'b'"):
        weight_average([EXPERTS[0], {"w": EXPERTS[1]["w"], "ids": EXPERTS[1]["ids"]}])
    with pytest.raises(
        MergeError, match=r"shape mismatch at key 'w': pretrained \(2, 2\), task vector \(4,\)"
    ):
        task_arithmetic(PRE, [{"w": torch.zeros(4), "b": torch.zeros(2)}])
    with pytest.raises(MergeError, match="task vector 0: key 'w' contains Inf"):
        task_arithmetic(PRE, [{"w": torch.full((2, 2), float("inf")), "b": torch.zeros(2)}])
    with pytest.raises(MergeError, match="pretrained state dict: key 'b' contains NaN"):
        task_arithmetic(dict(PRE, b=torch.tensor([float("nan"), 0.0])), TAUS)
    with pytest.raises(MergeError, match="single state dict"):
        weight_average(EXPERTS[0])
