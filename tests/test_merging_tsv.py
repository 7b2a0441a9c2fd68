"""TSV-M against a float64 transcription of the authors' per-weight computation (zero-padded stacks,
polar factors by SVD), the orthogonal rank-1 property, which keys are merged or averaged, the rank
budget when K > min(m, n), q/k/v as three matrices, and merge_pool by name on a tiny CLIP."""

import copy

import pytest
import torch
from conftest import make_tiny_pool
from test_merging_fused import _attn_change, _max_diff, layouts  # noqa: F401  (layouts: a fixture)

from adamerge.merging import MergeError, merge_pool
from adamerge.merging.registry import LABELS, PRESETS
from adamerge.merging.tsv import is_tsv_matrix, tsv_merge, tsv_merge_weight, tsv_rank


def _authors(ws):
    """AntoAndGar/task_singular_vectors src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction for
    one 2-D key, in float64: task i's top-r triplets go to slots i·r…(i+1)·r−1 of zero [m, p], [p],
    [p, n] buffers (p = min(m, n), r = int(p · 1/K)); τ = polar(U) diag(σ) polar(Vᵀ)."""
    ws = [w.double() for w in ws]
    p = min(ws[0].shape)
    r = int(p * (1 / len(ws)))
    m, n = ws[0].shape
    big_u, sig, big_vh = (torch.zeros(*shape, dtype=torch.float64) for shape in ((m, p), (p,), (p, n)))
    for i, w in enumerate(ws):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        big_u[:, i * r:(i + 1) * r] = u[:, :r]
        sig[i * r:(i + 1) * r] = s[:r]
        big_vh[i * r:(i + 1) * r] = vh[:r]
    pu, _, qu = torch.linalg.svd(big_u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(big_vh, full_matrices=False)
    return (pu @ qu @ torch.diag(sig) @ pv @ qv).float()


def _close(got, want, rel=1e-4):
    """‖got − want‖ <= rel·‖want‖ (float32 polar factors of a stack vs the float64 transcription)."""
    return float((got - want).norm()) <= rel * float(want.norm())


def _randn(*shape, seed=0, k=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(k)]


RANDOM = {"48x32-K3": ((48, 32), 3), "32x48-K3": ((32, 48), 3), "fused96x32-K8": ((96, 32), 8),
          "48x32-K5": ((48, 32), 5), "K1-is-identity": ((48, 32), 1)}


@pytest.mark.parametrize("shape,k", RANDOM.values(), ids=RANDOM.keys())
def test_weight_matches_the_authors_computation(shape, k):
    ws = _randn(*shape, seed=k, k=k)
    want = _authors(ws)
    assert _close(tsv_merge_weight(ws), want)
    if k == 1:  # rank min(m, n): the task vector itself
        assert torch.allclose(want, ws[0], atol=1e-4)


def test_rank_is_the_authors_int_of_min_over_k():
    for p in range(1, 1025):
        for k in range(1, 21):
            assert tsv_rank(p, p + 16, k) == tsv_rank(p + 16, p, k) == int(p * (1 / k))
    assert tsv_rank(48, 32, 3) == 10 and tsv_rank(96, 32, 8) == 4 and tsv_rank(48, 32, 40) == 0


def test_more_tasks_than_min_dimension_gives_no_update_like_the_authors():
    ws = _randn(48, 32, seed=1, k=40)  # r = int(32 / 40) = 0: all of Σ is zero
    assert torch.equal(_authors(ws), torch.zeros(48, 32))
    assert torch.equal(tsv_merge_weight(ws), torch.zeros(48, 32))
    ws = _randn(48, 32, seed=2, k=20)  # r = 1: one direction per task
    got = tsv_merge_weight(ws)
    assert _close(got, _authors(ws))
    assert torch.linalg.matrix_rank(got) == 20


def _orthogonal_rank_one(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    us = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    vs = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return [(1.0 + i) * us[:, i:i + 1] @ vs[:, i:i + 1].T for i in range(k)]


RANK_ONE = {"k10": ((48, 32), 3), "k6": ((32, 48), 5), "k8": ((96, 32), 4), "k1": ((48, 32), 20),
            "K=min": ((48, 32), 32)}


@pytest.mark.parametrize("shape,k", RANK_ONE.values(), ids=RANK_ONE.keys())
def test_orthogonal_rank_one_task_vectors_merge_to_their_sum(shape, k):
    ws = _orthogonal_rank_one(*shape, k, seed=k)
    pre = {"w": torch.randn(*shape), "ids": torch.arange(3)}
    out = tsv_merge(pre, [{"w": w} for w in ws])  # α = 1
    assert torch.allclose(out["w"], pre["w"] + sum(ws), atol=1e-5)
    assert torch.equal(out["ids"], pre["ids"])
    if tsv_rank(*shape, k) > 1:  # the authors' code orthogonalises the null-space vectors too
        assert (_authors(ws) - sum(ws)).abs().max() > 1e-2


def test_a_zero_task_vector_leaves_the_top_k_of_the_other():
    (w,) = _randn(48, 32, seed=3)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :16] @ torch.diag(s[:16]) @ vh[:16]  # k = 32 // 2
    assert torch.allclose(tsv_merge_weight([w, torch.zeros_like(w)]), best, atol=1e-4)
    assert torch.equal(tsv_merge_weight([torch.zeros_like(w)] * 2), torch.zeros(48, 32))


def _state(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc.weight": (48, 32), "fc.bias": (48,), "positional_embedding": (10, 32), "proj": (32, 16),
              "text_projection": (32, 16), "conv1.weight": (32, 3, 2, 2), "class_embedding": (32,)}
    pre = {key: torch.randn(*s, generator=g) for key, s in shapes.items()} | {"ids": torch.arange(4)}
    taus = [{key: torch.randn(*s, generator=g) for key, s in shapes.items()} for _ in range(k)]
    return pre, taus


def test_2d_keys_are_svd_merged_the_rest_averaged():
    pre, taus = _state()
    out = tsv_merge(pre, taus, lam=0.7)
    for key in ("fc.weight", "positional_embedding", "proj"):
        assert _close(out[key] - pre[key], 0.7 * _authors([t[key] for t in taus])), key
    for key in ("fc.bias", "text_projection", "conv1.weight", "class_embedding"):
        want = pre[key] + 0.7 * sum(t[key] for t in taus) / 3
        assert torch.allclose(out[key], want, atol=1e-6), key
    assert torch.equal(out["ids"], pre["ids"]) and list(out) == list(pre)
    assert not is_tsv_matrix("text_projection", pre["text_projection"]) and is_tsv_matrix("proj", pre["proj"])
    only_fc = tsv_merge(pre, taus, is_svd_merged=lambda key, t: key == "fc.weight")
    assert torch.allclose(only_fc["proj"], pre["proj"] + sum(t["proj"] for t in taus) / 3, atol=1e-6)
    assert torch.allclose(tsv_merge(pre, taus, device="cpu")["fc.weight"], tsv_merge(pre, taus)["fc.weight"])


def _cast(state, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def test_lambda_zero_no_mutation_and_bf16_round_trip():
    pre, taus = _state()
    before = copy.deepcopy((pre, taus))
    out = tsv_merge(pre, taus, lam=0.0)
    assert all(torch.equal(out[k], pre[k]) for k in pre)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before[1], taus) for k in a)
    assert all(torch.equal(before[0][k], pre[k]) for k in pre)
    got = tsv_merge(_cast(pre, torch.bfloat16), [_cast(t, torch.bfloat16) for t in taus])
    want = tsv_merge(_cast(_cast(pre, torch.bfloat16), torch.float32),
                     [_cast(_cast(t, torch.bfloat16), torch.float32) for t in taus])
    assert got["fc.weight"].dtype == torch.bfloat16 and got["ids"].dtype == torch.int64
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in pre)


def test_fused_qkv_is_three_matrices_and_split_qkv_false_is_one():
    g = torch.Generator().manual_seed(4)
    key = "blocks.0.attn.in_proj_weight"
    pre = {key: torch.randn(96, 32, generator=g), "blocks.0.attn.in_proj_bias": torch.randn(96, generator=g)}
    taus = [{k: torch.randn(*v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    out = tsv_merge(pre, taus)
    thirds = [_authors([t[key][i * 32:(i + 1) * 32] for t in taus]) for i in range(3)]  # rank 10 each
    assert _close(out[key] - pre[key], torch.cat(thirds))
    bias = "blocks.0.attn.in_proj_bias"
    assert torch.allclose(out[bias], pre[bias] + sum(t[bias] for t in taus) / 3, atol=1e-6)
    fused = tsv_merge(pre, taus, split_qkv=False)  # the authors' open_clip run: one SVD, rank 10 in all
    assert _close(fused[key] - pre[key], _authors([t[key] for t in taus]))
    assert (fused[key] - out[key]).norm() > 0.1 * (out[key] - pre[key]).norm()
    assert list(out) == list(fused) == list(pre)


def test_same_merge_on_open_clip_and_hf_layouts(layouts):  # noqa: F811
    """open_clip's fused q;k;v split first gives HF CLIP's merge (FusionBench's layout); the authors'
    fused SVD (``split_qkv=False``) moves the attention update by a large fraction of its norm."""
    s = layouts
    fused = tsv_merge(s["pre"], s["taus"])
    assert _max_diff(s, fused, tsv_merge(s["hf_pre"], s["hf_taus"])) < 1e-5
    assert _attn_change(s, fused, tsv_merge(s["pre"], s["taus"], split_qkv=False)) > 0.05


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lam": -1.0}, "lam must be a finite number >= 0"),
        ({"lam": float("inf")}, "lam must be a finite number >= 0"),
        ({"split_qkv": "yes"}, "tsv split_qkv must be True or False, got 'yes'"),
    ],
)
def test_bad_arguments(kwargs, match):
    pre, taus = _state()
    with pytest.raises(MergeError, match=match):
        tsv_merge(pre, taus, **kwargs)


def test_bad_task_vectors():
    pre, taus = _state()
    with pytest.raises(MergeError, match="empty list of task vectors"):
        tsv_merge(pre, [])
    with pytest.raises(MergeError, match="expected a list of task vectors, got a single state dict"):
        tsv_merge(pre, taus[0])
    with pytest.raises(MergeError, match="task vector 1: key 'fc.weight' contains NaN"):
        tsv_merge(pre, [taus[0], dict(taus[1], **{"fc.weight": torch.full((48, 32), float("nan"))})])
    with pytest.raises(MergeError, match=r"task vector 2: shape mismatch at key 'proj'"):
        tsv_merge(pre, [taus[0], taus[1], dict(taus[2], proj=torch.zeros(16, 32))])
    with pytest.raises(MergeError, match=r"shape mismatch at key 'fc.weight': pretrained \(32, 48\)"):
        tsv_merge(dict(pre, **{"fc.weight": torch.zeros(32, 48)}), taus)
    with pytest.raises(MergeError, match="at least one task vector"):
        tsv_rank(4, 4, 0)


def test_merge_pool_by_name_and_presets():
    pool = make_tiny_pool(num_tasks=3)
    pre, taus = pool.pretrained_state(), [tau for _, tau in pool.task_vectors()]
    assert LABELS["tsv_m"] == "TSV-M"
    assert PRESETS["tsv_m"] == {"official": {"lam": 1.0, "split_qkv": False},
                                "fusion_bench": {"lam": 1.0, "split_qkv": True}}
    for kwargs, want in [({}, tsv_merge(pre, taus)), ({"lam": 0.5}, tsv_merge(pre, taus, lam=0.5)),
                         ({"preset": "fusion_bench"}, tsv_merge(pre, taus)),
                         ({"preset": "official"}, tsv_merge(pre, taus, split_qkv=False))]:
        got = merge_pool(pool, "tsv_m", **kwargs)
        assert list(got) == list(want)
        assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-6) for k in want), kwargs
    key = "transformer.resblocks.0.attn.in_proj_weight"
    official, default = merge_pool(pool, "tsv_m", preset="official"), merge_pool(pool, "tsv_m")
    assert not torch.allclose(official[key], default[key])
    enc = pool.build_encoder(default)
    assert torch.isfinite(enc(torch.randn(2, 3, 16, 16))).all()
