"""Per-task directions (origin + Σ_k d_k = the static merge) and AdaMerging learning on them.

Each decomposition is checked against its static merge, which its own test file checks against an
independent computation; TSV-M's parts also against the property that orthogonal rank-1 task vectors
are their own parts."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_pool

from adamerge.components.adamerging import AdaMergingModel
from adamerge.merging import MergeError, merge_pool
from adamerge.merging.cart import cart_directions
from adamerge.merging.dispatch import merge_directions
from adamerge.merging.registry import DIRECTIONS
from adamerge.merging.tsv import tsv_directions

UNIT_SCALE = {  # the static merge at the scale where it equals origin + Σ_k d_k
    "task_arithmetic": ({}, {"lam": 1.0}),
    "ties": ({"keep": 0.3}, {"keep": 0.3, "merge": "sum", "lam": 1.0}),
    "cart": ({"rank_ratio": 0.25}, {"rank_ratio": 0.25, "lam": 1.0}),
    "tsv_m": ({}, {"lam": 1.0}),
    "dare_ta": ({"drop": 0.4, "seed": 3}, {"drop": 0.4, "seed": 3, "lam": 1.0}),
    "consensus_ta": ({"k": 2, "lam": 0.5}, {"k": 2, "lam": 0.5, "alpha": 1.0}),
}


def _summed(origin, dirs):
    out = {}
    for key, value in origin.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        out[key] = value.float() + sum(d[key].float() for d in dirs)
    return out


def _close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=1e-5, msg=k)


def test_every_registered_direction_method_is_covered():
    assert set(DIRECTIONS) == set(UNIT_SCALE)


@pytest.mark.parametrize("method", sorted(UNIT_SCALE))
def test_origin_plus_the_directions_is_the_static_merge(method):
    pool = make_tiny_pool(num_tasks=4)
    dir_args, merge_args = UNIT_SCALE[method]
    origin, dirs = merge_directions(pool, method, **dir_args)
    assert len(dirs) == 4
    _close(_summed(origin, list(dirs)), merge_pool(pool, method, **merge_args))


def test_directions_follow_the_task_order():
    pool = make_tiny_pool(num_tasks=3)
    order = ["task2", "task0", "task1"]
    _, dirs = merge_directions(pool, "task_arithmetic", tasks=order)
    for d, task in zip(dirs, order):
        _close(d, pool.task_vector(task), atol=0)


def test_tsv_parts_of_orthogonal_rank_one_task_vectors_are_the_task_vectors():
    # 3 tasks on a [6, 4] weight: rank ⌊4/3⌋ = 1 each; mutually orthogonal u's and v's, so the stack is
    # already orthogonal and each task's block reconstructs its own τ_i (a mix-up of blocks would not)
    q_u = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))[0]
    q_v = torch.linalg.qr(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))[0]
    taus = [{"w": s * torch.outer(q_u[:, i], q_v[:, i]), "b": torch.full((4,), float(i))}
            for i, s in enumerate((3.0, 2.0, 0.5))]
    pre = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
    origin, dirs = tsv_directions(pre, taus)
    for d, t in zip(dirs, taus):
        torch.testing.assert_close(d["w"], t["w"], atol=1e-5, rtol=0)
        torch.testing.assert_close(d["b"], t["b"] / 3)  # others: each task's share of the mean
    assert origin["w"].equal(pre["w"])


def test_cart_preset_is_its_direction_arguments():
    pool = make_tiny_pool(num_tasks=3)
    origin, dirs = merge_directions(pool, "cart", preset="official")
    want_origin, want_dirs = cart_directions(
        pool.pretrained_state(), [t for _, t in pool.task_vectors()], rank_ratio=0.12, split_qkv=False)
    _close(origin, want_origin, atol=0)
    for d, w in zip(dirs, want_dirs):
        _close(d, w, atol=0)


def test_unknown_direction_method_or_argument_is_named():
    pool = make_tiny_pool()
    with pytest.raises(MergeError, match="unknown directions method 'pcb'"):
        merge_directions(pool, "pcb")
    with pytest.raises(MergeError, match="'cart'.*unexpected keyword argument 'lam'"):
        merge_directions(pool, "cart", lam=2.0)
    with pytest.raises(ValueError, match="directions must be a method name or a mapping"):
        AdaMergingModel(pool, directions={"keep": 0.2})


@pytest.mark.parametrize(("directions", "lam", "static", "label"), [
    ({"method": "cart", "rank_ratio": 0.25}, 2.0, {"method": "cart", "rank_ratio": 0.25, "lam": 2.0}, "AdaMerging+CART"),
    ("tsv_m", 1.0, {"method": "tsv_m", "lam": 1.0}, "AdaMerging+TSV-M"),
    ({"method": "ties", "keep": 0.3}, 0.3, {"method": "ties", "keep": 0.3, "lam": 0.3}, "AdaMerging++"),
])
def test_adamerging_on_a_base_starts_at_that_merge(directions, lam, static, label):
    # with every coefficient at the base's own λ the learned merge is the static merge; the origin (θ_avg
    # for CART, not θ_0) is what the encoder's frozen weights hold
    pool = make_tiny_pool(num_tasks=3)
    model = AdaMergingModel(pool, granularity="layer", init_lam=lam, clamp=False, directions=directions)
    spec = dict(static)
    _close(model.merged_state_dict(), merge_pool(pool, spec.pop("method"), **spec))
    assert model.label == f"{label} (layer-wise)"
    assert model.identity()["directions"] == (directions if isinstance(directions, dict) else {"method": directions})


def test_adamerging_on_cart_moves_each_task_direction_by_its_own_coefficient():
    pool = make_tiny_pool(num_tasks=3)
    model = AdaMergingModel(pool, granularity="task", init_lam=0.0, clamp=False,
                            directions={"method": "cart", "rank_ratio": 0.25})
    origin, dirs = merge_directions(pool, "cart", rank_ratio=0.25)
    with torch.no_grad():
        model.lambdas.copy_(torch.tensor([[0.5], [2.0], [-1.0]]))
    want = {k: v.float() + 0.5 * dirs[0][k] + 2.0 * dirs[1][k] - 1.0 * dirs[2][k] if v.is_floating_point() else v
            for k, v in origin.items()}
    _close(model.merged_state_dict(), want)
