"""Pins for OptMerge (adamerge/merging/optmerge.py): which keys are optimised or kept, the argument checks at
their edges, the default step count, and zero or single task vectors."""

import pytest
import torch

from adamerge.merging import MergeError
from adamerge.merging.optmerge import llamafactory_keeps, optmerge, optmerge_weight


def _matrices(k=2, shape=(5, 4)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(k)]


def test_llamafactory_keeps_norms_by_the_substring():
    t = torch.ones(2)
    for key in ("vision_model.post_layernorm.weight", "vision_model.encoder.layers.0.layer_norm1.weight"):
        assert llamafactory_keeps(key, t), key
    assert not llamafactory_keeps("vision_model.encoder.layers.0.mlp.fc1.weight", t)


def test_an_lm_head_matrix_is_averaged_not_optimised():
    g = torch.Generator().manual_seed(1)
    pre = {"lm_head.weight": torch.zeros(4, 3), "mlp.weight": torch.zeros(4, 3)}
    taus = [{k: torch.randn(4, 3, generator=g) for k in pre} for _ in range(2)]
    out = optmerge(pre, taus, iters=3, lam=1.0)
    torch.testing.assert_close(out["lm_head.weight"], (taus[0]["lm_head.weight"] + taus[1]["lm_head.weight"]) / 2)
    want = optmerge_weight([t["mlp.weight"] for t in taus], iters=3)
    torch.testing.assert_close(out["mlp.weight"], want)


def test_an_infinite_lr_is_refused():
    pre = {"w": torch.zeros(4, 3)}
    with pytest.raises(MergeError, match=r"^optmerge lr must be a finite number > 0, got inf$"):
        optmerge(pre, [{"w": torch.ones(4, 3)}], lr=float("inf"))


def test_optmerge_weight_steps():
    ts = _matrices()
    default = optmerge_weight(ts)
    assert torch.equal(default, optmerge_weight(ts, iters=300))
    assert not torch.equal(default, optmerge_weight(ts, iters=301))  # one step more shows
    assert not torch.equal(optmerge_weight(ts, iters=1), optmerge_weight(ts, iters=0))  # iters 1 takes a step


def test_zero_and_single_task_vectors():
    ts = _matrices()
    zero = torch.zeros_like(ts[0])
    # a zero task vector gives no target wherever it comes (the sum it starts from is the same)
    assert torch.equal(optmerge_weight([zero, *ts], iters=4), optmerge_weight([*ts, zero], iters=4))
    assert not torch.equal(optmerge_weight([zero, *ts], iters=4), optmerge_weight([zero, *ts], iters=0))
    one = optmerge_weight(ts[:1], iters=2)  # one task: rank min(m, n), nothing indexes a second task vector
    assert one.shape == ts[0].shape and bool(one.isfinite().all())
