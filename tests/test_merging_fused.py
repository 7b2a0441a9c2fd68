"""Fused attention q;k;v: split / fuse round trips, and every per-matrix method giving the same merge on
open_clip's fused layout as on HF CLIP's split q, k, v (the layout of the authors' code)."""

import importlib
import inspect
import pkgutil
import re

import pytest
import torch
from conftest import make_tiny_clip, make_tiny_pool
from test_models_checkpoints import to_hf

from adamerge import merging
from adamerge.merging import MergeError, OPCMerger, optmerge
from adamerge.merging.fused import QKVLayout, split_qkv, splits_fused_qkv
from adamerge.models.hf_clip import convert_hf_vision_state

ATTN = "transformer.resblocks.0.attn."


def test_split_and_fuse_round_trip_on_both_towers():
    state = make_tiny_clip().state_dict()
    layout = QKVLayout.of(state)
    fused = [k for k, _, _ in layout.fused]
    assert len(fused) == 2 * (2 + 1)  # weight + bias per block: 2 visual blocks, 1 text block
    assert "visual.transformer.resblocks.1.attn.in_proj_bias" in fused
    assert "transformer.resblocks.0.attn.in_proj_weight" in fused  # the text tower too
    split = layout.split(state)
    d = state[f"visual.{ATTN}in_proj_weight"].shape[1]
    q, k, v = (split[f"visual.{ATTN}{p}_proj.weight"] for p in "qkv")
    assert q.shape == k.shape == v.shape == (d, d)
    assert torch.equal(torch.cat([q, k, v]), state[f"visual.{ATTN}in_proj_weight"])
    storage = state[f"visual.{ATTN}in_proj_weight"].untyped_storage().data_ptr()
    assert v.untyped_storage().data_ptr() == storage  # a view, not a copy
    assert split[f"visual.{ATTN}k_proj.bias"].shape == (d,)
    assert not any("in_proj" in key for key in split)
    back = layout.fuse(split)
    assert list(back) == list(state)  # same keys, same order
    assert all(torch.equal(back[key], state[key]) for key in state)
    assert split_qkv(state).keys() == split.keys()


def test_hf_layout_and_non_square_projections_are_left_alone():
    hf = to_hf(make_tiny_clip().visual.state_dict())
    assert not QKVLayout.of(hf) and split_qkv(hf).keys() == hf.keys()
    odd = {"a.in_proj_weight": torch.randn(9, 4), "a.in_proj_bias": torch.randn(9),
           "b.in_proj_weight": torch.randn(6, 2)}
    layout = QKVLayout.of(odd)
    assert [k for k, _, _ in layout.fused] == ["b.in_proj_weight"]  # [9, 4] is not [3d, d]
    assert set(layout.split(odd)) == {"a.in_proj_weight", "a.in_proj_bias",
                                      "b.q_proj.weight", "b.k_proj.weight", "b.v_proj.weight"}


def test_split_and_fuse_errors():
    state = {f"{ATTN}in_proj_weight": torch.randn(6, 2), f"{ATTN}in_proj_bias": torch.randn(6)}
    layout = QKVLayout.of(state)
    with pytest.raises(MergeError, match=r"expert 'x': shape mismatch at key '.*in_proj_weight': "
                                         r"expected \(6, 2\), got \(3, 2\)"):
        layout.split({f"{ATTN}in_proj_weight": torch.randn(3, 2)}, name="expert 'x'")
    with pytest.raises(MergeError, match="has both .*in_proj_weight' and .*q_proj.weight'"):
        layout.split(dict(state, **{f"{ATTN}q_proj.weight": torch.randn(2, 2)}))
    split = layout.split(state)
    del split[f"{ATTN}v_proj.bias"]
    with pytest.raises(MergeError, match=r"has '.*q_proj.bias' but not '.*v_proj.bias': cannot fuse"):
        layout.fuse(split)


def test_decorator_hands_split_states_to_the_method_and_fuses_its_result():
    seen = {}

    @splits_fused_qkv
    def method(pretrained, task_vectors, scale=1.0):
        """Doc."""
        seen["keys"] = list(pretrained)
        return {k: v + scale * sum(t[k] for t in task_vectors) if k in task_vectors[0] else v
                for k, v in pretrained.items()}

    pre = {f"{ATTN}in_proj_weight": torch.randn(6, 2), "ids": torch.arange(2)}
    taus = [{f"{ATTN}in_proj_weight": torch.randn(6, 2)} for _ in range(2)]
    out = method(pre, taus, scale=0.5)
    assert seen["keys"] == [f"{ATTN}q_proj.weight", f"{ATTN}k_proj.weight", f"{ATTN}v_proj.weight", "ids"]
    assert list(out) == [f"{ATTN}in_proj_weight", "ids"]
    key = f"{ATTN}in_proj_weight"
    assert torch.allclose(out[key], pre[key] + 0.5 * (taus[0][key] + taus[1][key]))
    assert method.__doc__ == "Doc." and method.splits_fused_qkv
    method.__wrapped__(pre, taus)  # the plain function: the fused layout
    assert seen["keys"] == [f"{ATTN}in_proj_weight", "ids"]


_SVD = re.compile(r"linalg\.(svd|svdvals|eigh|eig|qr)\b|svd_lowrank|pca_lowrank|torch\.svd\b|\.svd\(")


def test_every_merging_module_that_takes_an_svd_splits_qkv():
    """An SVD / eigen / low-rank method in adamerge.merging must run on split q, k, v (fused.py)."""
    offenders = []
    for info in pkgutil.iter_modules(merging.__path__):
        if info.name == "fused":
            continue
        source = inspect.getsource(importlib.import_module(f"adamerge.merging.{info.name}"))
        if _SVD.search(source) and not re.search(r"\b(splits_fused_qkv|QKVLayout)\b", source):
            offenders.append(info.name)
    assert not offenders, f"per-matrix methods that do not split open_clip's fused q;k;v: {offenders}"


# --- the same merge in open_clip's layout and in HF's ----------------------------------------------


@pytest.fixture(scope="module")
def layouts():
    """A tiny pool's θ0, experts and task vectors in open_clip keys, and the same in HF CLIPVisionModel
    keys (q, k, v apart). Experts share θ0's ``proj`` as FusionBench's do (HF CLIPVisionModel has none)."""
    pool = make_tiny_pool(num_tasks=3)
    pre = pool.pretrained_state()
    taus = [dict(tau, proj=torch.zeros_like(tau["proj"])) for _, tau in pool.task_vectors()]
    experts = [{k: pre[k] + t[k] if k in t else pre[k] for k in pre} for t in taus]
    hf_pre = to_hf(pre, projection=False)
    hf_experts = [to_hf(e, projection=False) for e in experts]
    hf_taus = [{k: e[k] - hf_pre[k] for k in hf_pre if hf_pre[k].is_floating_point()} for e in hf_experts]
    return {"pre": pre, "experts": experts, "taus": taus, "hf_pre": hf_pre, "hf_experts": hf_experts,
            "hf_taus": hf_taus}


def _max_diff(s, fused, from_hf):
    """max |merged on open_clip keys − merged on HF keys converted back| over every key."""
    back = convert_hf_vision_state(from_hf, projection=s["pre"]["proj"])
    assert set(back) == set(fused)
    return max(float((fused[k].float() - back[k].float()).abs().max()) for k in fused)


def _attn_change(s, new, old):
    """‖τ_new − τ_old‖ / ‖τ_new‖ over the attention in_proj weights (τ = merged − θ0)."""
    attn = [k for k in new if k.endswith("in_proj_weight")]
    num = sum(float((new[k] - old[k]).square().sum()) for k in attn)
    den = sum(float((new[k] - s["pre"][k]).square().sum()) for k in attn)
    return (num / den) ** 0.5


def _opcm(pre, experts):
    merger = OPCMerger(pre)
    for e in experts:
        merger.add(e)
    return merger.merged_state()


def test_opcm_is_the_same_on_open_clip_and_hf_layouts(layouts, monkeypatch):
    s = layouts
    fused = _opcm(s["pre"], s["experts"])
    assert _max_diff(s, fused, _opcm(s["hf_pre"], s["hf_experts"])) < 1e-6
    monkeypatch.setattr(QKVLayout, "of", classmethod(lambda cls, state: cls()))  # the old, fused behaviour
    assert _attn_change(s, fused, _opcm(s["pre"], s["experts"])) > 0.05  # one SVD of [3d, d], not three


@pytest.mark.parametrize("variant", ["clip", "llamafactory"])
def test_optmerge_is_the_same_on_open_clip_and_hf_layouts(layouts, variant):
    s = layouts
    kwargs = {"variant": variant, "iters": 20, "lr": 1e-3 if variant == "clip" else 0.05}
    fused = optmerge(s["pre"], s["taus"], **kwargs)
    assert _max_diff(s, fused, optmerge(s["hf_pre"], s["hf_taus"], **kwargs)) < 1e-6
    old = optmerge.__wrapped__(s["pre"], s["taus"], **kwargs)  # the old, fused behaviour
    assert _attn_change(s, fused, old) > 0.02


def test_svd_retries_in_float64_when_lapack_does_not_converge(monkeypatch):
    """LAPACK's float32 divide-and-conquer can fail on matrices with many repeated singular values (Iso-CTS's
    projected task vectors on ViT-B/32-sized weights did); the shared svd then retries in float64."""
    from adamerge.merging.fused import svd

    a = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    real, calls = torch.linalg.svd, []

    def flaky(x, full_matrices=True):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = svd(a)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (12, 7) and vh.shape == (7, 7)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, real(a.double(), full_matrices=False)[1].float())
