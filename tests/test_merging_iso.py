"""Iso-C / Iso-CTS against independent computations: Iso-C as σ̄ · polar(Σ τ_t) written with eigh, Iso-CTS
as a float64 transcription of the authors' loop (danielm1405/iso-merging ``src/utils/iso.py``); the flat
spectrum, Iso-CTS = Iso-C when the common space takes everything, the authors' rank allocation, q/k/v as
three matrices, dtypes, errors and merge_pool."""

import copy
import math

import pytest
import torch
from conftest import make_tiny_pool
from test_models_checkpoints import to_hf

from adamerge.merging import MergeError, merge_pool
from adamerge.merging.iso import iso_c, iso_c_weight, iso_cts, iso_cts_sizes, iso_cts_weight
from adamerge.merging.registry import LABELS, PRESETS
from adamerge.models.hf_clip import convert_hf_vision_state

QKV = "blk.attn.in_proj_weight"
SHAPES = {
    QKV: (96, 32),  # fused q;k;v, d = 32
    "blk.attn.in_proj_bias": (96,),
    "blk.mlp.c_fc.weight": (48, 32),
    "blk.mlp.c_proj.weight": (32, 48),
    "blk.ln.weight": (32,),
    "conv1.weight": (8, 3, 2, 2),
    "positional_embedding": (5, 32),  # r = 5 < K = 8 tasks
    "text_projection": (32, 16),  # 2-D, but averaged by the authors
}


def _setup(n=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    pre["ids"] = torch.arange(3)
    taus = [{k: (0.1 * torch.randn(s, generator=g)).to(dtype) for k, s in SHAPES.items()} for _ in range(n)]
    return pre, taus


def _polar_eigh(a):
    """Polar factor of a full-rank a without an SVD: a (aᵀa)^(-1/2) (tall) or (a aᵀ)^(-1/2) a (wide)."""
    tall = a.shape[0] >= a.shape[1]
    gram = a.T @ a if tall else a @ a.T
    w, q = torch.linalg.eigh(gram)
    inv_sqrt = q @ torch.diag(w.rsqrt()) @ q.T
    return a @ inv_sqrt if tall else inv_sqrt @ a


def _iso_c_ref(ws):
    """σ̄ · polar(Δ), σ̄ = ‖Δ‖_* / r with the nuclear norm from the eigenvalues of the Gram matrix."""
    delta = sum(w.double() for w in ws)
    tall = delta.shape[0] >= delta.shape[1]
    eig = torch.linalg.eigvalsh(delta.T @ delta if tall else delta @ delta.T).clamp(min=0)
    return eig.sqrt().mean() * _polar_eigh(delta)


def _official_iso_cts(ws, common_space_fraction):
    """The authors' per-key loop (src/utils/iso.py::iso_cts), transcribed in float64: task blocks first,
    the common block last, orthogonalised by U Vh of their SVDs."""
    ws = [w.double() for w in ws]
    shape_ = ws[0].shape
    num_tasks = len(ws)
    combined_w = sum(ws)
    common_space_index_s = int(min(shape_) * common_space_fraction)
    _task_specific_total_space_index_s = round((min(shape_) - common_space_index_s) / num_tasks) * num_tasks
    common_space_index_s = min(shape_) - _task_specific_total_space_index_s
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    common_space_u = u[:, :common_space_index_s]
    common_space_s = s[:common_space_index_s]
    common_space_v = v[:common_space_index_s, :]
    n_dims_per_task = int((min(shape_) - common_space_index_s) / num_tasks)
    for i, w in enumerate(ws):
        w_ts = w - common_space_u @ common_space_u.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            combined_space_u = torch.zeros_like(u_ts)
            combined_space_s = torch.zeros_like(s_ts)
            combined_space_v = torch.zeros_like(v_ts)
        combined_space_u[:, i * n_dims_per_task : (i + 1) * n_dims_per_task] = u_ts[:, :n_dims_per_task]
        combined_space_s[i * n_dims_per_task : (i + 1) * n_dims_per_task] = s_ts[:n_dims_per_task]
        combined_space_v[i * n_dims_per_task : (i + 1) * n_dims_per_task, :] = v_ts[:n_dims_per_task, :]
    start = num_tasks * n_dims_per_task
    combined_space_u[:, start : start + common_space_index_s] = common_space_u
    combined_space_s[start : start + common_space_index_s] = common_space_s
    combined_space_v[start : start + common_space_index_s, :] = common_space_v
    uu, _, vu = torch.linalg.svd(combined_space_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(combined_space_v, full_matrices=False)
    combined_space_s = torch.ones_like(combined_space_s) * combined_space_s.mean()
    return torch.linalg.multi_dot((uu @ vu, torch.diag(combined_space_s), uv @ vv))


def _close(a, b, rtol=1e-4):
    scale = float(b.abs().max())
    assert float((a.double() - b.double()).abs().max()) <= rtol * scale + 1e-7


def _chunks(taus, key=QKV):
    return [[t[key].chunk(3)[i] for t in taus] for i in range(3)]


def test_iso_c_is_the_mean_singular_value_times_the_polar_factor_on_every_matrix():
    pre, taus = _setup(n=8)
    out = iso_c(pre, taus, lam=0.7)
    for key in ("blk.mlp.c_fc.weight", "blk.mlp.c_proj.weight", "positional_embedding"):
        _close(out[key] - pre[key], 0.7 * _iso_c_ref([t[key] for t in taus]))
    for got, ws in zip((out[QKV] - pre[QKV]).chunk(3), _chunks(taus)):  # q, k, v: three [32, 32]
        _close(got, 0.7 * _iso_c_ref(ws))
    for key in ("blk.attn.in_proj_bias", "blk.ln.weight", "conv1.weight", "text_projection"):
        mean = sum(t[key] for t in taus) / len(taus)
        assert torch.allclose(out[key], pre[key] + 0.7 * mean, atol=1e-6), key
    assert torch.equal(out["ids"], pre["ids"]) and list(out) == list(pre)


@pytest.mark.parametrize("shape,n", [((48, 32), 3), ((32, 48), 8), ((5, 32), 8)])
def test_iso_c_spectrum_is_flat_at_the_mean_singular_value_of_the_sum(shape, n):
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(*shape, generator=g) for _ in range(n)]
    sv = torch.linalg.svdvals(iso_c_weight(ws))
    want = torch.linalg.svdvals(sum(ws)).mean()
    assert sv.numel() == min(shape) and torch.allclose(sv, want.expand_as(sv), rtol=1e-5)


def test_iso_c_of_a_rank_deficient_sum_keeps_every_direction():
    """As the authors' code: all r singular values, zeros included, are replaced by their mean."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 2, generator=g) @ torch.randn(2, 32, generator=g)
    sv = torch.linalg.svdvals(iso_c_weight([w]))
    want = torch.linalg.svdvals(w)[:2].sum() / 32
    assert torch.allclose(sv, want.expand(32), rtol=1e-4)


@pytest.mark.parametrize(
    "shape,n,fraction,sizes",
    [((48, 32), 3, 0.8, (26, 2)), ((32, 48), 8, 0.5, (16, 2)), ((32, 32), 4, 0.8, (24, 2)),
     ((5, 32), 8, 0.8, (5, 0)), ((48, 32), 4, 0.0, (0, 8)), ((64, 32), 2, 0.3, (8, 12))],
)
def test_iso_cts_matches_the_authors_loop(shape, n, fraction, sizes):
    assert iso_cts_sizes(min(shape), n, fraction) == sizes
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(*shape, generator=g) for _ in range(n)]
    _close(iso_cts_weight(ws, fraction), _official_iso_cts(ws, fraction))


def test_iso_cts_state_dict_matches_the_authors_loop_per_key():
    pre, taus = _setup(n=3)
    out = iso_cts(pre, taus, lam=1.3)
    for key in ("blk.mlp.c_fc.weight", "blk.mlp.c_proj.weight", "positional_embedding"):
        _close(out[key] - pre[key], 1.3 * _official_iso_cts([t[key] for t in taus], 0.8))
    for g, ws in zip((out[QKV] - pre[QKV]).chunk(3), _chunks(taus)):
        _close(g, 1.3 * _official_iso_cts(ws, 0.8))
    for key in ("blk.attn.in_proj_bias", "conv1.weight", "text_projection"):
        assert torch.allclose(out[key], pre[key] + 1.3 * sum(t[key] for t in taus) / 3, atol=1e-6), key


def test_iso_cts_spectrum_is_flat_too_and_differs_from_iso_c():
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(48, 32, generator=g) for _ in range(3)]
    k, s = iso_cts_sizes(32, 3, 0.8)
    delta_sv = torch.linalg.svdvals(sum(ws))
    u_k = torch.linalg.svd(sum(ws))[0][:, :k]
    task_sv = [torch.linalg.svdvals(w - u_k @ u_k.T @ w)[:s] for w in ws]
    want = torch.cat([delta_sv[:k], *task_sv]).mean()
    sv = torch.linalg.svdvals(iso_cts_weight(ws))
    assert torch.allclose(sv, want.expand(32), rtol=1e-4)
    assert (iso_cts_weight(ws) - iso_c_weight(ws)).norm() > 0.1 * iso_c_weight(ws).norm()


@pytest.mark.parametrize("fraction,n", [(1.0, 3), (1.0, 8), (0.9, 8)])
def test_iso_cts_is_iso_c_when_the_common_space_takes_every_direction(fraction, n):
    """f = 1 leaves no task-specific space; so does f = 0.9 with r = 32, T = 8: (32 − 28)/8 = 0.5 rounds
    (half to even, Python's round as the authors') to 0."""
    assert iso_cts_sizes(32, n, fraction) == (32, 0)
    pre, taus = _setup(n=n)
    a, b = iso_cts(pre, taus, common_space_fraction=fraction), iso_c(pre, taus)
    for key in pre:
        assert torch.allclose(a[key], b[key], atol=2e-5), key


def test_rank_allocation_as_the_authors_with_a_cap_where_theirs_fails():
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)  # ViT-B: int(614.4) = 614, 154/8 = 19.25 → 19
    assert iso_cts_sizes(768, 14, 0.8) == (614, 11)
    assert iso_cts_sizes(768, 20, 0.8) == (608, 8)  # 7.7 → 8
    assert iso_cts_sizes(3072 // 4, 8, 0.0) == (0, 96)
    # theirs: round(32/3) = 11 tasks' worth exceeds r = 32 (k = −1, their code fails); capped at ⌊32/3⌋
    assert iso_cts_sizes(32, 3, 0.0) == (2, 10)
    assert iso_cts_sizes(5, 8, 0.0) == (5, 0)  # more tasks than directions: all common
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(48, 32, generator=g) for _ in range(3)]
    sv = torch.linalg.svdvals(iso_cts_weight(ws, 0.0))
    assert torch.isfinite(sv).all() and torch.allclose(sv, sv.mean().expand(32), rtol=1e-4)


# --- open_clip's fused q;k;v ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    pool = make_tiny_pool(num_tasks=3)
    return pool, pool.pretrained_state(), [tau for _, tau in pool.task_vectors()]


@pytest.mark.parametrize("method,weight", [(iso_c, iso_c_weight), (iso_cts, iso_cts_weight)])
def test_fused_qkv_are_merged_as_three_matrices(tiny, method, weight):
    _, pre, taus = tiny
    key = "transformer.resblocks.0.attn.in_proj_weight"
    out = method(pre, taus)
    for got, ws in zip((out[key] - pre[key]).chunk(3), _chunks(taus, key)):
        assert torch.allclose(got, weight(ws), atol=1e-6)
    fused = method.__wrapped__(pre, taus)  # one SVD of the [96, 32] matrix, as the authors' own code
    assert (fused[key] - out[key]).norm() > 0.05 * (out[key] - pre[key]).norm()


@pytest.mark.parametrize("method", [iso_c, iso_cts])
def test_open_clip_and_hf_layouts_give_the_same_merge(tiny, method):
    _, pre, taus = tiny
    taus = [dict(t, proj=torch.zeros_like(t["proj"])) for t in taus]  # HF CLIPVisionModel has no proj
    hf_pre = to_hf(pre, projection=False)
    hf_taus = [to_hf({k: t.get(k, pre[k]) for k in pre}, projection=False) for t in taus]
    hf_taus = [{k: v for k, v in t.items() if v.is_floating_point()} for t in hf_taus]
    back = convert_hf_vision_state(method(hf_pre, hf_taus), projection=pre["proj"])
    out = method(pre, taus)
    assert set(back) == set(out)
    assert max(float((out[k] - back[k]).abs().max()) for k in out) < 1e-5


# --- dtypes, inputs, errors, merge_pool -------------------------------------------------------------


@pytest.mark.parametrize("method", [iso_c, iso_cts])
def test_bf16_round_trip_lam_zero_and_inputs_untouched(method):
    pre, taus = _setup(n=3)
    before_pre, before_taus = copy.deepcopy(pre), copy.deepcopy(taus)
    ref = method(pre, taus)
    low = method({k: v.bfloat16() if v.is_floating_point() else v for k, v in pre.items()},
                 [{k: v.bfloat16() for k, v in t.items()} for t in taus])
    for k, v in low.items():
        assert v.dtype == (torch.bfloat16 if pre[k].is_floating_point() else pre[k].dtype), k
        assert torch.allclose(v.to(ref[k].dtype), ref[k], atol=0.05), k
    zero = method(pre, taus, lam=0.0)
    assert all(torch.equal(zero[k], pre[k]) for k in pre)
    assert all(torch.equal(pre[k], before_pre[k]) for k in pre)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(taus, before_taus) for k in a)


@pytest.mark.parametrize("method", [iso_c, iso_cts])
def test_zero_task_vectors_give_theta0(method):
    pre, taus = _setup(n=2)
    zeros = [{k: torch.zeros_like(v) for k, v in t.items()} for t in taus]
    out = method(pre, zeros)
    assert all(torch.equal(out[k], pre[k]) for k in pre)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"common_space_fraction": 1.5}, r"iso_cts common_space_fraction must lie in \[0, 1\], got 1.5"),
     ({"common_space_fraction": -0.1}, r"common_space_fraction must lie in \[0, 1\]"),
     ({"common_space_fraction": float("nan")}, r"common_space_fraction must lie in \[0, 1\]"),
     ({"common_space_fraction": "most"}, "common_space_fraction must be a number, got 'most'"),
     ({"lam": -1.0}, "lam must be a finite number >= 0, got -1.0")],
)
def test_bad_arguments(kwargs, match):
    pre, taus = _setup(n=2)
    with pytest.raises(MergeError, match=match):
        iso_cts(pre, taus, **kwargs)
    if "lam" in kwargs:
        with pytest.raises(MergeError, match=match):
            iso_c(pre, taus, **kwargs)


@pytest.mark.parametrize("method", [iso_c, iso_cts])
def test_bad_task_vectors(method):
    pre, taus = _setup(n=2)
    with pytest.raises(MergeError, match="empty list of task vectors"):
        method(pre, [])
    with pytest.raises(MergeError, match="expected a list of task vectors, got a single state dict"):
        method(pre, taus[0])
    nan = dict(taus[1], **{"blk.mlp.c_fc.weight": torch.full((48, 32), math.nan)})
    with pytest.raises(MergeError, match="task vector 1: key 'blk.mlp.c_fc.weight' contains NaN"):
        method(pre, [taus[0], nan])
    bad = dict(taus[1], **{"blk.mlp.c_proj.weight": torch.zeros(32, 47)})
    with pytest.raises(MergeError, match=r"task vector 1: shape mismatch at key 'blk.mlp.c_proj.weight'"):
        method(pre, [taus[0], bad])
    small = {k: v for k, v in pre.items() if k != "blk.ln.weight"}
    with pytest.raises(MergeError, match="task vector key 'blk.ln.weight' is missing from the pretrained"):
        method(small, taus)


def test_merge_pool_by_name_presets_and_labels(tiny):
    pool, pre, taus = tiny
    assert LABELS["iso_c"] == "Iso-C" and LABELS["iso_cts"] == "Iso-CTS"
    assert PRESETS["iso_c"]["official"] == {"lam": 1.0, "split_qkv": False}  # the authors' fused SVD
    assert PRESETS["iso_cts"]["official"] == {"common_space_fraction": 0.8, "lam": 1.0, "split_qkv": False}
    runs = [("iso_c", {}, iso_c(pre, taus)),
            ("iso_c", {"preset": "vit_l14"}, iso_c(pre, taus, lam=1.5, split_qkv=False)),
            ("iso_c", {"preset": "vit_l14"}, iso_c.__wrapped__(pre, taus, lam=1.5)),  # = fused
            ("iso_cts", {"preset": "official"}, iso_cts(pre, taus, split_qkv=False)),
            ("iso_cts", {"common_space_fraction": 0.5, "lam": 0.4}, iso_cts(pre, taus, 0.5, lam=0.4))]
    for name, kwargs, want in runs:
        got = merge_pool(pool, name, **kwargs)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.allclose(got[k], want[k], atol=1e-6), (name, k)
    enc = pool.build_encoder(merge_pool(pool, "iso_cts"))
    assert torch.isfinite(enc(torch.randn(2, 3, 16, 16))).all()
