"""Pins for OPCM (adamerge/merging/opcm.py): the default names in its messages, FusionBench's rule for
``class_embedding`` on nested keys, the default α, and the cases where the merged norm λ_t falls back to 1."""

import math

import pytest
import torch

from adamerge.merging import MergeError
from adamerge.merging.opcm import OPCMerger, fusionbench_merges, opcm_project, split_rank


def test_fusionbench_merges_every_key_but_a_class_embedding_however_deep():
    t = torch.ones(4)
    for key in ("class_embedding", "visual.class_embedding", "model.visual.class_embedding"):
        assert not fusionbench_merges(key, t), key
    assert fusionbench_merges("visual.class_embedding_proj", t)
    assert fusionbench_merges("model.visual.proj", t)


def test_opcm_project_default_alpha_is_one_half():
    # spectrum 3, 2.5, 2, 2, 2, 2 (sum 13.5): the energy share passes 0.5 at the third value, so α = 0.5
    # protects rank r = 2 (its off-diagonal block is removed too), while α ≥ 1 protects none (r = 0, the
    # diagonal alone); r = 1 would equal r = 0, since the diagonal is always removed
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    m = u @ torch.diag(torch.tensor([3.0, 2.5, 2.0, 2.0, 2.0, 2.0])) @ v.T
    t = torch.randn(6, 6, generator=g)
    assert torch.equal(opcm_project(m, t), opcm_project(m, t, 0.5))
    assert not torch.allclose(opcm_project(m, t), opcm_project(m, t, 1.0))


def _pre():
    return {"a.in_proj_weight": torch.zeros(6, 2), "b": torch.zeros(3), "n": torch.tensor([1])}


def test_default_names_in_the_messages():
    merger = OPCMerger(_pre())
    with pytest.raises(MergeError, match=r"^expert: shape mismatch at key 'a.in_proj_weight': expected \(6, 2\), "
                       r"got \(3, 2\)$"):
        merger.add({**_pre(), "a.in_proj_weight": torch.zeros(3, 2)})
    with pytest.raises(MergeError, match=r"^expert is missing key 'b' \(1 missing in all\)$"):
        merger.add({"a.in_proj_weight": torch.zeros(6, 2), "n": torch.tensor([1])})
    with pytest.raises(MergeError, match=r"^task vector: shape mismatch at key 'a.in_proj_weight'"):
        merger.add_task_vector({"a.in_proj_weight": torch.zeros(3, 2), "b": torch.zeros(3)})
    with pytest.raises(MergeError, match=r"^task vector is missing key 'b' \(1 missing in all\)$"):
        merger.add_task_vector({"a.in_proj_weight": torch.zeros(6, 2)})
    with pytest.raises(MergeError, match=r"^task vector: key 'b' contains NaN values$"):
        merger.add_task_vector({"a.in_proj_weight": torch.zeros(6, 2), "b": torch.tensor([0.0, float("nan"), 0.0])})
    with pytest.raises(MergeError, match=r"^no expert added yet: call add\(\) first$"):
        merger.merged_state()
    with pytest.raises(MergeError, match=r"^pretrained state dict has no floating-point tensors to merge$"):
        OPCMerger({"n": torch.tensor([1])})


def test_is_merged_sees_each_tensor():
    seen = {}
    OPCMerger(_pre(), is_merged=lambda key, t: seen.setdefault(key, tuple(t.shape)) != (3,))
    assert seen == {"a.q_proj.weight": (2, 2), "a.k_proj.weight": (2, 2), "a.v_proj.weight": (2, 2), "b": (3,)}


def test_mean_norm_after_one_expert_is_its_norm_exactly():
    merger = OPCMerger({"w": torch.zeros(3, 2)})
    tau = torch.full((3, 2), 0.1)  # ‖τ‖ ≈ 0.245, where 1 + (‖τ‖ − 1) is not ‖τ‖ in floating point
    merger.add_task_vector({"w": tau})
    norm = math.sqrt(float(tau.square().sum()))
    assert 1.0 + (norm - 1.0) != norm  # a running mean started at 1 instead of 0 would show
    assert merger.mean_norm == norm  # the running mean starts at 0


def test_a_zero_merged_vector_falls_back_to_lambda_1():
    # nothing projected: τ_2 = −τ_1 cancels S_2 to 0 while the mean norm is > 0 (λ = √0 / mean would be 0 → NaN)
    pre = {"w": torch.zeros(2, 2)}
    merger = OPCMerger(pre, is_projected=lambda key, t: False)
    merger.add_task_vector({"w": torch.zeros(2, 2)})  # a zero first task vector: mean norm 0 (λ = 0 / 0)
    assert merger.lambda_t == 1.0 and torch.equal(merger.merged_state()["w"], pre["w"])
    tau = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    merger.add_task_vector({"w": tau})
    merger.add_task_vector({"w": -tau})
    assert merger.mean_norm > 0 and merger.lambda_t == 1.0
    assert torch.equal(merger.merged_state()["w"], pre["w"])


def test_split_rank_of_an_all_zero_spectrum_is_0():
    assert split_rank(torch.zeros(3), 0.5) == 0
    assert split_rank(torch.tensor([3.0, 1.0]), 0.5) == 0 and split_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2
