"""AdaRankModel against merges, SVDs and gradients written out in the test, on the tiny pool.

The tiny pool's masked weights are non-square ([96, 32] fused q;k;v, [64, 32] c_fc, [32, 64] c_proj)
and every task's mask pattern is drawn at random per matrix: a transposed factor, a mask applied to
the wrong task or matrix, q/k/v in the wrong order or a fused SVD where a split one is asked for all
change the merged weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pool
from torch import nn
from torch.func import functional_call

from adamerge.components.adamerging import AdaMergingModel
from adamerge.components.adarank import AdaRankModel
from adamerge.components.losses import entropy
from adamerge.merging.cart import cart
from adamerge.merging.task_vectors import MergeError
from adamerge.models.pool import ModelPool

LOWRANK = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def soft_pool(num_tasks: int = 3) -> ModelPool:
    """The tiny pool with a moderate logit scale (entropy far from saturated) and larger task vectors."""
    p = make_tiny_pool(num_tasks, scale=0.2)
    return ModelPool(p.encoder, {t: p.expert_state(t) for t in p.tasks}, p.heads, 10.0, name="tiny")


def blocks(key: str, t: torch.Tensor, split: bool) -> list[tuple[int, int]]:
    """Row ranges (start, stop) of the masked matrices of ``key`` (q, k, v apart when ``split``)."""
    if split and key.endswith("in_proj_weight"):
        d = t.shape[1]
        return [(0, d), (d, 2 * d), (2 * d, 3 * d)]
    return [(0, t.shape[0])]


def randomise(model: AdaRankModel, seed: int = 0) -> None:
    """Random λ in [0.2, 1.2] and mask logits ±(0.05…1.05): about half the components on, none at 1/2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lambdas.copy_(0.2 + torch.rand(model.lambdas.shape, generator=g))
        sign = torch.randint(0, 2, model.mask_logits.shape, generator=g) * 2 - 1
        model.mask_logits.copy_(sign * (0.05 + torch.rand(model.mask_logits.shape, generator=g)))


def masks_by_matrix(model: AdaRankModel) -> dict[tuple[str, int], torch.Tensor]:
    """{(key, first row): logits [K, r]}: ``mask_logits``' columns follow ``model.matrices``, r each."""
    out, offset = {}, 0
    for mat in model.matrices:
        out[(mat.key, mat.row0)] = model.mask_logits.detach()[:, offset : offset + mat.rank]
        offset += mat.rank
    assert offset == model.mask_logits.shape[1]
    return out


def explicit_merge(origin, dirs, lam, masks=None, temp=10.0, split=True, rank=None):
    """origin + Σ_k λ[k, l] U diag(σ ⊙ m) Vᵀ per masked block (SVD taken here), + λ d elsewhere."""
    out = {}
    for l, key in enumerate(k for k, v in origin.items() if v.is_floating_point()):
        acc = origin[key].clone().float()
        for k, d in enumerate(dirs):
            if not key.endswith(LOWRANK):
                acc = acc + lam[k, l] * d[key]
                continue
            for r0, r1 in blocks(key, d[key], split):
                u, s, vh = torch.linalg.svd(d[key][r0:r1].double(), full_matrices=False)
                r = rank or s.numel()
                m = torch.ones(r) if masks is None else (torch.sigmoid(masks[(key, r0)][k] / temp) > 0.5).double()
                part = (u[:, :r] * (s[:r] * m)) @ vh[:r]
                acc[r0:r1] += (lam[k, l] * part).float()
        out[key] = acc
    return out


def check_close(merged, expected, scale=1e-5):
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=scale, msg=key)


@pytest.mark.parametrize("directions", ["task_arithmetic", {"method": "cart", "rank_ratio": 1.0}])
def test_all_masks_on_equal_adamerging_and_the_explicit_sum(directions):
    pool = make_tiny_pool()
    model = AdaRankModel(pool, directions=directions)
    randomise(model)
    with torch.no_grad():
        model.mask_logits.fill_(0.1)
    lam = model.lambdas.detach()
    theta0 = pool.pretrained_state()
    taus = [pool.task_vector(t) for t in pool.tasks]
    if directions == "task_arithmetic":
        origin, dirs = theta0, taus
    else:  # CART at full rank: the weight average and the centred task vectors
        mean = {k: sum(t[k] for t in taus) / 3 for k in taus[0]}
        origin = {k: v + mean[k] if k in mean else v for k, v in theta0.items()}
        dirs = [{k: t[k] - mean[k] for k in t} for t in taus]
    expected = {k: origin[k] + sum(lam[i, l] * dirs[i][k] for i in range(3)) for l, k in enumerate(model.layer_names)}
    merged = model.merged_state_dict()
    assert set(merged) == set(theta0)
    check_close(merged, expected)
    ada = AdaMergingModel(pool, directions=directions, clamp=False)
    with torch.no_grad():
        ada.lambdas.copy_(lam)
    check_close(merged, ada.merged_state_dict())


def test_task_wise_clamped_lambdas_scale_every_tensor_of_a_task():
    pool = make_tiny_pool()
    model = AdaRankModel(pool, granularity="task", clamp=True, init_lam=0.5)
    assert model.lambdas.shape == (3, 1) and model.label == "AdaRank (task-wise λ)"
    with torch.no_grad():
        model.lambdas.copy_(torch.tensor([[1.4], [-0.2], [0.6]]))  # clamped to 1, 0, 0.6 in the merge
    theta0, taus = pool.pretrained_state(), [pool.task_vector(t) for t in pool.tasks]
    expected = {k: theta0[k] + taus[0][k] + 0.6 * taus[2][k] for k in model.layer_names}
    check_close(model.merged_state_dict(), expected)
    torch.testing.assert_close(model.coefficients()[:, 0], torch.tensor([1.0, 0.0, 0.6]))


@pytest.mark.parametrize("split", [True, False])
def test_a_mask_pattern_keeps_exactly_its_singular_components(split):
    pool = make_tiny_pool()
    model = AdaRankModel(pool, split_qkv=split, mask_temp=2.0)
    randomise(model, seed=1)
    hard = model.hard_masks()
    assert 0.3 < hard.mean() < 0.7
    taus = [pool.task_vector(t) for t in pool.tasks]
    expected = explicit_merge(pool.pretrained_state(), taus, model.lambdas.detach(), masks_by_matrix(model),
                              temp=2.0, split=split)
    check_close(model.merged_state_dict(), expected)
    images = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model(images), pool.build_encoder(model.merged_state_dict())(images),
                               rtol=1e-5, atol=1e-5)


def test_mask_and_lambda_gradients_follow_the_straight_through_formula():
    pool = soft_pool()
    model = AdaRankModel(pool, mask_temp=3.0)
    randomise(model, seed=2)
    g = torch.Generator().manual_seed(5)
    batches = {t: torch.randn(6, 3, 16, 16, generator=g) for t in pool.tasks}

    def loss_of(features):
        return sum(entropy(pool.logit_scale * F.normalize(features(x), dim=-1) @ pool.heads[t].t()).mean()
                   for t, x in batches.items())

    loss_of(model).backward()
    # Independent: the explicitly merged weights as leaves; G = ∂L/∂θ through a fresh encoder.
    taus = [pool.task_vector(t) for t in pool.tasks]
    lam, temp, masks = model.lambdas.detach(), 3.0, masks_by_matrix(model)
    merged = {k: v.requires_grad_(True) for k, v in explicit_merge(
        pool.pretrained_state(), taus, lam, masks, temp=temp).items()}
    encoder = pool.build_encoder()
    grads = dict(zip(merged, torch.autograd.grad(loss_of(lambda x: functional_call(encoder, merged, (x,))),
                                                 list(merged.values()))))
    assert model.mask_logits.grad.abs().max() > 1e-6  # a gradient that could be wrong
    offset = 0
    want_lam = torch.zeros_like(lam)
    for l, key in enumerate(model.layer_names):
        if not key.endswith(LOWRANK):
            want_lam[:, l] = torch.stack([(grads[key] * t[key]).sum() for t in taus])
    for mat in model.matrices:
        l = model.layer_names.index(mat.key)
        gblock = grads[mat.key][mat.row0 : mat.row0 + mat.shape[0]].double()
        for k, tau in enumerate(taus):
            u, s, vh = torch.linalg.svd(tau[mat.key][mat.row0 : mat.row0 + mat.shape[0]].double(), full_matrices=False)
            z = masks[(mat.key, mat.row0)][k].double()
            sig = torch.sigmoid(z / temp)
            proj = torch.einsum("mj,mn,jn->j", u, gblock, vh)  # u_jᵀ G v_j
            want = lam[k, l] * s * sig * (1 - sig) / temp * proj  # ∂L/∂z_j: sigmoid' / T, σ-weighted
            got = model.mask_logits.grad[k, offset : offset + mat.rank].double()
            torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4 * want.abs().max().item())  # float32 G
            want_lam[k, l] += (s * (sig > 0.5).double() * proj).sum().float()  # ∂L/∂λ = ⟨G, masked d⟩
        offset += mat.rank
    torch.testing.assert_close(model.lambdas.grad, want_lam, rtol=2e-3, atol=1e-4 * want_lam.abs().max().item())


def test_only_lambdas_and_mask_logits_learn_and_are_saved():
    pool = make_tiny_pool()
    model = AdaRankModel(pool)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lambdas", "mask_logits"]
    assert [n for n, _ in model.named_parameters()] == ["lambdas", "mask_logits"]
    assert list(model.state_dict()) == ["lambdas", "mask_logits"]
    assert model.lambdas.shape == (3, len(model.layer_names))
    assert model.mask_logits.shape == (3, sum(mat.rank for mat in model.matrices))
    assert model.svd_bytes() > 0 and model.dense_directions.shape[0] == 3
    model.train()
    assert not model.encoder.training


def test_split_qkv_gives_three_masks_per_fused_weight():
    pool = make_tiny_pool()
    split, fused = AdaRankModel(pool), AdaRankModel(pool, split_qkv=False)
    names = split.matrix_names
    assert names[:6] == [f"transformer.resblocks.0.{n}" for n in (
        "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.out_proj.weight",
        "mlp.c_fc.weight", "mlp.c_proj.weight")]
    assert len(names) == 12 and split.full_ranks() == [32] * 12 and split.mask_logits.shape == (3, 12 * 32)
    assert len(fused.matrix_names) == 8 and fused.matrix_names[0] == "transformer.resblocks.0.attn.in_proj_weight"
    assert fused.mask_logits.shape == (3, 8 * 32)  # one SVD of [96, 32]: 32 components for q, k, v together
    with torch.no_grad():
        split.mask_logits[:, :32] = -1.0  # prune block 0's q of every task: k and v keep theirs
    merged, theta0 = split.merged_state_dict(), pool.pretrained_state()
    key = "transformer.resblocks.0.attn.in_proj_weight"
    torch.testing.assert_close(merged[key][:32], theta0[key][:32])
    assert (merged[key][32:] - theta0[key][32:]).abs().min(dim=1).values.max() > 0


def test_max_rank_ratio_stores_and_merges_the_top_components():
    pool = make_tiny_pool()
    full, half = AdaRankModel(pool), AdaRankModel(pool, max_rank_ratio=0.5)
    assert half.stored_ranks() == [16] * 12 and half.full_ranks() == [32] * 12
    assert half.svd_bytes() < 0.55 * full.svd_bytes()
    taus = [pool.task_vector(t) for t in pool.tasks]
    expected = explicit_merge(pool.pretrained_state(), taus, half.lambdas.detach(), rank=16)
    check_close(half.merged_state_dict(), expected)
    assert half.ranks().eq(16).all()


def test_initial_ranks_start_at_the_cart_merge():
    """AdaRank (CART) at its start: λ = 2.3 on the top int(0.16·32) = 5 components is CART (2.3, 0.16)."""
    pool = make_tiny_pool()
    model = AdaRankModel(pool, directions={"method": "cart", "rank_ratio": 1.0}, init_lam=2.3,
                         initial_rank_ratio=0.16, split_qkv=False)
    assert model.ranks().eq(5).all()
    static = cart(pool.pretrained_state(), [pool.task_vector(t) for t in pool.tasks], lam=2.3, rank_ratio=0.16,
                  split_qkv=False)
    check_close(model.merged_state_dict(), static, scale=2e-5)
    assert AdaRankModel(pool, initial_rank_ratio=0.0).ranks().eq(10).all()  # 0 means 1/K: int(32/3)


def test_bfloat16_factors_close_to_float32():
    pool = soft_pool()
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    models, grads = [], []
    for dtype in ("float32", "bfloat16"):
        model = AdaRankModel(pool, svd_dtype=dtype)
        randomise(model, seed=3)
        feats = F.normalize(model(images), dim=-1)
        sum(entropy(pool.logit_scale * feats @ pool.heads[t].t()).mean() for t in pool.tasks).backward()
        models.append(model)
        grads.append((model.lambdas.grad, model.mask_logits.grad))
    f32, bf16 = models
    assert bf16.svd_u0.dtype == torch.bfloat16 and bf16.svd_bytes() < 0.6 * f32.svd_bytes()
    a, b, theta0 = f32.merged_state_dict(), bf16.merged_state_dict(), pool.pretrained_state()
    for key in a:
        tau_scale = (a[key] - theta0[key]).abs().max().item()
        assert (a[key] - b[key]).abs().max().item() <= 0.02 * tau_scale + 1e-7, key
    for g32, g16 in zip(*grads):
        assert g16.dtype == torch.float32
        torch.testing.assert_close(g16, g32, rtol=0.05, atol=0.03 * g32.abs().max().item())


def test_caller_pool_untouched():
    pool = make_tiny_pool()
    before = {k: v.clone() for k, v in pool.encoder.state_dict().items()}
    model = AdaRankModel(pool)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    for k, v in pool.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_options_are_named():
    pool = make_tiny_pool()
    for kwargs, match in [
        ({"granularity": "block"}, "granularity"),
        ({"svd_dtype": "float16"}, "svd_dtype"),
        ({"mask_temp": 0.0}, "mask_temp"),
        ({"initial_rank_ratio": 1.5}, "initial_rank_ratio"),
        ({"max_rank_ratio": 0.0}, "max_rank_ratio"),
        ({"init_lam": 2.3, "clamp": True}, "init_lam"),
        ({"init_lam": float("nan")}, "init_lam"),
        ({"directions": 3}, "directions"),
    ]:
        with pytest.raises(ValueError, match=match):
            AdaRankModel(pool, **kwargs)
    with pytest.raises(TypeError, match="split_qkv must be True or False"):
        AdaRankModel(pool, split_qkv="yes")
    with pytest.raises(MergeError, match="unknown directions method 'nope'"):
        AdaRankModel(pool, directions="nope")
    with pytest.raises(ValueError, match="task 'task9'"):
        AdaRankModel(pool, tasks=["task0", "task9"])
    lin = nn.Linear(4, 3)
    experts = {"a": {k: v + 0.1 for k, v in lin.state_dict().items()}}
    plain = ModelPool(lin, experts, {"a": F.normalize(torch.randn(2, 3), dim=-1)}, 10.0, name="lin")
    with pytest.raises(MergeError, match="no 2-D attention / MLP weights"):
        AdaRankModel(plain)
