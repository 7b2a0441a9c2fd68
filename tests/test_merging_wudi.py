"""WUDI-Merging against the authors' autograd loop (transcribed), the objective written out in numpy,
and its closed-form minimiser; which keys each variant touches, fused vs split q;k;v, errors, dtypes."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_pool
from test_models_checkpoints import to_hf

from adamerge.merging import MergeError, merge_pool
from adamerge.merging.registry import LABELS, PRESETS
from adamerge.merging.wudi import wudi_block_linear, wudi_merge, wudi_weight
from adamerge.models.hf_clip import convert_hf_vision_state

BLOCK = "transformer.resblocks.0."


def _official_wudi(vectors, iter_num, lr):
    """nathanielyvo/WUDI-Merging vit/wudi_main.py::get_redundant_task_vector, transcribed (CPU)."""
    vectors = torch.stack(vectors).float()
    merging_vector = torch.nn.Parameter(torch.sum(vectors, dim=0))
    optimizer = torch.optim.Adam([merging_vector], lr=lr, weight_decay=0)
    l2_norms = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    for _ in range(iter_num):
        disturbing_vectors = merging_vector.unsqueeze(0) - vectors
        inner_product = torch.matmul(disturbing_vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner_product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merging_vector.data.detach()


def _objective(tau, taus):
    """Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F in float64 (zero τ_i have no term)."""
    tau = np.asarray(tau, dtype=np.float64)
    total = 0.0
    for t in taus:
        t = np.asarray(t, dtype=np.float64)
        if (t**2).sum() > 0:
            total += (((tau - t) @ t.T) ** 2).sum() / (t**2).sum()
    return total


def _closed_form(taus):
    """Setting the gradient 2 Σ_i (τ − τ_i) τ_iᵀτ_i / ‖τ_i‖² to zero: τ G = B with
    G = Σ_i τ_iᵀτ_i / ‖τ_i‖², B = Σ_i τ_i τ_iᵀ τ_i / ‖τ_i‖²; G is symmetric, so τᵀ = G⁻¹ Bᵀ."""
    ts = [np.asarray(t, dtype=np.float64) for t in taus]
    gram = sum(t.T @ t / (t**2).sum() for t in ts)
    target = sum(t @ t.T @ t / (t**2).sum() for t in ts)
    return np.linalg.solve(gram, target.T).T


def _randn(shape, k, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(*shape, generator=g) for _ in range(k)]


@pytest.mark.parametrize(
    "shape,k,lr,iters",
    [((48, 32), 3, 1e-5, 300), ((32, 48), 4, 1e-3, 60), ((96, 32), 8, 1e-5, 300), ((6, 4), 9, 1e-2, 80)],
)
def test_matches_the_authors_loop(shape, k, lr, iters):
    ws = _randn(shape, k, scale=0.05)
    want = _official_wudi(ws, iters, lr)
    got = wudi_weight(ws, lr=lr, iters=iters)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, torch.stack(ws).sum(0), atol=lr)  # it moved from Σ τ_i


@pytest.mark.parametrize("shape,k", [((12, 8), 3), ((8, 12), 5), ((6, 4), 9)])  # also K > min(m, n)
def test_converges_to_the_closed_form_least_squares_solution(shape, k):
    ws = _randn(shape, k, seed=1)
    got = wudi_weight(ws, lr=1e-2, iters=2500).double().numpy()
    best = _closed_form([w.numpy() for w in ws])
    assert np.allclose(got, best, atol=1e-3, rtol=1e-3)
    start = _objective(sum(w.numpy() for w in ws), ws)
    assert _objective(best, ws) <= _objective(got, ws) <= _objective(best, ws) * (1 + 1e-6) < start


def test_one_task_is_its_own_minimiser():
    for t in (torch.randn(48, 32), torch.randn(8, 32)):  # full row rank and rank-deficient (m < n)
        got = wudi_weight([t], lr=1e-2, iters=50)
        assert torch.equal(got, t) and _objective(got, [t]) == 0.0  # zero gradient at Σ τ_i = τ_1
    pool = make_tiny_pool(num_tasks=1)
    pre, (tau,) = pool.pretrained_state(), [t for _, t in pool.task_vectors()]
    out = wudi_merge(pre, [tau], variant="fusionbench", lr=1e-2, iters=20)
    assert all(torch.allclose(out[k], pre[k] + tau[k], atol=1e-6) for k in tau)  # the expert back


@pytest.fixture(scope="module")
def tiny():
    pool = make_tiny_pool(num_tasks=3)
    return pool, pool.pretrained_state(), [tau for _, tau in pool.task_vectors()]


def _matrices(state, key):
    """``key``'s matrices as WUDI sees them by default: a fused in_proj_weight as q, k, v."""
    t = state[key]
    return list(t.chunk(3)) if key.endswith("in_proj_weight") else [t]


def test_objective_does_not_rise_on_any_layer_with_the_official_settings(tiny):
    _, pre, taus = tiny
    out = wudi_merge(pre, taus)  # lr 1e-5, 300 steps, from Σ τ_i
    keys = [k for k in pre if pre[k].dim() == 2 and wudi_block_linear(k, pre[k])]
    assert len(keys) == 2 * 4
    for key in keys:
        for j, got in enumerate(_matrices({key: out[key] - pre[key]}, key)):
            ws = [_matrices(t, key)[j].numpy() for t in taus]
            start, end = _objective(sum(ws), ws), _objective(got.numpy(), ws)
            assert end < start, (key, j)


def test_official_variant_touches_block_linears_only_and_keeps_the_rest(tiny):
    _, pre, taus = tiny
    out = wudi_merge(pre, taus, lr=1e-3, iters=5)
    total = {k: sum(t[k] for t in taus) for k in taus[0]}
    optimised = {f"transformer.resblocks.{i}.{s}" for i in range(2)
                 for s in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    for k in pre:
        if k in optimised:  # Adam from Σ τ_i: moved, but by at most ~lr per step
            tau = out[k] - pre[k]
            assert 1e-4 < (tau - total[k]).abs().max() <= 1.1 * 5 * 1e-3, k
        else:  # biases, norms, embeddings, conv1, proj: θ_0 (TaskVector.apply_to skips them)
            assert torch.equal(out[k], pre[k]), k


def test_fusionbench_variant_optimises_every_2d_tensor_and_averages_the_rest(tiny):
    _, pre, taus = tiny
    out = wudi_merge(pre, taus, variant="fusionbench", lr=1e-3, iters=5)
    for k, t in taus[0].items():
        tau = out[k] - pre[k]
        if t.dim() == 2:  # also positional_embedding and proj
            assert not torch.allclose(tau, sum(x[k] for x in taus), atol=1e-4), k
        else:
            assert torch.allclose(tau, sum(x[k] for x in taus) / 3, atol=1e-6), k


def test_fused_qkv_is_three_matrices_by_default_and_one_when_asked(tiny):
    _, pre, taus = tiny
    key = f"{BLOCK}attn.in_proj_weight"
    assert pre[key].shape == (96, 32)
    split = wudi_merge(pre, taus, iters=40, lr=1e-3)[key] - pre[key]
    parts = [wudi_weight([t[key].chunk(3)[j] for t in taus], lr=1e-3, iters=40) for j in range(3)]
    assert torch.allclose(split, torch.cat(parts), atol=1e-6)
    fused = wudi_merge(pre, taus, iters=40, lr=1e-3, split_qkv=False)[key] - pre[key]
    assert torch.allclose(fused, wudi_weight([t[key] for t in taus], lr=1e-3, iters=40), atol=1e-6)
    assert (fused - split).abs().max() > 1e-3
    other = f"{BLOCK}mlp.c_fc.weight"  # only q;k;v differ between the two layouts
    a = wudi_merge(pre, taus, iters=40, lr=1e-3)
    b = wudi_merge(pre, taus, iters=40, lr=1e-3, split_qkv=False)
    assert torch.equal(a[other], b[other])


def test_the_same_on_hf_clip_keys(tiny):
    _, pre, taus = tiny
    experts = [{k: pre[k] + t[k] if k in t else pre[k] for k in pre} for t in taus]
    hf_pre = to_hf(pre, projection=False)
    hf_taus = [{k: v - hf_pre[k] for k, v in to_hf(e, projection=False).items() if v.is_floating_point()}
               for e in experts]
    ours = wudi_merge(pre, taus, iters=20, lr=1e-3)
    back = convert_hf_vision_state(wudi_merge(hf_pre, hf_taus, iters=20, lr=1e-3), projection=pre["proj"])
    assert max(float((ours[k] - back[k]).abs().max()) for k in ours) < 1e-6


def test_inputs_untouched_dtypes_round_trip_and_zero_task_vectors(tiny):
    _, pre, taus = tiny
    before = copy.deepcopy(taus)
    out = wudi_merge(pre, taus, lam=0.0, iters=3)
    assert all(torch.equal(out[k], pre[k]) for k in pre)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, taus) for k in a)
    bf = wudi_merge({k: v.bfloat16() for k, v in pre.items()}, [{k: v.bfloat16() for k, v in t.items()}
                                                                 for t in taus], iters=3)
    assert all(v.dtype == torch.bfloat16 for v in bf.values())
    ids = {"w.weight": torch.randn(6, 4), "ids": torch.arange(3)}
    zero = {"w.weight": torch.zeros(6, 4)}  # no loss term (the authors' code: 0/0)
    got = wudi_merge(ids, [zero, {"w.weight": torch.ones(6, 4)}], iters=5, is_optimized=lambda k, t: True)
    assert torch.equal(got["ids"], ids["ids"]) and torch.isfinite(got["w.weight"]).all()
    assert torch.equal(wudi_weight([zero["w.weight"]] * 2, iters=5), zero["w.weight"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.0}, "wudi lr must be a finite number > 0, got 0.0"),
        ({"lr": float("inf")}, "wudi lr must be a finite number > 0"),
        ({"iters": -1}, "wudi iters must be an integer >= 0, got -1"),
        ({"iters": 2.5}, "wudi iters must be an integer >= 0, got 2.5"),
        ({"variant": "vit"}, "wudi variant must be one of 'official', 'fusionbench', got 'vit'"),
        ({"split_qkv": "yes"}, "wudi split_qkv must be True or False, got 'yes'"),
        ({"lam": float("nan")}, "lam must be a finite number >= 0"),
    ],
)
def test_bad_arguments(tiny, kwargs, match):
    _, pre, taus = tiny
    with pytest.raises(MergeError, match=match):
        wudi_merge(pre, taus, **kwargs)


def test_bad_task_vectors(tiny):
    _, pre, taus = tiny
    key = f"{BLOCK}mlp.c_fc.weight"
    with pytest.raises(MergeError, match="empty list of task vectors"):
        wudi_merge(pre, [])
    with pytest.raises(MergeError, match=f"task vector 1: key '{key}' contains NaN"):
        wudi_merge(pre, [taus[0], dict(taus[1], **{key: torch.full_like(taus[1][key], float("nan"))})])
    with pytest.raises(MergeError, match=f"task vector 1: shape mismatch at key '{key}'"):
        wudi_merge(pre, [taus[0], dict(taus[1], **{key: torch.zeros(3, 3)})])


def test_by_name_label_and_presets(tiny):
    pool, pre, taus = tiny
    assert LABELS["wudi"] == "WUDI" and set(PRESETS["wudi"]) == {"official", "fusionbench"}
    direct = wudi_merge(pre, taus, iters=2)
    for k, v in merge_pool(pool, "wudi", iters=2).items():
        assert torch.equal(v, direct[k]), k
    assert PRESETS["wudi"] == {
        "official": {"variant": "official", "split_qkv": False, "lr": 1e-5, "iters": 300, "lam": 1.0},
        "fusionbench": {"variant": "fusionbench", "split_qkv": True, "lr": 1e-5, "iters": 400, "lam": 1.0},
    }
    cases = {"official": {"split_qkv": False}, "fusionbench": {"variant": "fusionbench"}}
    for preset, kwargs in cases.items():  # a preset's values reach the function (iters overridden: fast)
        want = wudi_merge(pre, taus, iters=3, **kwargs)
        for k, v in merge_pool(pool, "wudi", preset=preset, iters=3).items():
            assert torch.equal(v, want[k]), (preset, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_inputs_gpu_and_agrees_with_the_cpu(tiny):
    _, pre, taus = tiny
    cuda = [{k: v.cuda() for k, v in t.items()} for t in taus]
    out = wudi_merge({k: v.cuda() for k, v in pre.items()}, cuda, lr=1e-3, iters=50)
    want = wudi_merge(pre, taus, lr=1e-3, iters=50)
    assert all(v.is_cuda for v in out.values())
    assert max(float((out[k].cpu().float() - want[k].float()).abs().max()) for k in want) < 1e-5
