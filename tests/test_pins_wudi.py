"""Pins for WUDI-Merging (adamerge/merging/wudi.py): which keys each variant optimises and where the
optimisation runs."""

import importlib

import pytest
import torch

from adamerge.merging import MergeError
from adamerge.merging.wudi import wudi_merge, wudi_weight

wudi_module = importlib.import_module("adamerge.merging.wudi")


def _inputs():
    # "head.weight" is 2-D but not a block linear weight: only the fusionbench variant optimises it
    g = torch.Generator().manual_seed(0)
    pre = {"head.weight": torch.randn(4, 3, generator=g), "head.bias": torch.randn(4, generator=g)}
    taus = [{k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    return pre, taus


def test_fusionbench_optimises_every_matrix_and_averages_the_rest():
    pre, taus = _inputs()
    out = wudi_merge(pre, taus, variant="fusionbench", lr=1e-2, iters=5, lam=1.0)
    want_w = pre["head.weight"] + wudi_weight([t["head.weight"] for t in taus], lr=1e-2, iters=5)
    torch.testing.assert_close(out["head.weight"], want_w)
    mean_w = pre["head.weight"] + (taus[0]["head.weight"] + taus[1]["head.weight"]) / 2
    assert not torch.allclose(out["head.weight"], mean_w)  # optimised, not averaged
    torch.testing.assert_close(out["head.bias"], pre["head.bias"] + (taus[0]["head.bias"] + taus[1]["head.bias"]) / 2)
    official = wudi_merge(pre, taus, variant="official", lr=1e-2, iters=5)
    assert torch.equal(official["head.weight"], pre["head.weight"])  # not a block linear: θ_0


def test_the_optimisation_runs_on_the_device_asked(monkeypatch):
    seen = []

    def record(ts, lr, iters, device=None):
        seen.append(device)
        return torch.zeros(ts[0].shape)

    monkeypatch.setattr(wudi_module, "wudi_weight", record)
    pre, taus = _inputs()
    wudi_merge(pre, taus, variant="fusionbench", device="meta")
    wudi_merge(pre, taus, variant="fusionbench")
    assert seen == ["meta", None]


def test_argument_checks_refuse_bools_and_accept_zero_iterations():
    pre, taus = _inputs()
    with pytest.raises(MergeError, match=r"^wudi lr must be a finite number > 0, got True$"):
        wudi_merge(pre, taus, lr=True)  # a bool is an int to isinstance, and 0 < True
    with pytest.raises(MergeError, match=r"^wudi iters must be an integer >= 0, got True$"):
        wudi_merge(pre, taus, iters=True)
    # iters = 0 is allowed: no Adam step, the optimised keys keep their starting point Σ τ_i
    out = wudi_merge(pre, taus, variant="fusionbench", iters=0)
    torch.testing.assert_close(out["head.weight"], pre["head.weight"] + taus[0]["head.weight"] + taus[1]["head.weight"])


def _matrices(k=3, shape=(5, 4)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g) for _ in range(k)]


def test_wudi_weight_defaults_are_the_authors_lr_and_iterations():
    ts = _matrices()
    default = wudi_weight(ts)
    assert torch.equal(default, wudi_weight(ts, lr=1e-5, iters=300))
    assert not torch.equal(default, wudi_weight(ts, lr=1e-5, iters=301))  # one step more shows
    assert torch.equal(default, wudi_weight(ts, device="cpu"))


def test_wudi_weight_takes_one_step_at_iters_1_and_works_in_float32():
    ts = _matrices()
    start = sum(ts)
    assert torch.equal(wudi_weight(ts, iters=0), start)
    assert not torch.equal(wudi_weight(ts, iters=1), start)
    half = [t.to(torch.bfloat16) for t in ts]
    # every task vector is cast to float32 before the sums: bf16 inputs give the float32 answer of their values.
    # lr 1e-2 for 20 steps: Adam's first steps are ±lr whatever the gradient, so a few tiny steps cannot show
    # Gram matrices summed in bf16 (they differ by ~1e-2 here)
    assert torch.equal(wudi_weight(half, lr=1e-2, iters=20), wudi_weight([t.float() for t in half], lr=1e-2, iters=20))


def test_a_zero_task_vector_is_skipped_wherever_it_comes():
    ts = _matrices(2)
    zero = torch.zeros_like(ts[0])
    want = wudi_weight([ts[0], ts[1], zero], iters=4)
    assert torch.equal(wudi_weight([zero, ts[0], ts[1]], iters=4), want)
    assert not torch.equal(want, sum(ts))  # it was optimised
