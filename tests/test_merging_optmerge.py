"""OptMerge against the authors' two code variants: a numpy SGD-with-momentum loop with the loss's
gradient written out by hand (``"llamafactory"``) and a line-by-line torch port of their CLIP-ViT
``wudi_merge_v2`` (``"clip"``, the default); the parity choices (kept keys, rank formula) on a tiny CLIP."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_pool

from adamerge.merging import MergeError, merge_pool, optmerge
from adamerge.merging.optmerge import llamafactory_keeps, optmerge_rank, optmerge_weight


def _setup(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "fc.weight": torch.randn(5, 4, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "ids": torch.arange(2),
    }
    taus = [
        {"fc.weight": torch.randn(5, 4, generator=g), "fc.bias": torch.randn(5, generator=g)}
        for _ in range(n)
    ]
    return pre, taus


def _numpy_optmerge(taus, lr, momentum, iters):
    """grad = Σ_i 2 (τ − τ̂_i) L_iᵀ L_i / ‖τ_i‖², torch.optim.SGD's momentum rule (buf = μ·buf + g)."""
    m, n = taus[0].shape
    k = int(min(m, n) / len(taus))  # LLaMA-Factory/model_merging.py: int(s.shape[0] / N)
    terms = []
    for t in taus:
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        lk = np.diag(s[:k]) @ vt[:k]
        terms.append((u[:, :k] @ lk, lk, (t**2).sum()))
    tau = np.mean(taus, axis=0)
    buf = np.zeros_like(tau)
    for _ in range(iters):
        grad = sum(2 * (tau - th) @ lk.T @ lk / ns for th, lk, ns in terms)
        buf = momentum * buf + grad
        tau = tau - lr * buf
    return tau


def _loss(tau, taus):
    k = int(min(tau.shape) / len(taus))
    total = 0.0
    for t in taus:
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        lk = np.diag(s[:k]) @ vt[:k]
        total += (((tau - u[:, :k] @ lk) @ lk.T) ** 2).sum() / (t**2).sum()
    return total


@pytest.mark.parametrize("lr,momentum,iters", [(0.05, 0.9, 25), (0.1, 0.0, 10), (1e-4, 0.9, 300)])
def test_matches_numpy_sgd(lr, momentum, iters):
    pre, taus = _setup()
    ws = [t["fc.weight"].double().numpy() for t in taus]
    want = pre["fc.weight"].double().numpy() + _numpy_optmerge(ws, lr, momentum, iters)
    out = optmerge(pre, taus, variant="llamafactory", lr=lr, momentum=momentum, iters=iters)
    assert np.allclose(out["fc.weight"].double().numpy(), want, atol=1e-5)
    assert torch.equal(out["fc.bias"], pre["fc.bias"])  # excluded by the authors' regex '.*bias.*': θ0
    assert torch.equal(out["ids"], pre["ids"])
    # the clip variant averages what it does not optimise
    out = optmerge(pre, taus, iters=2)
    assert torch.allclose(out["fc.bias"], pre["fc.bias"] + sum(t["fc.bias"] for t in taus) / 3, atol=1e-6)


def test_optimisation_lowers_the_loss_and_zero_iters_is_the_mean():
    pre, taus = _setup()
    ws = [t["fc.weight"].double().numpy() for t in taus]
    start = optmerge(pre, taus, variant="llamafactory", iters=0)
    assert torch.allclose(
        start["fc.weight"], pre["fc.weight"] + sum(t["fc.weight"] for t in taus) / 3, atol=1e-6
    )
    tuned = optmerge(pre, taus, variant="llamafactory", lr=0.05, iters=50)
    loss0 = _loss((start["fc.weight"] - pre["fc.weight"]).double().numpy(), ws)
    loss1 = _loss((tuned["fc.weight"] - pre["fc.weight"]).double().numpy(), ws)
    assert loss1 < 0.5 * loss0


def test_lambda_no_mutation_half_and_zero_task_vector():
    pre, taus = _setup()
    before = copy.deepcopy(taus)
    out = optmerge(pre, taus, lam=0.0, iters=5)
    assert all(torch.equal(out[k], pre[k]) for k in pre)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, taus) for k in a)
    zero = {k: torch.zeros_like(v) for k, v in taus[0].items()}  # no loss term, no division by zero
    assert torch.isfinite(optmerge(pre, [zero, taus[1]], iters=5)["fc.weight"]).all()
    half = optmerge(
        {k: v.half() if v.is_floating_point() else v for k, v in pre.items()},
        [{k: v.half() for k, v in t.items()} for t in taus],
        iters=3,
    )
    assert half["fc.weight"].dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"momentum": 1.0, "variant": "llamafactory"}, r"momentum must lie in \[0, 1\)"),
        ({"momentum": 0.9}, "momentum applies to SGD .variant 'llamafactory'., not 'clip'"),
        ({"variant": "qwen"}, "optmerge variant must be one of 'clip', 'llamafactory', got 'qwen'"),
        ({"iters": -1}, "iters must be an integer >= 0"),
        ({"iters": 2.5}, "iters must be an integer >= 0"),
        ({"lam": float("nan")}, "lam must be a finite number >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    pre, taus = _setup()
    with pytest.raises(MergeError, match=match):
        optmerge(pre, taus, **kwargs)


def test_bad_task_vectors():
    pre, taus = _setup()
    with pytest.raises(MergeError, match="empty list"):
        optmerge(pre, [])
    with pytest.raises(MergeError, match="task vector 1: key 'fc.weight' contains NaN"):
        optmerge(pre, [taus[0], dict(taus[1], **{"fc.weight": torch.full((5, 4), float("nan"))})])


def _official_clip_wudi2(vectors, iter_num, learning_rate):
    """WalkerWorldPeace/MLLMerging fusion_bench/.../yongxianwei_merging/functional.py::wudi_merge_v2's
    per-weight loop, transcribed: full SVDs, masked m×n projector, centred target, Adam from Σ τ_i."""
    vectors = torch.stack(vectors).float()
    N, m, n = vectors.shape
    min_dim = min(m, n)
    K = min(max(1, min_dim // N), min_dim)
    average_vector = vectors.mean(dim=0)
    low_rank_list, taskvector_list = [], []
    for i in range(N):
        v_i = vectors[i]
        _, s_full, vh_full = torch.linalg.svd(v_i, full_matrices=True)
        u_res, s_res, vh_res = torch.linalg.svd(v_i - average_vector, full_matrices=False)
        s_mask = torch.zeros_like(s_full)
        s_mask[:K] = 1.0
        v_mask = torch.zeros_like(vh_full)
        v_mask[:K, :] = 1.0
        S_matrix = torch.zeros(m, n)
        S_matrix[:min_dim, :min_dim] = torch.diag_embed(s_full * s_mask)
        low_rank_list.append(S_matrix @ (vh_full * v_mask))
        taskvector_list.append(u_res[:, :K] @ torch.diag_embed(s_res[:K]) @ vh_res[:K, :] + average_vector)
    low_rank, taskvector = torch.stack(low_rank_list), torch.stack(taskvector_list)
    merging_vector = torch.nn.Parameter(vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merging_vector], lr=learning_rate)
    l2_norms = torch.norm(vectors.reshape(N, -1), p=2, dim=-1).square()
    for _ in range(iter_num):
        inner = torch.matmul(merging_vector.unsqueeze(0) - taskvector, low_rank.transpose(1, 2))
        loss = (inner.square() / l2_norms.unsqueeze(-1).unsqueeze(-1)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merging_vector.data.detach()


@pytest.mark.parametrize(
    "shape,n_tasks,lr,iters", [((5, 4), 3, 1e-5, 300), ((6, 9), 2, 1e-2, 40), ((3, 7), 4, 1e-2, 25)]
)
def test_clip_variant_matches_the_authors_clip_port(shape, n_tasks, lr, iters):
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(*shape, generator=g) for _ in range(n_tasks)]
    want = _official_clip_wudi2(ws, iters, lr)
    got = optmerge_weight(ws, "clip", lr=lr, iters=iters)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, torch.stack(ws).sum(0), atol=1e-4)  # it did move from Σ τ_i


def test_rank_formula_when_there_are_more_tasks_than_rows():
    """Official: int(min(m, n)/N) in the MLLM scripts (0 → an all-zero projector, no loss term),
    max(1, ⌊min(m, n)/N⌋) in the CLIP port."""
    assert optmerge_rank(2, 5, 3, "llamafactory") == 0 and optmerge_rank(2, 5, 3, "clip") == 1
    assert optmerge_rank(64, 32, 8, "llamafactory") == optmerge_rank(64, 32, 8, "clip") == 4
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(2, 5, generator=g) for _ in range(3)]
    mean = torch.stack(ws).mean(0)
    assert torch.equal(optmerge_weight(ws, "llamafactory", lr=0.1, iters=50), mean)  # nothing to fit
    moved = optmerge_weight(ws, "clip", lr=0.1, iters=50)
    assert not torch.allclose(moved, torch.stack(ws).sum(0)) and torch.isfinite(moved).all()


@pytest.fixture(scope="module")
def tiny():
    pool = make_tiny_pool(num_tasks=3)
    return pool.pretrained_state(), [tau for _, tau in pool.task_vectors()]


def test_llamafactory_keeps_biases_norms_and_embeddings_at_theta0(tiny):
    pre, taus = tiny
    out = optmerge(pre, taus, variant="llamafactory", iters=2)
    kept = {k for k in pre if llamafactory_keeps(k, pre[k])}
    assert {"class_embedding", "positional_embedding", "conv1.weight", "ln_pre.weight", "ln_post.bias",
            "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.1.attn.in_proj_bias",
            "transformer.resblocks.0.mlp.c_fc.bias"} <= kept
    block = "transformer.resblocks.0."
    assert not kept & {f"{block}attn.in_proj_weight", f"{block}attn.out_proj.weight", f"{block}mlp.c_fc.weight",
                       f"{block}mlp.c_proj.weight", "proj"}
    for k in pre:
        assert torch.equal(out[k], pre[k]) == (k in kept), k


def test_clip_variant_optimises_every_2d_tensor_and_averages_the_rest(tiny):
    pre, taus = tiny
    out = optmerge(pre, taus, lr=1e-3, iters=5)
    mean = {k: sum(t[k] for t in taus) / len(taus) for k in taus[0]}
    total = {k: sum(t[k] for t in taus) for k in taus[0]}
    for k, t in taus[0].items():
        tau = out[k] - pre[k]
        if t.dim() == 2:  # q, k, v, out_proj, MLP, positional_embedding, proj: Adam from Σ τ_i
            assert not torch.allclose(tau, mean[k], atol=1e-4), k
            assert (tau - total[k]).abs().max() <= 1.1 * 5 * 1e-3, k  # Adam moves ~≤ lr per step
        else:  # biases, norms, class_embedding, conv1 (4-D): the mean
            assert torch.allclose(tau, mean[k], atol=1e-6), k


def test_the_two_variants_differ(tiny):
    pre, taus = tiny
    a, b = optmerge(pre, taus, iters=3), optmerge(pre, taus, variant="llamafactory", iters=3)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert (a[key] - b[key]).norm() > 0.5 * (b[key] - pre[key]).norm()


def test_presets_spell_out_the_two_official_runs():
    pool = make_tiny_pool(num_tasks=2)
    pre, taus = pool.pretrained_state(), [tau for _, tau in pool.task_vectors()]
    default = optmerge(pre, taus, iters=2)
    for key, v in merge_pool(pool, "optmerge", preset="clip", iters=2).items():
        assert torch.allclose(v, default[key], atol=1e-6), key
    want = optmerge(pre, taus, variant="llamafactory", iters=2)
    for key, v in merge_pool(pool, "optmerge", preset="llamafactory", iters=2).items():
        assert torch.allclose(v, want[key], atol=1e-6), key
