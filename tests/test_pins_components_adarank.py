"""Pins for AdaRank's component (adamerge/components/adarank.py): the hard mask at exactly 1/2, an encoder
with one tensor, a bfloat16 encoder, and the chunked low-rank product ``_LowRankDelta``.

The data are chosen so that the near misses disagree: the direction diag(3, 2, 1) has distinct singular
values on the axes, so each kept component shows as its own entry of the merged weight; one mask logit is
exactly 0 (sigmoid = 1/2, pruned: ``>=`` would keep it); the encoder holds a single tensor (an index past
the first layer name fails); the bfloat16 encoder shows a delta left in float32 (bfloat16 + float32 is
float32). ``_LowRankDelta`` runs on three matrices with chunk steps 1, 2, 3 and 5, recording each batched
product's size (a loop that stops early leaves matrices unwritten, one without the step or the chunk end
multiplies more at once than the bound), under a float64 default dtype (its output stays float32), and
with an undefined incoming gradient (it stays undefined: no zeros materialised). ``_svd`` is watched on a tall,
a square and a wide matrix: only the wide one is decomposed transposed (a square one transposed gives other
factors, here even other signs). Directions that are not θ_0-shaped or not finite are refused with their
index: the second of two, so a message without it (or naming the first) differs. With the chunk bound set to 1
number, the tiny pool's groups (two same-shaped matrices each) are multiplied one matrix at a time. A
max_rank_ratio of 0.1 on a rank-3 matrix stores one component (int(0.3) = 0, raised to the floor of 1). Each
option is refused with its whole message at the first value outside its range and accepted at each end of it
(init_lam 0 and 1 under the clamp, initial_rank_ratio 0 and 1, max_rank_ratio 1); the byte count of the
factors is U [1, 4, 3] + Vᵀ [1, 3, 3] + σ [1, 1, 3] in float32 (bfloat16 halves U and Vᵀ only)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_pool
from torch import nn

from adamerge.components import adarank
from adamerge.components.adamerging import _TensorSource
from adamerge.components.adarank import AdaRankModel, _LowRankDelta, _svd
from adamerge.merging.task_vectors import MergeError
from adamerge.models.pool import ModelPool

D = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # σ = 3, 2, 1 on the axes
THETA0 = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.0, 1.0], [0.0, 0.0, -1.0]])


class OneWeight(nn.Module):
    """A single 2-D MLP weight [4, 3], no bias: the only float tensor, and a masked one."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.mlp.weight.copy_(THETA0)

    def forward(self, x):
        return self.mlp(x)


class WeightAndBias(nn.Module):
    """``mlp`` = Linear(3, 4): a masked weight and a dense bias."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(3, 4)

    def forward(self, x):
        return self.mlp(x)


def test_a_bad_direction_is_refused_with_its_index():
    enc = WeightAndBias()
    theta0 = dict(enc.state_dict())
    good = {"mlp.weight": torch.ones(4, 3), "mlp.bias": torch.ones(4)}
    cases = [({"mlp.weight": torch.ones(4, 3)}, r"^direction 1 is missing key 'mlp.bias' \(1 missing in all\)$"),
             ({"mlp.weight": torch.full((4, 3), float("nan")), "mlp.bias": torch.ones(4)},
              r"^direction 1: key 'mlp.weight' contains NaN values$"),
             ({"mlp.weight": torch.ones(4, 3), "mlp.bias": torch.tensor([1.0, float("inf"), 0.0, 0.0])},
              r"^direction 1: key 'mlp.bias' contains Inf values$")]
    for bad, message in cases:
        with pytest.raises(MergeError, match=message):
            AdaRankModel(_TensorSource(enc, theta0, [good, bad], ["a", "b"]))


def _model(dtype=torch.float32) -> AdaRankModel:
    enc = OneWeight().to(dtype)
    pool = ModelPool(enc, {"a": {"mlp.weight": (THETA0 + D).to(dtype)}}, {"a": torch.zeros(2, 4)})
    model = AdaRankModel(pool)
    with torch.no_grad():  # component 0 on, component 1 exactly at 1/2 (off), component 2 off
        model.mask_logits.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        model.lambdas.fill_(0.5)
    return model


def test_a_mask_at_exactly_one_half_is_off_in_the_merge_on_a_one_tensor_encoder():
    model = _model()
    assert model.layer_names == ["mlp.weight"] and model.matrix_names == ["mlp.weight"]
    assert torch.equal(model.soft_masks()[0, 1], torch.tensor(0.5))
    assert torch.equal(model.hard_masks(), torch.tensor([[1.0, 0.0, 0.0]]))
    assert model.ranks().tolist() == [[1]]
    want = THETA0.clone()
    want[0, 0] += 0.5 * 3.0  # λ σ_0 u_0 v_0ᵀ only: σ_1 = 2 and σ_2 = 1 are masked off
    merged = model.merged_parameters()
    assert set(merged) == {"mlp.weight"}
    torch.testing.assert_close(merged["mlp.weight"], want, rtol=0, atol=1e-6)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(model(x), x @ want.t(), rtol=0, atol=1e-5)


def test_a_bfloat16_encoder_gets_bfloat16_merged_weights():
    model = _model(torch.bfloat16)
    merged = model.merged_parameters()["mlp.weight"]
    assert merged.dtype == torch.bfloat16  # the float32 delta is cast to the base's dtype before the sum
    want = THETA0.clone()
    want[0, 0] += 1.5
    torch.testing.assert_close(merged.float(), want, rtol=0, atol=1e-2)
    assert model.merged_state_dict()["mlp.weight"].dtype == torch.bfloat16


def _factors():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 2, generator=g), torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, generator=g)


@pytest.mark.parametrize(("step", "chunks"), [(1, [1, 1, 1]), (2, [2, 1]), (3, [3]), (5, [3])])
def test_low_rank_delta_is_computed_chunk_by_chunk(monkeypatch, step, chunks):
    u, vh, c = _factors()
    want = torch.einsum("gmj,gj,gjn->gmn", u.double(), c.double(), vh.double()).float()
    sizes = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: sizes.append(a.shape[0]) or real(a, b, **kw))
    got = _LowRankDelta.apply(c, u, vh, step)
    assert sizes == chunks  # at most `step` matrices multiplied at once, each once
    torch.testing.assert_close(got, want)


def test_low_rank_delta_is_float32_whatever_the_default_dtype():
    u, vh, c = _factors()
    want = torch.einsum("gmj,gj,gjn->gmn", u, c, vh)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = _LowRankDelta.apply(c, u, vh, 2)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


class _NoGradient(torch.autograd.Function):
    """A scalar from x whose backward sends nothing back (an undefined gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.sum() * 0 + 1.0

    @staticmethod
    def backward(ctx, grad):
        return None


def test_low_rank_delta_passes_an_undefined_gradient_on_as_none():
    u, vh, c = _factors()
    c.requires_grad_(True)
    (got,) = torch.autograd.grad(_NoGradient.apply(_LowRankDelta.apply(c, u, vh, 1)), c, allow_unused=True)
    assert got is None  # not a [G, K·r] tensor of zeros
    out = _LowRankDelta.apply(c, u, vh, 1)
    (grad,) = torch.autograd.grad((out * 2.0).sum(), c)  # a defined one: 2 u_jᵀ 1 v_j
    torch.testing.assert_close(grad, 2.0 * torch.einsum("gmj,gjn->gj", u, vh))


def test_svd_decomposes_the_tall_orientation(monkeypatch):
    g = torch.Generator().manual_seed(0)
    seen = []
    real = adarank.svd
    monkeypatch.setattr(adarank, "svd", lambda t: seen.append((tuple(t.shape), t.is_contiguous())) or real(t))
    for shape in ((5, 3), (4, 4), (3, 5)):
        a = torch.randn(shape, generator=g)
        u, s, vh = _svd(a)
        direct = real(a)
        if shape[0] >= shape[1]:  # tall or square: LAPACK's factors of the matrix itself, bit for bit
            assert torch.equal(u, direct[0]) and torch.equal(s, direct[1]) and torch.equal(vh, direct[2])
        r = min(shape)
        assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
        torch.testing.assert_close(u @ torch.diag(s) @ vh, a)
        torch.testing.assert_close(s, direct[1])
    assert seen == [((5, 3), True), ((4, 4), True), ((5, 3), False)]  # the wide one as its transposed view


def test_a_chunk_bound_below_one_matrix_multiplies_one_matrix_at_a_time(monkeypatch):
    pool = make_tiny_pool(2)
    whole = AdaRankModel(pool, split_qkv=False).merged_parameters()
    monkeypatch.setattr(adarank, "_CHUNK", 1)
    model = AdaRankModel(pool, split_qkv=False)
    assert [grp["count"] for grp in model._groups] == [2, 2, 2, 2]  # in_proj, out_proj, c_fc, c_proj of 2 blocks
    sizes = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: sizes.append(a.shape[0]) or real(a, b, **kw))
    merged = model.merged_parameters()
    assert sizes == [1] * 8
    for key, value in whole.items():
        torch.testing.assert_close(merged[key], value)


def test_a_tiny_max_rank_ratio_keeps_one_component():
    enc = OneWeight()
    pool = ModelPool(enc, {"a": {"mlp.weight": THETA0 + D}}, {"a": torch.zeros(2, 4)})
    model = AdaRankModel(pool, max_rank_ratio=0.1)  # int(0.1 · 3) = 0 components: at least one is kept
    assert model.stored_ranks() == [1] and model.full_ranks() == [3] and model.mask_logits.shape == (1, 1)
    want = THETA0.clone()
    want[0, 0] += 0.3 * 3.0  # λ = 0.3 on the top component only
    torch.testing.assert_close(model.merged_parameters()["mlp.weight"], want, rtol=0, atol=1e-6)


def _pool():
    return ModelPool(OneWeight(), {"a": {"mlp.weight": THETA0 + D}}, {"a": torch.zeros(2, 4)})


def test_every_option_is_refused_by_name_and_accepted_at_the_ends_of_its_range():
    pool = _pool()
    cases = [
        ({"granularity": "block"}, ValueError, r"^granularity must be 'task' or 'layer', got 'block'$"),
        ({"svd_dtype": "float16"}, ValueError, r"^svd_dtype must be one of float32, bfloat16, got 'float16'$"),
        ({"init_lam": "0.3"}, ValueError, r"^init_lam must be a finite number, got '0.3'$"),
        ({"init_lam": float("inf")}, ValueError, r"^init_lam must be a finite number, got inf$"),
        ({"init_lam": 1.5, "clamp": True}, ValueError,
         (r"^init_lam 1.5 is outside the clamp range \[0, 1\]: λ would never move; use an init_lam in \[0, 1\] "
          r"or clamp: false$")),
        ({"init_lam": -0.5, "clamp": True}, ValueError, r"^init_lam -0.5 is outside the clamp range"),
        ({"mask_temp": "10"}, ValueError, r"^mask_temp must be a finite number > 0, got '10'$"),
        ({"mask_temp": float("inf")}, ValueError, r"^mask_temp must be a finite number > 0, got inf$"),
        ({"mask_temp": -1.0}, ValueError, r"^mask_temp must be a finite number > 0, got -1.0$"),
        ({"initial_rank_ratio": "1"}, ValueError, r"^initial_rank_ratio must lie in \[0, 1\], got '1'$"),
        ({"initial_rank_ratio": -0.1}, ValueError, r"^initial_rank_ratio must lie in \[0, 1\], got -0.1$"),
        ({"initial_rank_ratio": 1.5}, ValueError, r"^initial_rank_ratio must lie in \[0, 1\], got 1.5$"),
        ({"max_rank_ratio": "1"}, ValueError, r"^max_rank_ratio must lie in \(0, 1\], got '1'$"),
        ({"max_rank_ratio": 0.0}, ValueError, r"^max_rank_ratio must lie in \(0, 1\], got 0.0$"),
        ({"max_rank_ratio": 1.5}, ValueError, r"^max_rank_ratio must lie in \(0, 1\], got 1.5$"),
        ({"split_qkv": 1}, TypeError, r"^split_qkv must be True or False, got 1$"),
        ({"init_lam": float("nan"), "mask_temp": 0.0}, ValueError, r"^init_lam must be a finite number, got nan$"),
    ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            AdaRankModel(pool, **kwargs)
    for kwargs in ({"init_lam": 0.0, "clamp": True}, {"init_lam": 1, "clamp": True}, {"initial_rank_ratio": 0.0},
                   {"initial_rank_ratio": 1}, {"max_rank_ratio": 1}, {"mask_temp": 1e-3}, {"init_lam": 2.3}):
        model = AdaRankModel(pool, **kwargs)
        assert model.lambdas.shape == (1, 1)
    lin = ModelPool(nn.Linear(3, 4), {"a": nn.Linear(3, 4).state_dict()}, {"a": torch.zeros(2, 4)})
    with pytest.raises(MergeError, match=(r"^AdaRank found no 2-D attention / MLP weights to decompose \(keys with "
                                          r"'attn' or 'mlp' and neither 'ln' nor 'bias'\)$")):
        AdaRankModel(lin)


def test_identity_label_and_factor_bytes():
    pool = _pool()
    model = AdaRankModel(pool, granularity="task", clamp=True, mask_temp=5, split_qkv=False, max_rank_ratio=1)
    assert model.identity() == {"granularity": "task", "clamp": True, "directions": {"method": "task_arithmetic"},
                                "mask_temp": 5.0, "split_qkv": False, "max_rank_ratio": 1.0}
    assert type(model.identity()["mask_temp"]) is float and type(model.identity()["max_rank_ratio"]) is float
    default = AdaRankModel(pool)
    assert model.label == "AdaRank (task-wise λ)" and default.label == "AdaRank"
    assert torch.equal(default.lambdas, torch.full((1, 1), 0.3)) and default.mask_temp == 10.0  # the authors' prior
    assert default.identity() == {"granularity": "layer", "clamp": False, "directions": {"method": "task_arithmetic"},
                                  "mask_temp": 10.0, "split_qkv": True, "max_rank_ratio": 1.0}
    assert torch.equal(default.mask_logits, torch.full((1, 3), 0.1))  # every component kept at the start
    assert AdaRankModel(pool, directions="ties").label == "AdaRank+TIES"
    assert model.svd_bytes() == (4 * 3 + 3 * 3 + 3) * 4
    assert AdaRankModel(pool, svd_dtype="bfloat16").svd_bytes() == (4 * 3 + 3 * 3) * 2 + 3 * 4
