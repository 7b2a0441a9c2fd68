"""Pins for the small components: entropy (losses.py) on every rank of input; WEMoE's weight-ensembling MLP (wemoe_mlp.py)."""

import math

import pytest
import torch

from adamerge.components.losses import entropy


def _by_hand(row):
    p = torch.softmax(row.double(), 0)
    return float(-(p * p.log()).sum())


def test_entropy_of_one_vector_and_of_a_three_dimensional_batch():
    # classes are the last dim whatever the rank: 1-D [C] → a scalar, [B, T, C] (an LLM's logits) → [B, T];
    # dim 1 is the class dim only for 2-D inputs
    assert float(entropy(torch.zeros(2))) == pytest.approx(math.log(2))
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    got = entropy(logits)
    assert got.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            assert float(got[b, t]) == pytest.approx(_by_hand(logits[b, t]), rel=1e-5)


def test_entropy_needs_a_class_dimension():
    with pytest.raises(ValueError, match=r"^entropy needs logits with a non-empty class dimension, got shape \(\)$"):
        entropy(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"got shape \(2, 0\)$"):
        entropy(torch.zeros(2, 0))
    assert entropy(torch.zeros(2, 0, 5)).shape == (2, 0)  # no rows is fine: the class dim (5) is not empty


# ---- WEMoE's weight-ensembling MLP (adamerge/components/wemoe_mlp.py) -----------------------------------
def _ensembling_mlp(router_dtype=torch.float32):
    from torch import nn

    from adamerge.components.wemoe_mlp import WeightEnsemblingMLP, build_router

    torch.manual_seed(0)
    mlp = nn.Sequential()
    mlp.add_module("c_fc", nn.Linear(4, 6))
    mlp.add_module("gelu", nn.GELU())
    mlp.add_module("c_proj", nn.Linear(6, 4))
    taus = {"fc": (torch.randn(2, 6, 4) * 0.1, torch.randn(2, 6) * 0.1),
            "proj": (torch.randn(2, 4, 6) * 0.1, torch.randn(2, 4) * 0.1)}
    return WeightEnsemblingMLP(mlp, taus, build_router(4, 2).to(router_dtype))


@pytest.mark.parametrize(("batch", "tokens", "calls"), [(5, 1, 3), (5, 3, 3), (2, 3, 1), (1, 3, 1)])
def test_per_sample_merging_is_chunked_over_the_batch_dimension(batch, tokens, calls):
    # chunk_size 2 bounds how many samples' weights are merged at once: ⌈B / 2⌉ MLP calls when B > 2, one
    # otherwise; the token count (1 or 3, either side of 2) must not matter. Chunking changes no value.
    module = _ensembling_mlp()
    x = torch.randn(batch, tokens, 4, generator=torch.Generator().manual_seed(1))
    whole = module(x)
    module.chunk_size = 2
    seen = []
    inner = module._mlp
    module._mlp = lambda xc, rc: seen.append(xc.shape[0]) or inner(xc, rc)
    torch.testing.assert_close(module(x), whole)
    assert len(seen) == calls and sum(seen) == batch


def test_routing_runs_in_the_routers_dtype():
    module = _ensembling_mlp(torch.float64)
    r = module.routing_weights(torch.randn(3, 2, 4))  # float32 tokens into a float64 router
    assert r.dtype == torch.float64 and r.shape == (3, 2)


@pytest.mark.parametrize("impl", ["weights", "experts"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_ensemble_linear_computes_in_the_inputs_dtype(impl, per_sample):
    # float64 inputs, float32 weights and routing: everything is cast to the inputs' dtype first (a float32
    # operand left in would be refused by addmm / baddbmm / linear), and the answer is the float64 formula
    from adamerge.components.wemoe_mlp import ensemble_linear

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    w0, b0 = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    tau_w, tau_b = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, generator=g)
    r = torch.rand(3, 2, generator=g) if per_sample else torch.rand(2, generator=g)
    got = ensemble_linear(x, w0, b0, tau_w, tau_b, r, impl)
    assert got.dtype == torch.float64
    rr = r.double() if per_sample else r.double().expand(3, 2)
    w = w0.double() + torch.einsum("bk,koi->boi", rr, tau_w.double())
    b = b0.double() + rr @ tau_b.double()
    torch.testing.assert_close(got, torch.einsum("bti,boi->bto", x, w) + b[:, None, :])


def test_ensemble_linear_names_an_unknown_impl():
    from adamerge.components.wemoe_mlp import WEMoEError, ensemble_linear

    with pytest.raises(WEMoEError, match=r"^unknown impl 'fused': expected 'weights' or 'experts'$"):
        ensemble_linear(torch.ones(1, 1, 2), torch.ones(3, 2), torch.ones(3), torch.ones(1, 3, 2), torch.ones(1, 3),
                        torch.ones(1, 1), "fused")


def test_the_mlp_uses_its_impl_for_both_linears(monkeypatch):
    import importlib

    mlp_module = importlib.import_module("adamerge.components.wemoe_mlp")
    module = _ensembling_mlp()
    module.impl = "experts"
    seen = []
    real = mlp_module.ensemble_linear
    monkeypatch.setattr(mlp_module, "ensemble_linear", lambda *a: seen.append(a[-1]) or real(*a))
    module(torch.randn(2, 3, 4))
    assert seen == ["experts", "experts"]


def test_prune_top_magnitude_bounds_and_empty_tensors():
    from adamerge.components.wemoe_mlp import WEMoEError, prune_top_magnitude

    with pytest.raises(WEMoEError, match=r"^keep must be in \(0, 1\], got 1.5$"):
        prune_top_magnitude(torch.ones(3), 1.5)
    assert prune_top_magnitude(torch.zeros(0), 0.5).shape == (0,)  # nothing to keep: no top-1 of nothing
    t = torch.tensor([0.1, -3.0, 2.0, 0.5])
    assert torch.equal(prune_top_magnitude(t, 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0]))
