"""Pins of WEMoE's weight-ensembling MLP (adamerge/components/wemoe_mlp.py) built directly, not through
WEMoEModel (which sets its options after construction and hides the defaults): the router's defaults, the
MLP shapes ``find_mlp_blocks`` accepts and refuses (messages whole), the shared-weights path in half
precision, what a checkpoint of the module holds, and its initial options.

Data chosen so that near misses disagree: one block (a check ``len == 1`` for "no blocks" would refuse it)
and zero blocks; an MLP of exactly ``c_fc`` and ``c_proj`` (``> 2`` or ``>= 3`` children would refuse it);
an MLP whose first linear is not named ``c_fc`` while its last is ``c_proj`` (an ``or`` for the name checks
would accept it); an empty MLP (indexing its first child would raise IndexError); a ``mlp`` attribute that is
no module (calling ``named_children`` on it would raise AttributeError); task vectors whose weight fits and
whose bias does not (an ``and`` between the two shape checks would accept them); bfloat16 inputs with float32
base weights on the one-weight-vector path (``W_0`` and ``b_0`` not cast would give float32 weights, which
``F.linear`` refuses next to bfloat16 inputs)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adamerge.components.wemoe_mlp import (
    WeightEnsemblingMLP,
    WEMoEError,
    build_router,
    ensemble_linear,
    find_mlp_blocks,
)


def _mlp(*names: str, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n, nn.GELU() if n == "gelu" else nn.Linear(3, 3, bias=bias)) for n in names))


class _Block(nn.Module):
    def __init__(self, mlp: object) -> None:
        super().__init__()
        self.mlp = mlp


class _Encoder(nn.Module):
    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(blocks)


def test_build_router_defaults_and_refusal():
    router = build_router(4, 2)
    assert [type(m) for m in router] == [nn.Linear, nn.ReLU, nn.Linear]  # one hidden stage by default
    assert torch.equal(router[-1].bias, torch.full((2,), 0.3))  # init_lam 0.3
    assert torch.equal(router[0].bias, torch.zeros(4))
    with pytest.raises(WEMoEError) as info:
        build_router(4, 0)
    assert str(info.value) == "a router needs at least one expert, got 0"


def test_find_mlp_blocks_accepts_one_block_of_exactly_two_linears():
    block = _Block(_mlp("c_fc", "c_proj"))
    assert find_mlp_blocks(_Encoder(block)) == [("transformer.resblocks.0", block)]


def test_find_mlp_blocks_without_blocks():
    for encoder in (_Encoder(), nn.Linear(2, 2)):
        with pytest.raises(WEMoEError) as info:
            find_mlp_blocks(encoder)
        assert str(info.value) == (f"{type(encoder).__name__} has no transformer.resblocks: WEMoE expects an "
                                   "open_clip VisionTransformer (model.visual)")


class _NoMLP(nn.Module):
    pass


@pytest.mark.parametrize("block", [
    _NoMLP(), _Block("not a module"), _Block(nn.Sequential()), _Block(_mlp("fc1", "gelu", "c_proj")),
    _Block(_mlp("c_fc", "gelu", "out")), _Block(_mlp("c_fc", "gelu", "c_proj", bias=False)),
], ids=["no-mlp", "not-a-module", "empty", "first-not-c_fc", "last-not-c_proj", "no-bias"])
def test_find_mlp_blocks_refuses_an_mlp_it_cannot_read(block):
    good = _Block(_mlp("c_fc", "gelu", "c_proj"))
    with pytest.raises(WEMoEError) as info:
        find_mlp_blocks(_Encoder(good, block))
    assert str(info.value) == (f"block 'transformer.resblocks.1' ({type(block).__name__}) has no recognisable MLP: "
                               "expected `.mlp` with nn.Linear `c_fc` first and `c_proj` last (both with bias)")


def _taus(k: int = 2, bias_out: int = 3) -> dict:
    return {key: (torch.randn(k, 3, 3), torch.randn(k, bias_out)) for key in ("fc", "proj")}


def test_task_vectors_must_fit_weight_and_bias():
    mlp = _mlp("c_fc", "gelu", "c_proj")
    with pytest.raises(WEMoEError) as info:
        WeightEnsemblingMLP(mlp, _taus(bias_out=4), build_router(3, 2))
    assert str(info.value) == "task-vector shapes (2, 3, 3) do not fit c_fc (3, 3)"


def test_a_checkpoint_of_the_mlp_holds_nothing_and_its_options_start_unset():
    """W_0, b_0 and the task vectors are non-persistent buffers (the pool holds them); the router is only
    referenced. The options start as documented, before WEMoEModel sets them."""
    m = WeightEnsemblingMLP(_mlp("c_fc", "gelu", "c_proj"), _taus(), build_router(3, 2))
    assert list(m.state_dict()) == []
    assert sorted(name for name, _ in m.named_buffers()) == sorted(
        f"{p}_{k}" for p in ("w0", "b0", "tau_w", "tau_b") for k in ("fc", "proj"))
    assert (m.batch_first, m.batch_reduce, m.impl, m.chunk_size, m.last_weights) == (True, False, "weights", None, None)
    assert m.batch_reduce is False and m.chunk_size is None and m.last_weights is None


def test_one_weight_vector_in_bfloat16_casts_the_base_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    w0, b0 = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    tau_w, tau_b, r = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, generator=g), torch.tensor([0.3, 0.7])
    y = ensemble_linear(x, w0, b0, tau_w, tau_b, r)
    assert y.dtype == torch.bfloat16
    bf = torch.bfloat16
    want = F.linear(x, w0.to(bf) + torch.tensordot(r.to(bf), tau_w.to(bf), dims=1), b0.to(bf) + r.to(bf) @ tau_b.to(bf))
    torch.testing.assert_close(y, want)
