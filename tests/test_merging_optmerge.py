"""OptMerge against a numpy SGD-with-momentum loop using the loss's gradient written out by hand."""

import copy

import numpy as np
import pytest
import torch

from adamerge.merging import MergeError, optmerge


def _setup(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "fc.weight": torch.randn(5, 4, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "ids": torch.arange(2),
    }
    taus = [
        {"fc.weight": torch.randn(5, 4, generator=g), "fc.bias": torch.randn(5, generator=g)}
        for _ in range(n)
    ]
    return pre, taus


def _numpy_optmerge(taus, lr, momentum, iters):
    """grad = Σ_i 2 (τ − τ̂_i) L_iᵀ L_i / ‖τ_i‖², torch.optim.SGD's momentum rule (buf = μ·buf + g)."""
    m, n = taus[0].shape
    k = max(1, min(m, n) // len(taus))
    terms = []
    for t in taus:
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        lk = np.diag(s[:k]) @ vt[:k]
        terms.append((u[:, :k] @ lk, lk, (t**2).sum()))
    tau = np.mean(taus, axis=0)
    buf = np.zeros_like(tau)
    for _ in range(iters):
        grad = sum(2 * (tau - th) @ lk.T @ lk / ns for th, lk, ns in terms)
        buf = momentum * buf + grad
        tau = tau - lr * buf
    return tau


def _loss(tau, taus):
    k = max(1, min(tau.shape) // len(taus))
    total = 0.0
    for t in taus:
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        lk = np.diag(s[:k]) @ vt[:k]
        total += (((tau - u[:, :k] @ lk) @ lk.T) ** 2).sum() / (t**2).sum()
    return total


@pytest.mark.parametrize("lr,momentum,iters", [(0.05, 0.9, 25), (0.1, 0.0, 10), (1e-4, 0.9, 300)])
def test_matches_numpy_sgd(lr, momentum, iters):
    pre, taus = _setup()
    ws = [t["fc.weight"].double().numpy() for t in taus]
    want = pre["fc.weight"].double().numpy() + _numpy_optmerge(ws, lr, momentum, iters)
    out = optmerge(pre, taus, lr=lr, momentum=momentum, iters=iters)
    assert np.allclose(out["fc.weight"].double().numpy(), want, atol=1e-5)
    # the bias is not a 2-D weight: mean task vector
    assert torch.allclose(out["fc.bias"], pre["fc.bias"] + sum(t["fc.bias"] for t in taus) / 3, atol=1e-6)
    assert torch.equal(out["ids"], pre["ids"])


def test_optimisation_lowers_the_loss_and_zero_iters_is_the_mean():
    pre, taus = _setup()
    ws = [t["fc.weight"].double().numpy() for t in taus]
    start = optmerge(pre, taus, iters=0)
    assert torch.allclose(
        start["fc.weight"], pre["fc.weight"] + sum(t["fc.weight"] for t in taus) / 3, atol=1e-6
    )
    tuned = optmerge(pre, taus, lr=0.05, iters=50)
    loss0 = _loss((start["fc.weight"] - pre["fc.weight"]).double().numpy(), ws)
    loss1 = _loss((tuned["fc.weight"] - pre["fc.weight"]).double().numpy(), ws)
    assert loss1 < 0.5 * loss0


def test_lambda_no_mutation_half_and_zero_task_vector():
    pre, taus = _setup()
    before = copy.deepcopy(taus)
    out = optmerge(pre, taus, lam=0.0, iters=5)
    assert all(torch.equal(out[k], pre[k]) for k in pre)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, taus) for k in a)
    zero = {k: torch.zeros_like(v) for k, v in taus[0].items()}  # no loss term, no division by zero
    assert torch.isfinite(optmerge(pre, [zero, taus[1]], iters=5)["fc.weight"]).all()
    half = optmerge(
        {k: v.half() if v.is_floating_point() else v for k, v in pre.items()},
        [{k: v.half() for k, v in t.items()} for t in taus],
        iters=3,
    )
    assert half["fc.weight"].dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"momentum": 1.0}, r"momentum must lie in \[0, 1\)"),
        ({"iters": -1}, "iters must be an integer >= 0"),
        ({"iters": 2.5}, "iters must be an integer >= 0"),
        ({"lam": float("nan")}, "lam must be a finite number >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    pre, taus = _setup()
    with pytest.raises(MergeError, match=match):
        optmerge(pre, taus, **kwargs)


def test_bad_task_vectors():
    pre, taus = _setup()
    with pytest.raises(MergeError, match="empty list"):
        optmerge(pre, [])
    with pytest.raises(MergeError, match="task vector 1: key 'fc.weight' contains NaN"):
        optmerge(pre, [taus[0], dict(taus[1], **{"fc.weight": torch.full((5, 4), float("nan"))})])
