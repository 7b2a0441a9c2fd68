"""merge_pool: every static method by name on a tiny open_clip pool, equal to calling it directly."""

import pytest
import torch
from conftest import make_tiny_pool

from adamerge.merging import (
    METHODS,
    MergeError,
    OPCMerger,
    merge_pool,
    optmerge,
    pcb_merge,
    task_arithmetic,
    ties_merge,
    weight_average,
)


@pytest.fixture(scope="module")
def pool():
    return make_tiny_pool(num_tasks=3)


def _same(a, b, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


def _taus(pool, tasks=None):
    return [tau for _, tau in pool.task_vectors(tasks)]


def test_each_method_by_name_matches_direct_call(pool):
    pre, taus = pool.pretrained_state(), _taus(pool)
    experts = [pool.expert_state(t) for t in pool.tasks]
    _same(merge_pool(pool, "weight_average"), weight_average(experts))
    _same(merge_pool(pool, "task_arithmetic", lam=0.4), task_arithmetic(pre, taus, lam=0.4))
    _same(merge_pool(pool, "task_arithmetic", dare=0.5, seed=1), task_arithmetic(pre, taus, dare=0.5, seed=1))
    _same(merge_pool(pool, "ties", keep=0.3, merge="sum"), ties_merge(pre, taus, keep=0.3, merge="sum"))
    _same(merge_pool(pool, "pcb", keep=0.1), pcb_merge(pre, taus, keep=0.1))
    _same(merge_pool(pool, "optmerge", iters=3, lr=0.01), optmerge(pre, taus, iters=3, lr=0.01))
    merger = OPCMerger(pre, alpha=0.6)
    for e in experts:
        merger.add(e)
    _same(merge_pool(pool, "opcm", alpha=0.6), merger.merged_state(), atol=1e-5)
    # every registered method is checked by name: these six here, the others in their own test files
    # (test_merging_{tsv,iso,cart,wudi,dare_merges,consensus}.py::…merge_pool…)
    assert set(METHODS) == {"weight_average", "task_arithmetic", "ties", "pcb", "opcm", "optmerge", "tsv_m", "iso_c",
                            "iso_cts", "cart", "wudi", "dare_ta", "dare_ties", "consensus_ta", "consensus_ties"}


def test_task_subset_and_order(pool):
    pre = pool.pretrained_state()
    _same(
        merge_pool(pool, "ties", tasks=["task2", "task0"]), ties_merge(pre, _taus(pool, ["task2", "task0"]))
    )
    a = merge_pool(pool, "opcm", tasks=["task0", "task1", "task2"])
    b = merge_pool(pool, "opcm", tasks=["task2", "task1", "task0"])
    key = "transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.allclose(a[key], b[key])  # OPCM sees the order it is given


def test_merged_state_loads_into_the_encoder(pool):
    enc = pool.build_encoder(merge_pool(pool, "ties"))
    out = enc(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_unknown_method_and_bad_arguments(pool):
    with pytest.raises(MergeError, match="unknown merging method 'tie'; known methods: .*opcm.*ties"):
        merge_pool(pool, "tie")
    with pytest.raises(MergeError, match="merging method 'ties': .*unexpected keyword argument 'ratio'"):
        merge_pool(pool, "ties", ratio=0.1)
    with pytest.raises(MergeError, match=r"keep ratio must lie in \(0, 1\]"):
        merge_pool(pool, "ties", keep=2.0)
    with pytest.raises(ValueError, match="task 'nope' has no expert"):
        merge_pool(pool, "task_arithmetic", tasks=["nope"])


def test_presets_are_named_official_runs_and_single_values_override_them(pool):
    from adamerge.merging.registry import PRESETS

    pre, taus = pool.pretrained_state(), _taus(pool)
    _same(merge_pool(pool, "ties", preset="paper"), ties_merge(pre, taus, keep=0.2, merge="mean", lam=1.0))
    _same(merge_pool(pool, "ties", preset="paper", lam=0.5), ties_merge(pre, taus, merge="mean", lam=0.5))
    _same(merge_pool(pool, "ties"), merge_pool(pool, "ties", preset="adamerging"))  # the default is a named run
    assert PRESETS["ties"]["adamerging"] == {"keep": 0.2, "merge": "sum", "lam": 0.3}
    with pytest.raises(MergeError, match="'ties' has no preset 'nope'; its presets: adamerging, paper"):
        merge_pool(pool, "ties", preset="nope")
