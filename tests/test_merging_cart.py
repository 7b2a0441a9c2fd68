"""CART against a numpy transcription of the authors' code (JH-GEECS/CART ``src/merging.py``): which keys
get the low rank, the rank rule, θ_avg + λ Σ SVD_r(θ_i − θ_avg); the weight-average limits (λ = 0, full
rank), the per-task directions, q, k, v as three matrices, dtypes, errors and merge_pool by name."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_pool
from test_models_checkpoints import to_hf

from adamerge.merging import MergeError, merge_pool
from adamerge.merging.cart import cart, cart_directions, cart_lowrank_key, cart_rank
from adamerge.models.hf_clip import convert_hf_vision_state

QKV = "blocks.0.attn.in_proj_weight"
SHAPES = {
    QKV: (96, 32),  # fused q;k;v, d = 32
    "blocks.0.attn.in_proj_bias": (96,),
    "blocks.0.mlp.c_fc.weight": (48, 32),
    "blocks.0.mlp.c_fc.bias": (48,),
    "blocks.0.mlp.c_proj.weight": (3, 7),  # min(m, n) = 3 < K = 5 tasks; ρ·3 < 1 → r = 1
    "blocks.0.ln_1.weight": (32,),
    "positional_embedding": (5, 32),  # 2-D, not attn / mlp: the weight average
    "proj": (32, 16),
    "conv1.weight": (32, 3, 2, 2),
}


def _setup(k=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pre = {key: torch.randn(s, generator=g).to(dtype) for key, s in SHAPES.items()}
    pre["ids"] = torch.arange(3)
    taus = [{key: (0.1 * torch.randn(s, generator=g)).to(dtype) for key, s in SHAPES.items()} for _ in range(k)]
    return pre, taus


def _np(state):
    return {k: v.double().numpy() for k, v in state.items() if v.is_floating_point()}


def _split_np(state):
    """q, k, v rows of the fused weight and bias as their own keys (written out, not fused.py)."""
    out = dict(state)
    for kind, key in (("weight", QKV), ("bias", "blocks.0.attn.in_proj_bias")):
        full = out.pop(key)
        for i, p in enumerate("qkv"):
            out[f"blocks.0.attn.{p}_proj.{kind}"] = full[32 * i: 32 * (i + 1)]
    return out


def _fuse_np(state):
    out = dict(state)
    out[QKV] = np.concatenate([out.pop(f"blocks.0.attn.{p}_proj.weight") for p in "qkv"])
    out["blocks.0.attn.in_proj_bias"] = np.concatenate([out.pop(f"blocks.0.attn.{p}_proj.bias") for p in "qkv"])
    return out


def _authors_cart(pre, taus, prior, rank_ratio):
    """StaticMergeModule._merge_weights("CART") with _get_truncated_task_vectors(prev_origin=θ0,
    new_origin=θ_avg), in float64: θ_avg + prior · Σ_i trunc(τ_i + θ0 − θ_avg)."""
    avg = {k: pre[k] + (1.0 / len(taus)) * sum(t[k] for t in taus) for k in pre}
    total = {k: np.zeros_like(v) for k, v in pre.items()}
    for t in taus:
        for key, value in t.items():
            val = value + pre[key] - avg[key]
            if ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key):
                u, s, vt = np.linalg.svd(val, full_matrices=False)
                dim = s.shape[0]
                if rank_ratio == 0.0:
                    u, s, vt = np.zeros_like(u), np.zeros_like(s), np.zeros_like(vt)
                    parsed = 1
                elif rank_ratio == 1.0:
                    parsed = dim
                else:
                    parsed = max(1, int(rank_ratio * dim))
                val = (u[:, :parsed] * s[:parsed]) @ vt[:parsed, :]
            elif rank_ratio == 0.0:
                val = np.zeros_like(val)
            total[key] += val
    return {k: avg[k] + prior * total[k] for k in avg}


def _close(got, want, atol=2e-5):
    assert set(want) <= set(got)
    for k, w in want.items():
        assert np.allclose(got[k].double().numpy(), w, atol=atol), k


@pytest.mark.parametrize("lam,rank_ratio", [(2.0, 0.12), (1.5, 0.16), (1.9, 0.32), (0.7, 0.5)])
def test_matches_the_authors_code_with_q_k_v_as_three_matrices(lam, rank_ratio):
    pre, taus = _setup()
    want = _fuse_np(_authors_cart(_split_np(_np(pre)), [_split_np(_np(t)) for t in taus], lam, rank_ratio))
    out = cart(pre, taus, lam=lam, rank_ratio=rank_ratio)
    _close(out, want)
    assert torch.equal(out["ids"], pre["ids"]) and list(out) == list(pre)


def test_fused_option_is_the_authors_single_svd_of_in_proj_weight():
    pre, taus = _setup()
    want = _authors_cart(_np(pre), [_np(t) for t in taus], 2.0, 0.12)  # their open_clip: one [96, 32] SVD
    fused = cart(pre, taus, split_qkv=False)
    _close(fused, want)
    split = cart(pre, taus)
    d_split, d_fused = split[QKV] - pre[QKV], fused[QKV] - pre[QKV]
    assert (d_split - d_fused).norm() > 0.1 * d_fused.norm()
    for key in pre:  # only the fused weight differs
        if key != QKV:
            assert torch.allclose(split[key], fused[key], atol=1e-6), key


def test_rank_rule():
    assert cart_rank(768, 768, 0.12) == 92 and cart_rank(3072, 768, 0.16) == 122  # int(122.88)
    assert cart_rank(768, 3072, 0.32) == 245 and cart_rank(2304, 768, 0.12) == 92
    assert cart_rank(3, 7, 0.12) == 1  # max(1, int(0.36))
    assert cart_rank(48, 32, 1.0) == 32 and cart_rank(48, 32, 0.0) == 0


def test_lowrank_keys_are_attention_and_mlp_matrices():
    w, b = torch.zeros(4, 4), torch.zeros(4)
    assert cart_lowrank_key("transformer.resblocks.0.attn.q_proj.weight", w)
    assert cart_lowrank_key("vision_model.encoder.layers.0.self_attn.out_proj.weight", w)
    assert cart_lowrank_key("transformer.resblocks.0.mlp.c_fc.weight", w)
    assert not cart_lowrank_key("transformer.resblocks.0.mlp.c_fc.bias", b)
    assert not cart_lowrank_key("transformer.resblocks.0.ln_1.weight", b)
    assert not cart_lowrank_key("positional_embedding", w) and not cart_lowrank_key("proj", w)


def test_lambda_zero_and_full_rank_give_the_weight_average_not_task_arithmetic():
    """Σ_i (τ_i − τ̄) = 0: without truncation the centred vectors cancel whatever λ is."""
    pre, taus = _setup()
    avg = {k: pre[k] + sum(t[k] for t in taus) / len(taus) for k in taus[0]}
    for kwargs in ({"lam": 0.0}, {"rank_ratio": 1.0, "lam": 1.0}, {"rank_ratio": 1.0, "lam": 2.0},
                   {"rank_ratio": 0.0}):
        out = cart(pre, taus, **kwargs)
        for k, want in avg.items():
            assert torch.allclose(out[k], want, atol=1e-5), (kwargs, k)
    ta = pre[QKV] + sum(t[QKV] for t in taus)
    assert not torch.allclose(cart(pre, taus, rank_ratio=1.0, lam=1.0)[QKV], ta, atol=1e-2)
    assert not torch.allclose(cart(pre, taus)[QKV], avg[QKV], atol=1e-3)  # the truncation is what moves it


def test_directions_rebuild_the_merge_and_have_rank_r():
    pre, taus = _setup()
    base, dirs = cart_directions(pre, taus, rank_ratio=0.12)
    assert len(dirs) == len(taus) and set(dirs[0]) == set(taus[0])
    out = cart(pre, taus, lam=2.0, rank_ratio=0.12)
    for k in taus[0]:
        assert torch.allclose(base[k] + 2.0 * sum(d[k] for d in dirs), out[k], atol=1e-5), k
    assert torch.equal(base["ids"], pre["ids"])
    for i, (d, t) in enumerate(zip(dirs, taus)):
        centred = {k: t[k] - sum(u[k] for u in taus) / len(taus) for k in t}
        for k in ("blocks.0.ln_1.weight", "positional_embedding", "conv1.weight", "blocks.0.attn.in_proj_bias"):
            assert torch.allclose(d[k], centred[k], atol=1e-6), (i, k)
        for block in d[QKV].chunk(3):  # q, k, v: r = int(0.12 · 32) = 3 each
            assert torch.linalg.matrix_rank(block) == 3
        assert torch.linalg.matrix_rank(d[QKV]) == 9
        assert torch.linalg.matrix_rank(d["blocks.0.mlp.c_fc.weight"]) == 3
        assert torch.linalg.matrix_rank(d["blocks.0.mlp.c_proj.weight"]) == 1
    _, fused = cart_directions(pre, taus, rank_ratio=0.12, split_qkv=False)
    assert torch.linalg.matrix_rank(fused[0][QKV]) == 3


def test_inputs_untouched_and_bf16_round_trip():
    pre, taus = _setup(dtype=torch.bfloat16)
    before = copy.deepcopy((pre, taus))
    out = cart(pre, taus)
    base, dirs = cart_directions(pre, taus)
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), pre.values()))
    assert all(torch.equal(t[k], u[k]) for t, u in zip(before[1], taus) for k in t)
    assert all(v.dtype == pre[k].dtype for k, v in out.items())
    assert all(v.dtype == pre[k].dtype for k, v in base.items())
    assert dirs[0][QKV].dtype == torch.bfloat16
    want = cart({k: v.float() if v.is_floating_point() else v for k, v in pre.items()},
                [{k: v.float() for k, v in t.items()} for t in taus])
    assert torch.allclose(out[QKV].float(), want[QKV].to(torch.bfloat16).float(), atol=2e-2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank_ratio": 1.5}, r"cart rank_ratio must lie in \[0, 1\], got 1.5"),
        ({"rank_ratio": -0.1}, r"cart rank_ratio must lie in \[0, 1\]"),
        ({"rank_ratio": "a"}, "cart rank_ratio must be a number"),
        ({"lam": -1.0}, "lam must be a finite number >= 0"),
        ({"lam": float("nan")}, "lam must be a finite number >= 0"),
        ({"is_lowrank": lambda k, t: "bias" in k}, "is_lowrank chose key 'blocks.0.attn.q_proj.bias' of shape"),
    ],
)
def test_bad_arguments(kwargs, match):
    pre, taus = _setup(k=2)
    with pytest.raises(MergeError, match=match):
        cart(pre, taus, **kwargs)


def test_bad_task_vectors():
    pre, taus = _setup(k=2)
    with pytest.raises(MergeError, match="empty list"):
        cart(pre, [])
    with pytest.raises(MergeError, match="single state dict"):
        cart_directions(pre, taus[0])
    with pytest.raises(MergeError, match="task vector 1: key 'proj' contains NaN"):
        cart(pre, [taus[0], dict(taus[1], proj=torch.full((32, 16), float("nan")))])
    with pytest.raises(MergeError, match="task vector 1: shape mismatch at key 'proj'"):
        cart(pre, [taus[0], dict(taus[1], proj=torch.zeros(16, 32))])
    small = {k: v for k, v in pre.items() if k != "proj"}
    with pytest.raises(MergeError, match="task vector key 'proj' is missing from the pretrained state dict"):
        cart(small, taus)


@pytest.fixture(scope="module")
def tiny():
    pool = make_tiny_pool(num_tasks=3)
    return pool, pool.pretrained_state(), [tau for _, tau in pool.task_vectors()]


def test_merge_pool_by_name_and_presets(tiny):
    pool, pre, taus = tiny
    fused = {"split_qkv": False}  # the authors' open_clip runs: one SVD of in_proj_weight
    for kwargs, preset in (({}, None), (fused, "official"), ({"lam": 1.5, "rank_ratio": 0.16, **fused}, "official_14"),
                           ({"lam": 1.9, "rank_ratio": 0.32, **fused}, "official_20")):
        want, got = cart(pre, taus, **kwargs), merge_pool(pool, "cart", preset=preset)
        assert set(got) == set(want)
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), preset
    enc = pool.build_encoder(merge_pool(pool, "cart"))
    assert torch.isfinite(enc(torch.randn(2, 3, 16, 16))).all()


def test_open_clip_layout_equals_hf_layout(tiny):
    """q, k, v are three matrices: the fused open_clip merge equals the merge of HF's q_proj/k_proj/v_proj."""
    _, pre, taus = tiny
    taus = [dict(t, proj=torch.zeros_like(t["proj"])) for t in taus]  # HF CLIPVisionModel has no proj
    hf_pre = to_hf(pre, projection=False)
    hf_taus = [{k: v - hf_pre[k] for k, v in to_hf({k: pre[k] + t[k] for k in t}, projection=False).items()
                if v.is_floating_point()} for t in taus]
    ours = cart(pre, taus)
    back = convert_hf_vision_state(cart(hf_pre, hf_taus), projection=pre["proj"])
    assert set(back) == set(ours)
    assert max(float((ours[k] - back[k]).abs().max()) for k in ours) < 1e-5
    key = "transformer.resblocks.0.attn.in_proj_weight"
    fused = cart(pre, taus, split_qkv=False)
    assert (fused[key] - ours[key]).norm() > 0.05 * (ours[key] - pre[key]).norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_inputs_device():
    pre, taus = _setup()
    cpu = cart(pre, taus)
    gpu = cart({k: v.cuda() for k, v in pre.items()}, [{k: v.cuda() for k, v in t.items()} for t in taus])
    assert gpu[QKV].device.type == "cuda"
    assert all(torch.allclose(gpu[k].cpu(), cpu[k], atol=1e-4) for k in cpu)
