import pytest
import torch

from adamerge.merging.task_vectors import (
    MergeError,
    add_task_vector,
    check_compatible,
    check_finite,
    flatten,
    linear_combination,
    running_sum,
    task_vector,
    unflatten,
)


def _sd(**kw):
    return {k: torch.tensor(v) for k, v in kw.items()}


def test_task_vector_add_round_trip_and_passthrough():
    base = {"w": torch.tensor([1.0, 2.0, 3.0]), "ids": torch.tensor([0, 1, 2])}
    ft = {"w": torch.tensor([1.5, 1.0, 3.25]), "ids": torch.tensor([0, 1, 2])}
    tau = task_vector(ft, base)
    assert set(tau) == {"w"}
    assert torch.equal(tau["w"], torch.tensor([0.5, -1.0, 0.25]))
    back = add_task_vector(base, tau)
    assert torch.equal(back["w"], ft["w"]) and torch.equal(back["ids"], base["ids"])
    assert torch.equal(add_task_vector(base, tau, 0.0)["w"], base["w"])  # λ=0 gives θ0
    assert torch.equal(base["w"], torch.tensor([1.0, 2.0, 3.0]))  # inputs untouched


def test_half_precision_computed_in_float32():
    base = {"w": torch.tensor([1000.0, 1.0], dtype=torch.float16)}
    ft = {"w": torch.tensor([1001.0, 1.5], dtype=torch.float16)}
    tau = task_vector(ft, base)
    assert tau["w"].dtype == torch.float16
    assert torch.equal(add_task_vector(base, tau)["w"], ft["w"])


def test_running_sum_streams_in_float32():
    taus = [{"w": torch.tensor([1000.0, 0.5], dtype=torch.float16), "ids": torch.tensor([1, 2])} for _ in range(3)]
    total, count = running_sum(t for t in taus)  # a generator: read once, one τ at a time
    assert count == 3 and set(total) == {"w"} and total["w"].dtype == torch.float32
    assert torch.equal(total["w"], torch.tensor([3000.0, 1.5]))
    base = {"w": torch.zeros(2, dtype=torch.float16)}
    assert torch.equal(add_task_vector(base, total, lam=0.5)["w"], torch.tensor([1500.0, 0.75], dtype=torch.float16))
    assert all(torch.equal(t["w"], taus[0]["w"]) for t in taus)  # inputs untouched
    with pytest.raises(MergeError, match="no task vectors"):
        running_sum([])


def test_mismatch_errors_name_key_and_shapes():
    with pytest.raises(MergeError, match=r"'w'.*\(3,\).*\(2,\)"):
        check_compatible({"w": torch.zeros(3)}, {"w": torch.zeros(2)})
    with pytest.raises(MergeError, match="missing key 'b'"):
        check_compatible({"w": torch.zeros(1), "b": torch.zeros(1)}, {"w": torch.zeros(1)})
    with pytest.raises(MergeError, match="unexpected key 'x'"):
        check_compatible({"w": torch.zeros(1)}, {"w": torch.zeros(1), "x": torch.zeros(1)})
    with pytest.raises(MergeError, match="'w' contains NaN"):
        check_finite({"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(MergeError, match="no state dict given"):
        linear_combination([], [])


def test_linear_combination_and_flatten():
    a, b = _sd(w=[1.0, 2.0], v=[[1.0]]), _sd(w=[3.0, -2.0], v=[[5.0]])
    out = linear_combination([a, b], [0.5, 0.25])
    assert torch.allclose(out["w"], torch.tensor([1.25, 0.5])) and torch.allclose(out["v"], torch.tensor([[1.75]]))
    flat = flatten(a)
    assert flat.tolist() == [1.0, 2.0, 1.0]
    assert all(torch.equal(unflatten(flat, a)[k], a[k]) for k in a)


def test_validation_that_a_broadcast_or_a_silent_truncation_would_hide():
    base = {"w": torch.zeros(2, 3)}
    with pytest.raises(MergeError, match=r"shape mismatch at key 'w': expected \(2, 3\), got \(1, 3\)"):
        add_task_vector(base, {"w": torch.ones(1, 3)})  # would broadcast over the rows
    with pytest.raises(MergeError, match="key 'x' that the pretrained state dict lacks"):
        add_task_vector(base, {"x": torch.ones(1)})
    a, b = _sd(w=[1.0, 2.0]), _sd(w=[3.0, 4.0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(MergeError, match="is not finite"):
            linear_combination([a, b], [0.5, bad])
    with pytest.raises(MergeError, match="got 1 weights for 2 state dicts"):
        linear_combination([a, b], [0.5])  # zip would drop b
    with pytest.raises(MergeError, match="state dict 1: shape mismatch"):
        linear_combination([a, _sd(w=[1.0])], [0.5, 0.5])
    like = _sd(w=[1.0, 2.0], v=[[1.0]])
    with pytest.raises(MergeError, match="vector has 4 entries, state dict needs 3"):
        unflatten(torch.arange(4.0), like)  # slicing would silently drop the last entry
    with pytest.raises(MergeError, match="vector has 2 entries, state dict needs 3"):
        unflatten(torch.arange(2.0), like)
