"""Task arithmetic and weight averaging (adamerge/merging/task_arithmetic.py, weight_averaging.py) pinned
against sums written out here: the documented defaults (λ = 0.3, DARE seed 0), the order-free sum, the
θ_0 dtype of the result, the validation each runs, and the lazy task-vector sequence AdaMerging reads.
Task vectors differ per entry and per task, so a dropped, doubled or reordered τ_k changes the result."""

from __future__ import annotations

import pytest
import torch

from adamerge.merging.dare import dare_all
from adamerge.merging.task_arithmetic import task_arithmetic, task_arithmetic_directions
from adamerge.merging.task_vectors import MergeError
from adamerge.merging.weight_averaging import weight_average

PRE = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5]), "ids": torch.tensor([3, 4])}
TAUS = [{"w": torch.tensor([[1.0, 0.0], [0.0, -4.0]]), "b": torch.tensor([0.0, 2.0])},
        {"w": torch.tensor([[-1.0, 0.5], [2.0, 0.0]]), "b": torch.tensor([1.0, 0.0])}]


def test_task_arithmetic_default_lambda_is_0_3():
    got = task_arithmetic(PRE, TAUS)
    want_w = torch.tensor([[1.0 + 0.3 * 0.0, 2.0 + 0.3 * 0.5], [3.0 + 0.3 * 2.0, 4.0 + 0.3 * -4.0]])
    torch.testing.assert_close(got["w"], want_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["b"], torch.tensor([0.5 + 0.3, -0.5 + 0.6]), rtol=0, atol=1e-6)
    assert torch.equal(got["ids"], PRE["ids"])
    assert torch.equal(task_arithmetic(PRE, TAUS, lam=0)["w"], PRE["w"])
    torch.testing.assert_close(task_arithmetic(PRE, TAUS, lam=2.0)["b"], torch.tensor([2.5, 3.5]), rtol=0, atol=0)


def test_task_arithmetic_returns_theta0_dtypes():
    pre = {k: (v.half() if v.is_floating_point() else v) for k, v in PRE.items()}
    got = task_arithmetic(pre, TAUS, lam=1.0)
    assert got["w"].dtype == torch.float16 and got["ids"].dtype == torch.int64
    assert torch.equal(got["w"], torch.tensor([[1.0, 2.5], [5.0, 0.0]], dtype=torch.float16))


def test_task_arithmetic_dare_defaults_to_seed_0():
    torch.manual_seed(3)
    pre = {"w": torch.randn(64, 32)}
    taus = [{"w": torch.randn(64, 32)} for _ in range(3)]
    dropped = dare_all(taus, drop=0.5, seed=0)
    want = pre["w"] + 0.3 * (dropped[0]["w"] + dropped[1]["w"] + dropped[2]["w"])
    got = task_arithmetic(pre, taus, dare=0.5)
    torch.testing.assert_close(got["w"], want, rtol=0, atol=1e-5)
    other = task_arithmetic(pre, taus, dare=0.5, seed=1)["w"]
    assert not torch.allclose(other, want)
    torch.testing.assert_close(other, task_arithmetic(pre, taus, lam=0.3, dare=0.5, seed=1)["w"], rtol=0, atol=0)
    # without dare nothing is dropped
    torch.testing.assert_close(task_arithmetic(pre, taus)["w"],
                               pre["w"] + 0.3 * (taus[0]["w"] + taus[1]["w"] + taus[2]["w"]), rtol=0, atol=1e-5)


def test_task_arithmetic_validates_its_inputs():
    with pytest.raises(MergeError) as err:
        task_arithmetic(PRE, TAUS, lam=-0.1)
    assert str(err.value) == "lam must be a finite number >= 0, got -0.1"
    with pytest.raises(MergeError) as err:
        task_arithmetic(PRE, [])
    assert str(err.value) == "empty list of task vectors: need at least one"
    with pytest.raises(MergeError) as err:
        task_arithmetic(PRE, [TAUS[0], {"w": TAUS[1]["w"], "b": torch.tensor([float("nan"), 0.0])}])
    assert str(err.value) == "task vector 1: key 'b' contains NaN values"
    with pytest.raises(MergeError) as err:
        task_arithmetic({"w": PRE["w"]}, TAUS)
    assert str(err.value) == "task vector key 'b' is missing from the pretrained state dict"
    with pytest.raises(MergeError, match=r"dare drop rate must lie in \[0, 1\)"):
        task_arithmetic(PRE, TAUS, dare=1.0)


def test_weight_average_is_the_mean_in_the_experts_dtype():
    experts = [{"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([7])},
               {"w": torch.tensor([3.0, 4.0]), "ids": torch.tensor([8])},
               {"w": torch.tensor([5.0, 9.0]), "ids": torch.tensor([9])}]
    got = weight_average(experts)
    torch.testing.assert_close(got["w"], torch.tensor([3.0, 5.0]), rtol=0, atol=1e-6)
    assert torch.equal(got["ids"], torch.tensor([7]))  # non-float keys from the first
    half = weight_average([{"w": e["w"].half()} for e in experts[:2]])
    assert half["w"].dtype == torch.float16 and torch.equal(half["w"], torch.tensor([2.0, 3.0], dtype=torch.float16))
    with pytest.raises(MergeError) as err:
        weight_average([])
    assert str(err.value) == "empty list of state dicts: need at least one"
    with pytest.raises(MergeError) as err:
        weight_average(experts[0])
    assert str(err.value) == "expected a list of state dicts, got a single state dict"
    with pytest.raises(MergeError, match=r"^state dict 1: key 'w' contains Inf values$"):
        weight_average([experts[0], {"w": torch.tensor([1.0, float("inf")]), "ids": torch.tensor([1])}])


class Pool:
    tasks = ("a", "b", "c")

    def __init__(self):
        self.reads = []

    def pretrained_state(self):
        return {"w": torch.zeros(2)}

    def task_vectors(self, tasks=None):
        for t in self.tasks if tasks is None else tasks:
            self.reads.append(t)
            yield t, {"w": torch.full((2,), float(ord(t) - ord("a") + 1))}


def test_task_arithmetic_directions_are_read_lazily_by_index_and_slice():
    pool = Pool()
    origin, dirs = task_arithmetic_directions(pool, ["c", "a", "b"])
    assert torch.equal(origin["w"], torch.zeros(2)) and pool.reads == []
    assert len(dirs) == 3
    assert dirs[0]["w"].tolist() == [3.0, 3.0] and pool.reads == ["c"]
    assert dirs[-1]["w"].tolist() == [2.0, 2.0] and pool.reads == ["c", "b"]
    assert [d["w"][0].item() for d in dirs[1:]] == [1.0, 2.0]
    assert [d["w"][0].item() for d in dirs[::2]] == [3.0, 2.0]
    assert [d["w"][0].item() for d in dirs] == [3.0, 1.0, 2.0]  # iteration goes through __getitem__
    origin, dirs = task_arithmetic_directions(Pool())  # default: the pool's tasks
    assert len(dirs) == 3 and dirs[2]["w"].tolist() == [3.0, 3.0]
    with pytest.raises(IndexError):
        dirs[3]
