"""RegMean's closed form (adamerge.merging.regmean) against least squares and sums written out here."""

from __future__ import annotations

import pytest
import torch

from adamerge.merging.regmean import reduce_non_diagonal, regmean_merge, regmean_solve
from adamerge.merging.task_vectors import MergeError


def _problem(seed: int = 0, k: int = 3, d_in: int = 7, d_out: int = 5):
    """K experts' weights [5, 7] and inputs whose columns have task-specific scales, so each expert's
    inputs stress other directions: the least-squares merge is then far from the plain average (a
    merge that silently averages, like the released pipeline's ``grams=`` bug, fails)."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(k)]
    inputs = []
    for i in range(k):
        scale = torch.ones(d_in, dtype=torch.float64)
        scale[i::k] = 6.0
        inputs.append(torch.randn(20 + 3 * i, d_in, generator=g, dtype=torch.float64) * scale)
    return weights, inputs


def test_regmean_is_the_least_squares_solution_over_all_experts_inputs():
    weights, inputs = _problem()
    grams = [x.t() @ x for x in inputs]
    merged = regmean_solve([w.float() for w in weights], grams, alpha=1.0)
    stacked_x = torch.cat(inputs)
    stacked_y = torch.cat([x @ w.t() for x, w in zip(inputs, weights)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.t()  # argmin Σ‖XᵢWᵀ − XᵢWᵢᵀ‖²
    assert merged.dtype == torch.float32 and merged.shape == (5, 7)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)
    average = torch.stack(weights).mean(0)
    assert (merged.double() - average).abs().max() > 0.1


def test_alpha_shrinks_the_off_diagonal_of_every_gram_matrix():
    weights, inputs = _problem(seed=1)
    grams = [x.t() @ x for x in inputs]
    alpha = 0.3
    reduced = []
    for g in grams:  # G̃[i, j] = α G[i, j] off the diagonal, G[i, i] on it
        r = g.clone()
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                if i != j:
                    r[i, j] = alpha * g[i, j]
        reduced.append(r)
    expected = torch.linalg.inv(sum(reduced)) @ sum(r @ w.t() for r, w in zip(reduced, weights))
    torch.testing.assert_close(regmean_solve(weights, grams, alpha=alpha), expected.t())
    torch.testing.assert_close(reduce_non_diagonal(grams[0], alpha), reduced[0])


def test_alpha_zero_weights_each_input_column_by_its_diagonal():
    weights, inputs = _problem(seed=2)
    grams = [x.t() @ x for x in inputs]
    diag = [g.diagonal() for g in grams]
    expected = sum(w * d for w, d in zip(weights, diag)) / sum(diag)  # column j: Σᵢ Gᵢ[j,j] Wᵢ[:, j] / Σᵢ Gᵢ[j,j]
    torch.testing.assert_close(regmean_solve(weights, grams, alpha=0.0), expected)


def test_merge_solves_the_gram_keys_averages_the_rest_and_leaves_inputs_alone():
    weights, inputs = _problem(seed=3)
    g = torch.Generator().manual_seed(4)
    states = [{"lin.weight": w.float(), "lin.bias": torch.randn(5, generator=g), "ids": torch.arange(3)}
              for w in weights]
    grams = [{"lin.weight": x.t() @ x / x.shape[0]} for x in inputs]  # means, as the official code keeps them
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    gram_copies = [{k: v.clone() for k, v in d.items()} for d in grams]
    merged = regmean_merge(states, grams, alpha=0.95, names=["a", "b", "c"])
    torch.testing.assert_close(merged["lin.weight"],
                               regmean_solve([s["lin.weight"] for s in states], [d["lin.weight"] for d in grams], 0.95))
    torch.testing.assert_close(merged["lin.bias"], torch.stack([s["lin.bias"] for s in states]).mean(0))
    assert torch.equal(merged["ids"], torch.arange(3))
    for s, b in zip(states, before):
        assert all(torch.equal(s[k], b[k]) for k in s)
    for d, c in zip(grams, gram_copies):
        assert torch.equal(d["lin.weight"], c["lin.weight"])


def test_a_common_scale_of_the_gram_matrices_cancels():
    """Sums (XᵀX) or means (XᵀX / n) give the same merge when every expert saw as many rows."""
    weights, inputs = _problem(seed=5)
    inputs = [x[:20] for x in inputs]
    sums = [x.t() @ x for x in inputs]
    torch.testing.assert_close(regmean_solve(weights, sums, 0.9), regmean_solve(weights, [s / 20 for s in sums], 0.9))


def test_errors_name_the_key_and_the_task():
    weights, inputs = _problem(seed=6)
    grams = [x.t() @ x for x in inputs]
    with pytest.raises(MergeError, match=r"lin.weight: the Gram matrix of expert 'b' has shape \(6, 6\)"):
        regmean_solve(weights, [grams[0], grams[1][:6, :6], grams[2]], key="lin.weight", names=["a", "b", "c"])
    with pytest.raises(MergeError, match="alpha must lie in"):
        regmean_solve(weights, grams, alpha=1.5)
    bad = grams[2].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(MergeError, match="expert 'c' holds NaN"):
        regmean_solve(weights, [grams[0], grams[1], bad], names=["a", "b", "c"])
    rank_one = [torch.outer(x[0], x[0]) for x in inputs]  # one input row each: Σ G̃ has rank ≤ 3 < 7
    with pytest.raises(MergeError, match="lin.weight: the sum of the Gram matrices is singular"):
        regmean_solve(weights, rank_one, alpha=1.0, key="lin.weight")
    states = [{"lin.weight": w} for w in weights]
    with pytest.raises(MergeError, match="Gram matrices of expert 'b': has key 'other.weight' it should not, unlike that of expert 'a'"):
        regmean_merge(states, [{"lin.weight": grams[0]}, {"other.weight": grams[1]}, {"lin.weight": grams[2]}],
                      names=["a", "b", "c"])
    with pytest.raises(MergeError, match="key 'nope.weight', which the experts' state dicts do not have"):
        regmean_merge(states, [{"nope.weight": g} for g in grams])
    with pytest.raises(MergeError, match="3 experts, 2 sets of Gram matrices"):
        regmean_merge(states, [{"lin.weight": g} for g in grams[:2]])
