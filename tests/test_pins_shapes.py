"""Rank and budget formulas pinned on shapes where the plausible wrong formulas disagree.

A 5x4 matrix with 3 tasks cannot tell min(m, n) from m, floor from round, or a per-task rank from the
whole one: every formula gives the same small number. Here each expected integer is written out from the
official formula (source named beside it) on ViT-B/32's own matrix shapes (768x3072 c_fc^T, 3072x768 c_fc,
768x2304 fused q;k;v^T, 2304x768 in_proj), on K > min(m, n) (20 tasks on a 12x40 matrix) and on task
counts that do not divide the rank; the comment on each case says which wrong version it separates.
"""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.components.adarank import AdaRankModel, _plan_matrices
from adamerge.merging.cart import cart_directions, cart_rank
from adamerge.merging.iso import iso_cts_sizes
from adamerge.merging.opcm import opcm_project, split_rank
from adamerge.merging.optmerge import optmerge_rank
from adamerge.merging.tsv import tsv_rank, tsv_weight_parts

VIT_B32 = [(768, 3072), (3072, 768), (768, 2304), (2304, 768)]


def _rank(t: torch.Tensor) -> int:
    """Numerical rank of a float32 result: singular values above 1e-4 of the largest (float32 round-off
    of a low-rank reconstruction sits near 1e-7 of it; the kept components near 1e-1)."""
    return int(torch.linalg.matrix_rank(t.double(), rtol=1e-4))


# ---- TSV-M: k = int(min(m, n) * (1 / K)) per task (AntoAndGar/task_singular_vectors TSVM_utils.py,
# FusionBench TSVM_utils.py: sv_reduction = 1 / len(task_vectors); reduced_index_s = int(s.shape[0] * sv_reduction))
def _tsv_official(m: int, n: int, k: int) -> int:
    return int(min(m, n) * (1 / k))


@pytest.mark.parametrize("shape", VIT_B32)
@pytest.mark.parametrize("num_tasks", [8, 14, 20, 3])
def test_tsv_rank_on_vit_b32_shapes(shape, num_tasks):
    # 768/14 = 54.9: round() gives 55 where the floor gives 54; max(m, n) gives 219 or 164 (3072/14,
    # 2304/14) and 153 / 115 for K = 20; the whole rank (768) instead of the per-task one is K times it.
    want = _tsv_official(*shape, num_tasks)
    assert want == {8: 96, 14: 54, 20: 38, 3: 256}[num_tasks]  # the official formula, evaluated by hand
    assert tsv_rank(*shape, num_tasks) == want


def test_tsv_rank_is_zero_when_tasks_outnumber_the_rank():
    # K = 20 > min(12, 40): int(12 / 20) = 0 (the authors' code returns a zero update); max(1, ·) or
    # max(m, n) = 40 (-> 2) would keep components.
    assert tsv_rank(12, 40, 20) == 0 and tsv_rank(40, 12, 20) == 0
    parts = tsv_weight_parts([torch.randn(12, 40, generator=torch.Generator().manual_seed(i)) for i in range(20)])
    assert len(parts) == 20 and all(not p.any() for p in parts)


@pytest.mark.parametrize("shape", [(24, 60), (60, 24)])
def test_tsv_merge_keeps_floor_min_over_k_components_per_task(shape):
    # 5 full-rank tasks on a 24x60 weight: k = int(24 / 5) = 4 per task, 20 in all (< 24, so the merge is
    # not full rank). round(4.8) = 5 gives 25 -> 24 (full), max(m, n) gives 12 per task -> 24.
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(*shape, generator=g) for _ in range(5)]
    parts = tsv_weight_parts(taus)
    assert [_rank(p) for p in parts] == [4] * 5
    assert _rank(sum(parts)) == 20


# ---- CART: r = max(1, int(ρ · min(m, n))) (JH-GEECS/CART merging.py, rank = int(initial_rank_ratio * min(shape)))
@pytest.mark.parametrize("shape", VIT_B32)
@pytest.mark.parametrize("rho, want", [(0.12, 92), (0.16, 122), (0.32, 245)])
def test_cart_rank_on_vit_b32_shapes(shape, rho, want):
    # 0.16·768 = 122.88 and 0.32·768 = 245.76: round() gives 123 / 246; ρ·max(m, n) gives 491 / 983 /
    # 368 / 737; ρ·m or ρ·n is wrong on one of the two orientations of each shape.
    assert max(1, int(rho * min(shape))) == want
    assert cart_rank(*shape, rho) == want


def test_cart_rank_edges():
    assert cart_rank(12, 40, 0.01) == 1  # int(0.12) = 0, floored up to one component
    assert cart_rank(12, 40, 0.0) == 0 and cart_rank(40, 12, 1.0) == 12  # none / all of min(m, n)


@pytest.mark.parametrize("shape", [(24, 60), (60, 24)])
def test_cart_directions_have_the_rank_of_the_formula(shape):
    # 3 tasks, ρ = 0.16 on 24x60: r = max(1, int(3.84)) = 3; round gives 4, max(m, n) gives int(9.6) = 9,
    # and the row count m gives 9 on the 60x24 orientation.
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.randn(*shape, generator=g)}
    taus = [{"w": torch.randn(*shape, generator=g)} for _ in range(3)]
    _, dirs = cart_directions(pre, taus, rank_ratio=0.16, is_lowrank=lambda k, t: k == "w")
    assert [_rank(d["w"]) for d in dirs] == [3, 3, 3]


# ---- Iso-CTS: common k and per-task s (danielm1405/iso-merging iso.py):
#   common = int(r · f); total_ts = round((r − common) / T) · T; common = r − total_ts; s = total_ts / T
def _iso_official(r: int, t: int, f: float) -> tuple[int, int]:
    common = int(r * f)
    total_ts = round((r - common) / t) * t
    return r - total_ts, total_ts // t


@pytest.mark.parametrize(
    "rank, tasks, want",
    [
        (768, 8, (616, 19)),  # (768 − 614)/8 = 19.25: ceil would give 20 (k = 608)
        (768, 20, (608, 8)),  # 154/20 = 7.7: floor gives 7 (k = 628)
        (768, 4, (616, 38)),  # 154/4 = 38.5: Python's round is to even (38); half-up gives 39 (k = 612)
        (768, 14, (614, 11)),  # 154/14 = 11.0 exactly
    ],
)
def test_iso_cts_split_on_vit_b32_rank(rank, tasks, want):
    assert _iso_official(rank, tasks, 0.8) == want
    assert iso_cts_sizes(rank, tasks, 0.8) == want


def test_iso_cts_split_caps_the_task_space_when_tasks_outnumber_the_rank():
    # 20 tasks on a 12x40 weight, f = 0: round(12/20) = 1 per task would need 20 > 12 directions and leave
    # k = −8 (the authors' formula); the cap ⌊r/T⌋ = 0 leaves all 12 in the common space.
    assert _iso_official(12, 20, 0.0) == (-8, 1)
    assert iso_cts_sizes(12, 20, 0.0) == (12, 0)


# ---- AdaRank: stored components r = max(1, int(ρ · min(m, n))), all of them at ρ = 1
def _vit_block() -> dict[str, torch.Tensor]:
    p = "transformer.resblocks.0."
    return {
        p + "attn.in_proj_weight": torch.zeros(2304, 768), p + "attn.in_proj_bias": torch.zeros(2304),
        p + "attn.out_proj.weight": torch.zeros(768, 768), p + "mlp.c_fc.weight": torch.zeros(3072, 768),
        p + "mlp.c_proj.weight": torch.zeros(768, 3072),
    }


@pytest.mark.parametrize("split, ratio, want", [(True, 0.16, 122), (False, 0.16, 122), (True, 1.0, 768),
                                               (True, 0.3, 230)])
def test_adarank_max_rank_ratio_on_vit_b32_block(split, ratio, want):
    # 0.16·768 = 122.88 (round: 123), 0.3·768 = 230.4; ρ·max(m, n) would give 491 on c_fc / c_proj and
    # 368 on the fused [2304, 768] q;k;v; q, k, v split are [768, 768] each.
    mats = _plan_matrices(_vit_block(), split, ratio)
    assert len(mats) == (6 if split else 4)
    assert {m.rank for m in mats} == {want}
    assert {m.full_rank for m in mats} == {768}


def test_adarank_stored_ranks_on_the_tiny_clip():
    # tiny CLIP: in_proj [96, 32] (q, k, v [32, 32]), out_proj [32, 32], c_fc [64, 32], c_proj [32, 64];
    # ρ = 0.3: int(9.6) = 9 everywhere; round gives 10, max(m, n) gives 19 on c_fc / c_proj.
    from conftest import make_tiny_pool

    model = AdaRankModel(make_tiny_pool(2), max_rank_ratio=0.3)
    assert set(model.stored_ranks()) == {9}
    assert set(model.full_ranks()) == {32}


# ---- OptMerge: K = max(1, ⌊min(m, n)/N⌋) (CLIP port), int(min(m, n)/N) (LLaMA-Factory script)
@pytest.mark.parametrize("shape", VIT_B32)
def test_optmerge_rank_on_vit_b32_shapes(shape):
    assert optmerge_rank(*shape, 14) == 54  # 54.9: round gives 55; max(m, n) 219 / 164
    assert optmerge_rank(*shape, 8, variant="llamafactory") == 96


def test_optmerge_rank_when_tasks_outnumber_the_rank():
    assert optmerge_rank(12, 40, 20) == 1  # the CLIP port keeps one component
    assert optmerge_rank(40, 12, 20, variant="llamafactory") == 0  # int(0.6); max(m, n) would give 2


# ---- OPCM: r = first index with cumsum(σ)/Σσ > α (FusionBench opcm.py:
#   split_rank = (s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item())
@pytest.mark.parametrize(
    "alpha, want",
    # σ = (5, 2, 1): cumulative shares 0.625, 0.875, 1.0, exact in float32. At α = 0.625 the strict '>'
    # gives 1 where '>=' gives 0; a count (index + 1) would give 2; α = 0.9 -> index 2, α = 0.5 -> 0.
    [(0.625, 1), (0.875, 2), (0.5, 0), (0.9, 2)],
)
def test_opcm_split_rank(alpha, want):
    s = torch.tensor([5.0, 2.0, 1.0])
    assert int(torch.argmax((s.cumsum(0) / s.sum() > alpha).float())) == want
    assert split_rank(s, alpha) == want


def test_opcm_projection_zeroes_the_diagonal_and_the_protected_block_only():
    # merged τ = diag(5, 2, 1) padded to 3x5 (distinct σ, so U and V are the identity up to signs, which
    # cancel): P = τ_new itself. α = 0.625 -> r = 1: the diagonal and P[:1, :1] are removed; a rank of 2
    # (count instead of index, or '>=' at α = 0.875) would also remove P[0, 1] and P[1, 0].
    merged = torch.zeros(3, 5)
    merged[0, 0], merged[1, 1], merged[2, 2] = 5.0, 2.0, 1.0
    tau = torch.arange(1.0, 16.0).view(3, 5)
    want = tau.clone()
    for i in range(3):
        want[i, i] = 0.0
    torch.testing.assert_close(opcm_project(merged, tau, alpha=0.625), want, atol=1e-5, rtol=0)
    want2 = want.clone()
    want2[0, 1] = want2[1, 0] = 0.0  # α = 0.875: the first share > 0.875 is at index 2, so r = 2
    torch.testing.assert_close(opcm_project(merged, tau, alpha=0.875), want2, atol=1e-5, rtol=0)
    assert not math.isclose(float(want[0, 1]), 0.0)
