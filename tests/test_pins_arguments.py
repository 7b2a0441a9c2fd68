"""Key predicates that could be dropped unnoticed: each must decide which keys get the special treatment.

Every test gives a predicate that accepts one key and rejects another, with key names chosen so that the
method's default predicate answers the other way round: a method that ignores the argument (and falls back
to its default) gets both keys wrong. The rejected key must hold exactly the fallback value (θ_0, or θ_0 +
the mean task vector, as the method documents) and the accepted key the special one, computed here.
"""

from __future__ import annotations

import math

import torch

from adamerge.merging.cart import cart
from adamerge.merging.iso import iso_c
from adamerge.merging.opcm import OPCMerger, opcm_project
from adamerge.merging.optmerge import optmerge, optmerge_weight
from adamerge.merging.tsv import tsv_merge, tsv_merge_weight
from adamerge.merging.wudi import wudi_merge, wudi_weight

SHAPE = (6, 10)  # non-square, so a transposed or square-only code path would show


def _states(keys: list[str], num_tasks: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(*SHAPE, generator=g) for k in keys}
    taus = [{k: torch.randn(*SHAPE, generator=g) for k in keys} for _ in range(num_tasks)]
    return pre, taus


def _mean(taus, key):
    return torch.stack([t[key] for t in taus]).mean(0)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _differs(a, b):
    assert (a - b).abs().max() > 1e-3


def test_cart_is_lowrank_picks_the_truncated_keys():
    # default cart_lowrank_key: 'mlp' in the name -> low rank, 'a.weight' -> not; the predicate swaps them
    acc, rej = "a.weight", "blocks.0.mlp.c_fc.weight"
    pre, taus = _states([acc, rej])
    out = cart(pre, taus, lam=2.0, rank_ratio=0.2, is_lowrank=lambda k, t: k == acc)
    _close(out[rej], pre[rej] + _mean(taus, rej))  # Σ_i (τ_i − τ̄) = 0: the weight average
    r = max(1, int(0.2 * min(SHAPE)))  # 1
    low = 0
    for t in taus:
        u, s, vh = torch.linalg.svd(t[acc] - _mean(taus, acc), full_matrices=False)
        low = low + (u[:, :r] * s[:r]) @ vh[:r]
    _close(out[acc], pre[acc] + _mean(taus, acc) + 2.0 * low)
    _differs(out[acc], pre[acc] + _mean(taus, acc))


def test_iso_c_is_matrix_picks_the_isotropic_keys():
    # default is_iso_matrix: every 2-D key but a 'text_projection'; the predicate takes only that one
    acc, rej = "text_projection", "a.weight"
    pre, taus = _states([acc, rej])
    out = iso_c(pre, taus, lam=1.0, is_matrix=lambda k, t: k == acc)
    _close(out[rej], pre[rej] + _mean(taus, rej))
    u, s, vh = torch.linalg.svd(sum(t[acc] for t in taus), full_matrices=False)
    _close(out[acc], pre[acc] + (u * s.mean()) @ vh)  # flat spectrum: every σ set to their mean


def test_tsv_is_svd_merged_picks_the_svd_keys():
    acc, rej = "text_projection", "a.weight"
    pre, taus = _states([acc, rej])
    out = tsv_merge(pre, taus, is_svd_merged=lambda k, t: k == acc)
    _close(out[rej], pre[rej] + _mean(taus, rej))
    _close(out[acc], pre[acc] + tsv_merge_weight([t[acc] for t in taus]))
    _differs(out[acc], pre[acc] + _mean(taus, acc))


def test_optmerge_is_optimized_and_is_kept():
    # default (clip variant): every 2-D key but an 'lm_head' is optimised and none is kept
    acc, rej, kept = "lm_head.weight", "a.weight", "b.weight"
    pre, taus = _states([acc, rej, kept])
    out = optmerge(pre, taus, lr=1e-2, iters=3, is_optimized=lambda k, t: k == acc,
                   is_kept=lambda k, t: k == kept)
    assert torch.equal(out[kept], pre[kept])  # kept at θ_0, bit for bit
    _close(out[rej], pre[rej] + _mean(taus, rej))
    _close(out[acc], pre[acc] + optmerge_weight([t[acc] for t in taus], lr=1e-2, iters=3))
    _differs(out[acc], pre[acc] + _mean(taus, acc))


def test_wudi_is_optimized_picks_the_optimised_keys():
    # default (official variant): block linears ('...mlp.c_fc.weight') optimised, the rest at θ_0
    acc, rej = "a.weight", "blocks.0.mlp.c_fc.weight"
    pre, taus = _states([acc, rej])
    out = wudi_merge(pre, taus, lr=1e-2, iters=3, is_optimized=lambda k, t: k == acc)
    assert torch.equal(out[rej], pre[rej])
    _close(out[acc], pre[acc] + wudi_weight([t[acc] for t in taus], lr=1e-2, iters=3))


def test_opcm_is_projected_picks_the_projected_keys():
    # default is_linear_weight: 2-D keys ending in 'weight' are projected, 'proj' is not
    acc, rej = "proj", "b.weight"
    pre, taus = _states([acc, rej], num_tasks=2)
    merger = OPCMerger(pre, alpha=0.5, is_projected=lambda k, t: k == acc)
    for t in taus:
        merger.add_task_vector(t)
    s = {acc: taus[0][acc] + opcm_project(taus[0][acc], taus[1][acc], 0.5), rej: taus[0][rej] + taus[1][rej]}
    norms = [math.sqrt(sum(float(t[k].square().sum()) for k in t)) for t in taus]
    lam = math.sqrt(sum(float(v.square().sum()) for v in s.values())) / (sum(norms) / 2)
    got = merger.merged_state()
    for k in (acc, rej):
        _close(got[k], pre[k] + s[k] / lam)
    _differs(s[acc], taus[0][acc] + taus[1][acc])  # the projection changed the accepted key
