"""Pins for CART (adamerge/merging/cart.py): the authors' choice of low-rank keys and the messages of its
input checks, with one task where a second would be indexed."""

import pytest
import torch

from adamerge.merging import MergeError
from adamerge.merging.cart import cart, cart_lowrank_key


def test_lowrank_keys_exclude_ln_and_bias_each_on_its_own():
    m = torch.ones(2, 2)
    assert cart_lowrank_key("visual.transformer.resblocks.0.attn.out_proj.weight", m)
    assert cart_lowrank_key("visual.transformer.resblocks.0.mlp.c_fc.weight", m)
    assert not cart_lowrank_key("blocks.0.attn.ln_inner.weight", m)  # "ln" alone excludes
    assert not cart_lowrank_key("blocks.0.mlp.bias_table", m)        # "bias" alone excludes
    assert not cart_lowrank_key("blocks.0.proj.weight", m)           # neither attn nor mlp
    assert not cart_lowrank_key("blocks.0.attn.out_proj.bias", torch.ones(2))


def test_pretrained_must_be_a_state_dict():
    with pytest.raises(MergeError, match=r"^pretrained must be a state dict, got list$"):
        cart([torch.ones(2)], [{"w": torch.ones(2, 2)}])


def test_a_state_dict_with_both_layouts_is_named():
    # θ_0 with a fused block and one of its split names cannot be split; nor can a task vector that has a
    # split name as a non-float tensor (float keys are checked against θ_0 first, integer ones are not).
    both = {"a.in_proj_weight": torch.ones(6, 2), "a.q_proj.weight": torch.ones(2, 2)}
    with pytest.raises(MergeError, match=r"^pretrained state dict has both 'a.in_proj_weight' and "
                       r"'a.q_proj.weight': cannot split q;k;v$"):
        cart(both, [dict(both)])
    pre = {"a.in_proj_weight": torch.ones(6, 2)}
    tau = {"a.in_proj_weight": torch.ones(6, 2), "a.q_proj.weight": torch.zeros(2, 2, dtype=torch.int64)}
    with pytest.raises(MergeError, match=r"^task vector 0 has both 'a.in_proj_weight' and 'a.q_proj.weight'"):
        cart(pre, [tau])


def test_is_lowrank_may_only_choose_matrices():
    pre = {"attn.w": torch.zeros(3, 2), "attn.b": torch.zeros(3)}
    tau = {"attn.w": torch.ones(3, 2), "attn.b": torch.ones(3)}
    with pytest.raises(MergeError, match=r"^cart is_lowrank chose key 'attn.b' of shape \(3,\): only 2-D weights "
                       r"have a low-rank part$"):
        cart(pre, [tau], is_lowrank=lambda key, t: True)
    out = cart(pre, [tau], lam=1.0)  # one task: τ − τ̄ = 0, so CART is the average θ_0 + τ
    assert torch.equal(out["attn.w"], tau["attn.w"]) and torch.equal(out["attn.b"], tau["attn.b"])
