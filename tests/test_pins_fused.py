"""Pins for the fused q;k;v layout (adamerge/merging/fused.py): which tensors count as fused at the edges of
the shape rule, the error messages with their default names, and fuse's key order and its skipping of
layout keys a state lacks."""

import pytest
import torch

from adamerge.merging import MergeError
from adamerge.merging.fused import QKVLayout, check_split_qkv


def test_shape_rule_at_its_edges():
    # [3d, d] with d = 1 is a (tiny) fused weight; [0, 0] satisfies 0 == 3·0 but has no matrix to split
    one = QKVLayout.of({"a.in_proj_weight": torch.ones(3, 1), "a.in_proj_bias": torch.ones(3)})
    assert one.fused == (("a.in_proj_weight", 1, "weight"), ("a.in_proj_bias", 1, "bias"))
    assert not QKVLayout.of({"a.in_proj_weight": torch.ones(0, 0)})


def test_check_split_qkv_messages():
    assert check_split_qkv(False, "tsv_m") is False
    with pytest.raises(MergeError, match=r"^tsv_m split_qkv must be True or False, got 'yes'$"):
        check_split_qkv("yes", "tsv_m")
    with pytest.raises(MergeError, match=r"^split_qkv must be True or False, got 1$"):
        check_split_qkv(1)


def test_default_names_in_split_and_fuse_errors():
    layout = QKVLayout.of({"a.in_proj_weight": torch.ones(6, 2)})
    with pytest.raises(MergeError, match=r"^state dict: shape mismatch at key 'a.in_proj_weight': expected \(6, 2\), got \(3, 2\)$"):
        layout.split({"a.in_proj_weight": torch.ones(3, 2)})
    with pytest.raises(MergeError, match=r"^merged state dict has 'a.q_proj.weight' but not 'a.k_proj.weight': "
                       r"cannot fuse 'a.in_proj_weight'$"):
        layout.fuse({"a.q_proj.weight": torch.ones(2, 2)})


def test_fuse_skips_an_absent_block_and_keeps_the_fused_key_where_q_was():
    # Two fused blocks; the state lacks the first entirely (a method may drop keys), so fuse must go on to
    # the second. Its q is followed by an unrelated key before k and v: the fused tensor takes q's place.
    layout = QKVLayout.of({"a.in_proj_weight": torch.ones(6, 2), "b.in_proj_weight": torch.ones(6, 2)})
    q, k, v = (torch.full((2, 2), float(i)) for i in range(3))
    out = layout.fuse({"b.q_proj.weight": q, "x": torch.ones(1), "b.k_proj.weight": k, "b.v_proj.weight": v})
    assert list(out) == ["b.in_proj_weight", "x"]
    assert torch.equal(out["b.in_proj_weight"], torch.cat([q, k, v]))
