"""DARE drop-and-rescale: the documented RNG contract re-derived in the test, and its statistics."""

import pytest
import torch

from adamerge.merging import MergeError, dare, dare_all


def test_masks_follow_documented_rng_contract():
    tau = {"a": torch.arange(1.0, 13.0).reshape(3, 4), "ids": torch.arange(3), "b": torch.tensor([-2.0, 4.0])}
    out = dare(tau, drop=0.75, seed=5)
    g = torch.Generator().manual_seed(5)
    keep_a = torch.rand((3, 4), generator=g) >= 0.75
    keep_b = torch.rand((2,), generator=g) >= 0.75
    assert torch.equal(out["a"], torch.where(keep_a, tau["a"] * 4.0, torch.zeros(())))
    assert torch.equal(out["b"], torch.where(keep_b, tau["b"] * 4.0, torch.zeros(())))
    assert torch.equal(out["ids"], tau["ids"])
    assert torch.equal(tau["a"], torch.arange(1.0, 13.0).reshape(3, 4))  # input untouched


def test_drop_rate_and_unbiasedness():
    base = torch.tensor([1.0, -2.0, 0.5, 3.0])
    tau = {"w": base.repeat(20000, 1)}
    out = dare(tau, drop=0.9, seed=0)["w"]
    dropped = float((out == 0).float().mean())
    assert abs(dropped - 0.9) < 0.01
    assert torch.allclose(
        out[out != 0].abs().unique().sort().values, (base.abs() * 10).unique().sort().values
    )
    assert torch.allclose(out.mean(0), base, atol=0.15)  # E[τ̃] = τ (sd of the mean ≈ 0.02·|τ|·10)


def test_drop_zero_identity_and_seeds():
    tau = {"w": torch.randn(5, 5)}
    assert torch.equal(dare(tau, drop=0.0)["w"], tau["w"])
    assert torch.equal(dare(tau, 0.5, seed=1)["w"], dare(tau, 0.5, seed=1)["w"])
    assert not torch.equal(dare(tau, 0.5, seed=1)["w"], dare(tau, 0.5, seed=2)["w"])
    a, b = dare_all([tau, tau], drop=0.5, seed=3)
    assert not torch.equal(a["w"], b["w"])  # one generator: each task vector gets its own mask


def test_half_in_float32():
    tau = {"w": torch.tensor([1.0, 3.0], dtype=torch.float16)}
    out = dare(tau, drop=0.5, seed=0)["w"]
    assert out.dtype == torch.float16 and set(out.tolist()) <= {0.0, 2.0, 6.0}


@pytest.mark.parametrize("drop", [1.0, -0.1, 1.5, float("nan")])
def test_bad_drop(drop):
    with pytest.raises(MergeError, match=r"dare drop rate must lie in \[0, 1\)"):
        dare({"w": torch.ones(3)}, drop=drop)


def test_bad_inputs():
    with pytest.raises(MergeError, match="either seed or generator"):
        dare({"w": torch.ones(3)}, seed=1, generator=torch.Generator())
    with pytest.raises(MergeError, match="key 'w' contains NaN"):
        dare({"w": torch.tensor([float("nan")])})
    with pytest.raises(MergeError, match="empty list of task vectors"):
        dare_all([])


def test_the_documented_defaults_drop_0_9_with_seed_0():
    # dare's docstring: drop 0.9, and seed 0 when neither seed nor generator is given; dare_all and
    # dare_each default to seed 0 too (a generator seeded 1 draws other masks, so a changed default shows)
    tau = {"w": torch.randn(40, 30, generator=torch.Generator().manual_seed(9))}
    g = torch.Generator().manual_seed(0)
    want = tau["w"] * (torch.rand(40, 30, generator=g) >= 0.9) / 0.1
    torch.testing.assert_close(dare(tau)["w"], want)
    assert not torch.equal(dare(tau, seed=1)["w"], want)
    torch.testing.assert_close(dare_all([tau])[0]["w"], want)
    from adamerge.merging.dare import dare_each

    torch.testing.assert_close(next(dare_each([tau]))["w"], want)
