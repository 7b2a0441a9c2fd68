"""OPCM continual merging: a numpy re-derivation with full SVDs, the projection and norm properties,
constant memory in the number of experts, and any arrival order."""

import copy
import gc
import itertools
import math
import weakref

import numpy as np
import pytest
import torch

from adamerge.merging import MergeError, OPCMerger, opcm_project
from adamerge.merging.opcm import split_rank


def _pre(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "lin.weight": torch.randn(6, 4, generator=g),  # projected (2-D, "...weight")
        "lin.bias": torch.randn(6, generator=g),
        "positional_embedding": torch.randn(3, 4, generator=g),  # 2-D but not a linear weight
        "ids": torch.arange(3),
    }


def _expert(pre, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in pre.items()
    }


def _np_reference(pre, experts, alpha):
    """The paper's recursion with numpy full SVDs: S_t = S_{t-1} + proj(τ_t), λ_t = ‖S_t‖ / mean ‖τ‖."""
    keys = ["lin.weight", "lin.bias", "positional_embedding"]
    taus = [{k: e[k].double().numpy() - pre[k].double().numpy() for k in keys} for e in experts]
    s = {k: taus[0][k].copy() for k in keys}
    norms = [math.sqrt(sum((taus[0][k] ** 2).sum() for k in keys))]
    lam = 1.0
    for tau in taus[1:]:
        u, sig, vt = np.linalg.svd(s["lin.weight"], full_matrices=True)
        r = int(np.argmax(np.cumsum(sig) / sig.sum() > alpha))
        p = u.T @ tau["lin.weight"] @ vt.T
        np.fill_diagonal(p, 0.0)
        p[:r, :r] = 0.0
        s["lin.weight"] = s["lin.weight"] + u @ p @ vt
        for k in ("lin.bias", "positional_embedding"):
            s[k] = s[k] + tau[k]
        norms.append(math.sqrt(sum((tau[k] ** 2).sum() for k in keys)))
        lam = math.sqrt(sum((s[k] ** 2).sum() for k in keys)) / np.mean(norms)
    return {k: pre[k].double().numpy() + s[k] / lam for k in keys}, lam


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_matches_numpy_full_svd_recursion(alpha):
    pre = _pre()
    experts = [_expert(pre, i) for i in range(4)]
    merger = OPCMerger(pre, alpha=alpha)
    for t, e in enumerate(experts, start=1):
        merger.add(e)
        want, lam = _np_reference(pre, experts[:t], alpha)
        got = merger.merged_state()
        assert merger.lambda_t == pytest.approx(lam, rel=1e-5)
        for k, v in want.items():
            assert np.allclose(got[k].double().numpy(), v, atol=1e-5), (t, k)
        assert torch.equal(got["ids"], pre["ids"])


def test_projected_update_has_no_component_in_kept_subspace():
    g = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    sig = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    merged = q1[:, :6] @ torch.diag(sig) @ q2.T  # known spectrum: cumsum/sum = .37, .65 → r = 1 at α=0.5
    assert split_rank(sig, 0.5) == 1 and split_rank(sig, 0.7) == 2
    tau = torch.randn(8, 6, generator=g)
    for alpha, r in ((0.5, 1), (0.7, 2), (0.9, 3)):
        proj = opcm_project(merged, tau, alpha=alpha)
        u, _, vh = torch.linalg.svd(merged, full_matrices=True)
        p = u.T @ proj @ vh.T
        assert torch.allclose(p[:r, :r], torch.zeros(r, r), atol=1e-5)  # U_rᵀ τ̃ V_r = 0
        assert torch.allclose(torch.diagonal(p), torch.zeros(6), atol=1e-5)  # diag(Uᵀ τ̃ V) = 0
        full = u.T @ tau @ vh.T  # everything else is untouched
        mask = torch.ones_like(full, dtype=torch.bool)
        mask[:r, :r] = False
        mask[torch.arange(6), torch.arange(6)] = False
        assert torch.allclose(p[mask], full[mask], atol=1e-5)


def test_merged_norm_equals_mean_task_vector_norm():
    pre = _pre()
    merger = OPCMerger(pre)
    norms = []
    for i in range(5):
        e = _expert(pre, i)
        e = {
            k: (v - pre[k]) * (i + 1) + pre[k] if v.is_floating_point() else v for k, v in e.items()
        }  # unequal norms
        norms.append(
            math.sqrt(sum(float(((e[k] - pre[k]) ** 2).sum()) for k in pre if pre[k].is_floating_point()))
        )
        merger.add(e)
        tau = merger.merged_task_vector()
        merged_norm = math.sqrt(sum(float((v**2).sum()) for v in tau.values()))
        assert merged_norm == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def _held_bytes(obj, seen=None):
    """Bytes of distinct tensor storages reachable from the merger's attributes."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_held_bytes(v, seen) for v in vars(obj).values())
    return 0


def test_memory_does_not_grow_with_number_of_models():
    pre = _pre()
    merger = OPCMerger(pre)
    merger.add(_expert(pre, 0))
    after_one = _held_bytes(merger)
    model_bytes = sum(v.untyped_storage().nbytes() for v in pre.values())
    assert after_one <= 2 * model_bytes  # θ0 (by reference) + S
    for i in range(1, 8):
        merger.add(_expert(pre, i))
        assert _held_bytes(merger) == after_one
    expert = _expert(pre, 99)
    ref = weakref.ref(expert["lin.weight"])
    merger.add(expert)
    del expert
    gc.collect()
    assert ref() is None  # the merger kept nothing of the expert


def test_any_order_works_and_keeps_the_norm_property():
    pre = _pre()
    experts = [_expert(pre, i) for i in range(3)]
    results = []
    for order in itertools.permutations(range(3)):
        merger = OPCMerger(pre)
        for i in order:
            merger.add(experts[i])
        out = merger.merged_state()
        assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())
        assert merger.count == 3
        results.append(out["lin.weight"])
    assert not torch.allclose(results[0], results[-1])  # order matters, as in the paper


def test_single_expert_is_that_expert_and_task_vector_api_matches():
    pre = _pre()
    e = _expert(pre, 0)
    m1 = OPCMerger(pre)
    m1.add(e)
    assert all(torch.allclose(m1.merged_state()[k].float(), e[k].float(), atol=1e-6) for k in pre)
    m2 = OPCMerger(pre)
    e2 = _expert(pre, 1)
    m1.add(e2)
    m2.add_task_vector({k: e[k] - pre[k] for k in pre if pre[k].is_floating_point()})
    m2.add_task_vector({k: e2[k] - pre[k] for k in pre if pre[k].is_floating_point()})
    assert all(
        torch.allclose(m1.merged_state()[k].float(), m2.merged_state()[k].float(), atol=1e-6) for k in pre
    )


def test_inputs_untouched_and_half_precision():
    pre = _pre()
    experts = [_expert(pre, i) for i in range(2)]
    before = copy.deepcopy((pre, experts))
    merger = OPCMerger(pre)
    for e in experts:
        merger.add(e)
    merger.merged_state()
    assert all(torch.equal(before[0][k], pre[k]) for k in pre)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before[1], experts) for k in a)
    half = {k: v.half() if v.is_floating_point() else v for k, v in pre.items()}
    mh = OPCMerger(half)
    for e in experts:
        mh.add({k: v.half() if v.is_floating_point() else v for k, v in e.items()})
    assert mh.merged_state()["lin.weight"].dtype == torch.float16


def test_bad_inputs():
    pre = _pre()
    for alpha in (0.0, 1.5, float("nan")):
        with pytest.raises(MergeError, match=r"opcm alpha must lie in \(0, 1\]"):
            OPCMerger(pre, alpha=alpha)
    merger = OPCMerger(pre)
    with pytest.raises(MergeError, match="no expert added yet"):
        merger.merged_state()
    merger.add(_expert(pre, 0))
    bad = dict(_expert(pre, 1), **{"lin.bias": torch.full((6,), float("nan"))})
    with pytest.raises(MergeError, match="expert 'svhn': key 'lin.bias' contains NaN"):
        merger.add(bad, name="expert 'svhn'")
    with pytest.raises(
        MergeError, match=r"shape mismatch at key 'lin.weight': expected \(6, 4\), got \(4, 6\)"
    ):
        merger.add(dict(_expert(pre, 1), **{"lin.weight": torch.zeros(4, 6)}))
    with pytest.raises(MergeError, match="missing key 'lin.bias'"):
        merger.add_task_vector({"lin.weight": torch.zeros(6, 4), "positional_embedding": torch.zeros(3, 4)})
    assert merger.count == 1  # rejected experts left the merger as it was
    with pytest.raises(MergeError, match="pretrained state dict: key 'lin.weight' contains Inf"):
        OPCMerger(dict(pre, **{"lin.weight": torch.full((6, 4), float("inf"))}))


def _fusionbench_opcm(pre, experts, alpha, linear, non_leaf):
    """FusionBench ``OPCMForCLIP.run`` (fusion_bench/method/opcm/opcm.py) on state dicts, in float64:
    the merged model starts as the first expert; each next expert updates leaf-module parameters
    (``linear``: projected with full SVDs and ``.diagonal().fill_(0)``; others added), leaves
    ``non_leaf`` parameters alone, then rescales the whole merged task vector to the mean norm."""
    keys = [k for k in pre if pre[k].is_floating_point()]
    pre = {k: pre[k].double() for k in keys}
    experts = [{k: e[k].double() for k in keys} for e in experts]

    def norm(state):
        return math.sqrt(sum(float((state[k] - pre[k]).square().sum()) for k in keys))

    merged = dict(experts[0])
    all_norms, previous_lambda_t = [norm(experts[0])], 1.0
    for task in experts[1:]:
        all_norms.append(norm(task))
        avg = float(np.mean(all_norms))
        for k in keys:
            if k in non_leaf:
                continue
            previous_merged_tv, task_tv = merged[k] - pre[k], task[k] - pre[k]
            if k in linear:
                u, s, vh = torch.linalg.svd(previous_merged_tv, full_matrices=True)
                v = vh.T
                split_rank = (s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item()
                projected = u.T @ task_tv @ v
                projected.diagonal().fill_(0)
                projected[:split_rank, :split_rank] = 0
                task_tv = u @ projected @ v.T
            merged[k] = pre[k] + (previous_lambda_t * previous_merged_tv + task_tv) / 1
        task_vector_norm = norm(merged)
        previous_lambda_t = task_vector_norm / avg
        merged = {k: pre[k] + (merged[k] - pre[k]) * (avg / task_vector_norm) for k in keys}
    return merged


def test_matches_fusionbench_loop_and_leaves_class_embedding_unmerged():
    """FusionBench merges leaf modules only: HF's embeddings.class_embedding (open_clip class_embedding)
    keeps the first expert's value, rescaled with the rest; every other parameter is merged."""
    pre = dict(_pre(), class_embedding=torch.randn(4, generator=torch.Generator().manual_seed(9)))
    experts = [_expert(pre, i) for i in range(4)]
    merger = OPCMerger(pre)
    for t, e in enumerate(experts, start=1):
        merger.add(e)
        want = _fusionbench_opcm(pre, experts[:t], 0.5, linear={"lin.weight"}, non_leaf={"class_embedding"})
        got = merger.merged_state()
        for k, v in want.items():
            assert torch.allclose(got[k].double(), v, atol=1e-5), (t, k)
    first_tau = experts[0]["class_embedding"] - pre["class_embedding"]
    got_tau = merger.merged_task_vector()["class_embedding"]
    assert torch.allclose(got_tau, first_tau * (got_tau.norm() / first_tau.norm()), atol=1e-6)  # τ_1, shrunk
    assert got_tau.norm() < 0.5 * first_tau.norm()
    every = OPCMerger(pre, is_merged=lambda k, t: True)  # opt out: merged like any other parameter
    for e in experts:
        every.add(e)
    assert not torch.allclose(every.merged_task_vector()["class_embedding"], got_tau, atol=1e-4)


def test_paper_era_diag_fill_was_a_no_op():
    """tanganke/opcm wrote ``projected_task_tv.diag().fill_(0)``: ``diag()`` of a matrix is a copy, so
    nothing was zeroed; FusionBench 2c3df13 uses ``.diagonal()`` (a view), which we follow."""
    p = torch.ones(3, 3)
    p.diag().fill_(0)
    assert torch.equal(p, torch.ones(3, 3))
    p.diagonal().fill_(0)
    assert torch.equal(p, 1 - torch.eye(3))
