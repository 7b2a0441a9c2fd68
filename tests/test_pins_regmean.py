"""Pins for RegMean (adamerge/merging/regmean.py) and PCB's degenerate ranges (adamerge/merging/pcb.py): messages
matched whole, the default α, one expert, float32 inputs solved in float64; a task vector of one magnitude."""

import re

import pytest
import torch

from adamerge.merging import MergeError
from adamerge.merging.pcb import pcb_merge
from adamerge.merging.regmean import reduce_non_diagonal, regmean_merge, regmean_solve


def _gram(d, seed):
    x = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x


def test_reduce_non_diagonal_default_alpha_and_shape_check():
    g = _gram(3, 0)
    want = g * 0.95
    want.diagonal().copy_(g.diagonal())
    assert torch.equal(reduce_non_diagonal(g), want)
    for bad in (torch.ones(2, 3), torch.ones(2, 2, 2)):
        with pytest.raises(MergeError, match=rf"^a Gram matrix must be square, got shape {re.escape(str(tuple(bad.shape)))}$"):
            reduce_non_diagonal(bad)


def test_regmean_solve_checks_and_messages():
    w, g = torch.ones(2, 3), _gram(3, 0)
    with pytest.raises(MergeError, match=r"^weight: need one Gram matrix and one name per weight, got 0 weights, "
                       r"0 Gram matrices, 0 names$"):
        regmean_solve([], [])
    with pytest.raises(MergeError, match=r"^weight: need one Gram matrix and one name per weight, got 2 weights, "
                       r"1 Gram matrices, 2 names$"):
        regmean_solve([w, w], [g])
    with pytest.raises(MergeError, match=r"^weight: RegMean merges 2-D weights, expert '0' has shape \(3,\)$"):
        regmean_solve([torch.ones(3)], [g])


def test_regmean_solve_of_float32_inputs_is_solved_in_float64():
    # one expert: RegMean returns its own weight; float32 Gram matrices are raised to float64 before the sums
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    out = regmean_solve([w], [_gram(3, 2).float()])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, w)


def _states(k=2):
    g = torch.Generator().manual_seed(3)
    return [{"w": torch.randn(2, 3, generator=g), "n": torch.tensor([1])} for _ in range(k)]


def test_regmean_merge_messages_and_arguments():
    with pytest.raises(MergeError, match=r"^empty list of expert state dicts: need at least one$"):
        regmean_merge([], [])
    states = _states(1)
    with pytest.raises(MergeError, match=r"^Gram matrix for key 'n', which holds torch.int64 values$"):
        regmean_merge(states, [{"n": torch.ones(1, 1)}])
    with pytest.raises(MergeError, match=r"^Gram matrix for key 'x', which the experts' state dicts do not have$"):
        regmean_merge(states, [{"x": torch.ones(1, 1)}])
    # the key and the experts' names reach the solver's messages
    states = _states(2)
    with pytest.raises(MergeError, match=r"^w: the Gram matrix of expert 'dtd' has shape \(2, 2\), the weight"):
        regmean_merge(states, [{"w": _gram(3, 0)}, {"w": torch.eye(2)}], names=["cars", "dtd"])
    # alpha reaches the solver: α = 0.5 is not the solver's default 0.95
    grams = [{"w": _gram(3, 4)}, {"w": _gram(3, 5)}]
    got = regmean_merge(states, grams, alpha=0.5)["w"]
    want = regmean_solve([s["w"] for s in states], [g["w"] for g in grams], alpha=0.5)
    assert torch.equal(got, want)
    assert not torch.equal(got, regmean_solve([s["w"] for s in states], [g["w"] for g in grams]))


def test_regmean_merge_of_one_expert():
    states = _states(1)
    out = regmean_merge(states, [{"w": _gram(3, 6)}])
    torch.testing.assert_close(out["w"], states[0]["w"])
    assert torch.equal(out["n"], states[0]["n"])


def test_pcb_with_a_task_vector_of_one_magnitude_stays_finite():
    # |τ_1| is one value everywhere: its clamp bounds coincide (lo = hi), where min-max scaling would divide
    # 0 by 0; the module's documented choice is 0 there (the reference code gives NaN)
    pre = {"w": torch.zeros(4, 5)}
    t1 = {"w": torch.tensor([0.3, -0.3]).repeat(10).view(4, 5)}
    t2 = {"w": torch.randn(4, 5, generator=torch.Generator().manual_seed(0))}
    for taus in ([t1, t2], [t1]):
        assert bool(pcb_merge(pre, taus, keep=0.5)["w"].isfinite().all())


@pytest.mark.parametrize("diag", [
    [1.0, 2e-16],                  # smallest pivot² 2e-16 ≤ tol = max · d · eps = 4.4e-16 (tol / d would pass it)
    [1.0, 1.0, 1.0, 2.0 ** -50],   # pivot² exactly tol = 4 · 2^-52: "≤", not "<"
])
def test_a_numerically_singular_sum_is_refused_at_the_documented_tolerance(diag):
    g = torch.diag(torch.tensor(diag, dtype=torch.float64))
    with pytest.raises(MergeError, match=rf"^weight: the sum of the Gram matrices is singular \(fewer input rows "
                       rf"than its width {len(diag)}, or inputs that never vary\); gather more batches or lower alpha$"):
        regmean_solve([torch.ones(2, len(diag), dtype=torch.float64)], [g], alpha=1.0)


@pytest.mark.parametrize("gram", [[[-1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]], ids=["first", "second"])
def test_a_cholesky_failure_is_refused_whatever_pivot_fails(gram):
    # an indefinite "Gram matrix" (e.g. a corrupted file): Cholesky fails at pivot 1 or 2 while the pivots it
    # did compute are large, so only the failure flag tells
    with pytest.raises(MergeError, match=r"^weight: the sum of the Gram matrices is singular"):
        regmean_solve([torch.ones(2, 2, dtype=torch.float64)], [torch.tensor(gram, dtype=torch.float64)], alpha=1.0)
