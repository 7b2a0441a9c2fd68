"""Consensus merging / TALL masks: masks against an entry-by-entry computation in Python floats, claim
counts on data where k − 1 and k claims differ, k = 1 with λ = 0 giving task arithmetic, Consensus TIES,
the pool, presets, errors, dtypes, and the fused q;k;v."""

import copy

import pytest
import torch
from conftest import make_tiny_pool

from adamerge.merging import MergeError, merge_pool, task_arithmetic, ties_merge
from adamerge.merging.consensus import consensus_mask, consensus_ta, consensus_ties, tall_masks
from adamerge.merging.fused import QKVLayout
from adamerge.merging.registry import LABELS, PRESETS

ATTN = "attn.in_proj_weight"
SHAPES = {"w": (48, 32), "b": (32,), ATTN: (96, 32)}
K = 5


def _state(seed, scale=1.0):
    """Multiples of 1/8 (sums and differences are exact in float32, as in Python's floats)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: scale * torch.randint(-8, 9, s, generator=g).float() / 8 for k, s in SHAPES.items()}
    out["ids"] = torch.arange(5)
    return out


PRE = _state(100)
TAUS = [{k: v for k, v in _state(i, 0.25).items() if k != "ids"} for i in range(K)]


def _masks_by_hand(taus, lams, merged=None):
    """m_t[i] = |τ_t[i]| > λ_t |τ_MTL[i] − τ_t[i]|, one entry at a time in Python floats."""
    out = [{} for _ in taus]
    for key in taus[0]:
        cols = [t[key].reshape(-1).tolist() for t in taus]
        mtl = merged[key].reshape(-1).tolist() if merged is not None else [sum(c) for c in zip(*cols)]
        for t, lam in enumerate(lams):
            flags = [abs(x) > lam * abs(s - x) for x, s in zip(cols[t], mtl)]
            out[t][key] = torch.tensor(flags).reshape(taus[0][key].shape)
    return out


def _consensus_by_hand(pre, taus, k, lams, alpha, merged=None):
    masks = _masks_by_hand(taus, lams, merged)
    out = dict(pre)
    for key in taus[0]:
        mtl = merged[key] if merged is not None else sum(t[key] for t in taus)
        claims = sum(m[key].int() for m in masks)
        out[key] = pre[key] + alpha * torch.where(claims >= k, mtl, torch.zeros(()))
    return out


def _equal(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _close(a, b, atol=1e-6):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol), key


@pytest.mark.parametrize("lam", [0.6, [0.2, 0.3, 0.4, 0.5, 0.6]])
def test_tall_masks_entry_by_entry(lam):
    lams = lam if isinstance(lam, list) else [lam] * K
    got = tall_masks(PRE, TAUS, lam=lam)
    want = _masks_by_hand(TAUS, lams)
    assert len(got) == K
    for g, w in zip(got, want):
        assert set(g) == set(SHAPES)  # float keys only
        for key in SHAPES:
            assert g[key].dtype == torch.bool and torch.equal(g[key], w[key]), key
    density = sum(float(m[key].float().mean()) for m in got for key in SHAPES) / (K * len(SHAPES))
    assert 0.05 < density < 0.95  # the data exercise both outcomes


def test_comparison_is_strict_as_in_the_authors_code():
    # τ_1 = 1, τ_2 = 2: |τ_1| = 1 = 0.5·|3 − 1| (a tie: not claimed); |τ_2| = 2 > 0.5·1 (claimed)
    pre = {"w": torch.zeros(1, 2)}
    taus = [{"w": torch.tensor([[1.0, 0.0]])}, {"w": torch.tensor([[2.0, 0.0]])}]
    m1, m2 = tall_masks(pre, taus, lam=0.5)
    assert m1["w"].tolist() == [[False, False]] and m2["w"].tolist() == [[True, False]]


# three tasks, λ = 0.4; each row an entry, with the number of TALL masks that claim it
CLAIMS = [
    ((1.0, 0.0, 0.0), 1),  # 1 > 0;  0 > 0.4;  0 > 0.4
    ((3.0, 0.5, 0.0), 1),  # 3 > 0.2;  0.5 > 1.2 no;  0 > 1.4 no
    ((1.0, 1.0, 0.0), 2),  # 1 > 0.4 twice;  0 > 0.8 no
    ((2.0, 1.0, 0.0), 2),  # 2 > 0.4;  1 > 0.8;  0 > 1.2 no
    ((-1.0, -1.0, 0.0), 2),  # 1 > 0.4 twice;  0 > 0.8 no
    ((1.0, 1.0, 1.0), 3),  # 1 > 0.8 three times
]


def _claim_data():
    taus = [{"w": torch.zeros(48, 32), "b": torch.zeros(32)} for _ in range(3)]
    for r, (vals, _) in enumerate(CLAIMS):
        for t, v in enumerate(vals):
            taus[t]["w"][r, r] = v
            taus[t]["b"][r] = -v
    return {"w": torch.ones(48, 32), "b": torch.ones(32), "ids": torch.arange(3)}, taus, CLAIMS


def test_an_entry_claimed_by_k_minus_one_tasks_is_dropped_by_k_kept():
    pre, taus, rows = _claim_data()
    masks = tall_masks(pre, taus, lam=0.4)
    claims = sum(m["w"].int() for m in masks)
    assert [int(claims[r, r]) for r in range(len(rows))] == [n for _, n in rows]
    assert int(claims.sum()) == sum(n for _, n in rows)  # zeros elsewhere are claimed by no task
    for k in (1, 2, 3):
        out = consensus_ta(pre, taus, k=k, lam=0.4, alpha=0.5)
        cm = consensus_mask(masks, k=k)
        for r, (vals, n) in enumerate(rows):
            total = sum(vals)
            assert total != 0  # so that keeping and dropping differ
            want_w = 1.0 + 0.5 * total if n >= k else 1.0
            assert float(out["w"][r, r]) == want_w and bool(cm["w"][r, r]) == (n >= k), (k, vals)
            assert float(out["b"][r]) == (1.0 - 0.5 * total if n >= k else 1.0)
        assert torch.equal(out["ids"], pre["ids"])


@pytest.mark.parametrize("k,lam,alpha", [(2, 0.6, 0.3), (3, [0.2, 0.3, 0.4, 0.5, 0.6], 0.7), (1, 0.5, 1.0)])
def test_consensus_ta_against_the_computation_by_hand(k, lam, alpha):
    lams = lam if isinstance(lam, list) else [lam] * K
    got = consensus_ta(PRE, TAUS, k=k, lam=lam, alpha=alpha)
    _close(got, _consensus_by_hand(PRE, TAUS, k, lams, alpha))


def test_k_one_with_lambda_zero_is_task_arithmetic_exactly():
    taus = [dict(t, b=torch.zeros(32)) for t in TAUS]  # entries no task touches too
    _equal(consensus_ta(PRE, taus, k=1, lam=0.0, alpha=0.3), task_arithmetic(PRE, taus, lam=0.3))
    _equal(consensus_ta(PRE, TAUS, k=0, lam=0.6, alpha=0.4), task_arithmetic(PRE, TAUS, lam=0.4))
    beyond = consensus_ta(PRE, TAUS, k=K + 1)
    _equal(beyond, {k: v.clone() for k, v in PRE.items()})  # nothing is claimed by K + 1 tasks: θ0


def test_consensus_ties_masks_against_the_ties_vector():
    zeros = {key: torch.zeros(s) for key, s in SHAPES.items()}
    tv = ties_merge(zeros, TAUS, keep=0.2, merge="sum", lam=1.0)  # τ_TIES (TIES itself: test_merging_ties)
    got = consensus_ties(PRE, TAUS, k=2, lam=0.6, alpha=0.3)
    _close(got, _consensus_by_hand(PRE, TAUS, 2, [0.6] * K, 0.3, merged=tv))
    for g, w in zip(tall_masks(PRE, TAUS, lam=0.6, merged=tv), _masks_by_hand(TAUS, [0.6] * K, tv)):
        assert all(torch.equal(g[key], w[key]) for key in SHAPES)
    # the masks are taken against τ_TIES, not Σ τ: masking τ_TIES with the TA masks is another merge
    ta_masks = consensus_mask(tall_masks(PRE, TAUS, lam=0.6), k=2)
    other = PRE["w"] + 0.3 * tv["w"] * ta_masks["w"]
    assert not torch.equal(got["w"], other)
    _equal(consensus_ties(PRE, TAUS, k=0, alpha=0.3), ties_merge(PRE, TAUS, keep=0.2, merge="sum", lam=0.3))


def test_fused_qkv_is_three_matrices_entry_by_entry():
    """Element-wise: the merge on open_clip's fused [96, 32] equals it on q, k, v apart, fused back."""
    layout = QKVLayout.of(PRE)
    assert layout
    split_pre, split_taus = layout.split(PRE), [layout.split(t) for t in TAUS]
    assert "attn.v_proj.weight" in split_pre
    _equal(consensus_ta(PRE, TAUS), layout.fuse(consensus_ta(split_pre, split_taus)))
    _equal(consensus_ties(PRE, TAUS), layout.fuse(consensus_ties(split_pre, split_taus)))


def test_bf16_in_bf16_out():
    pre = {k: v.bfloat16() if v.is_floating_point() else v for k, v in PRE.items()}
    taus = [{k: v.bfloat16() for k, v in t.items()} for t in TAUS]  # multiples of 1/32: exact in bf16
    for fn in (consensus_ta, consensus_ties):
        out = fn(pre, taus)
        assert out["w"].dtype == torch.bfloat16 and torch.equal(out["ids"], PRE["ids"])
        want = fn(PRE, TAUS)
        assert all(torch.equal(out[k], want[k].bfloat16()) for k in SHAPES)


def test_inputs_untouched():
    before = copy.deepcopy((PRE, TAUS))
    consensus_ta(PRE, TAUS)
    consensus_ties(PRE, TAUS)
    tall_masks(PRE, TAUS)
    for a, b in zip((before[0], *before[1]), (PRE, *TAUS)):
        _equal(a, b)


def test_presets_and_labels():
    assert PRESETS["consensus_ta"]["official"] == {"k": 2}
    assert PRESETS["consensus_ties"]["official"] == {"k": 2, "keep": 0.2, "merge": "sum"}
    assert LABELS["consensus_ta"] == "Consensus TA" and LABELS["consensus_ties"] == "Consensus TIES"


@pytest.fixture(scope="module")
def pool():
    return make_tiny_pool(num_tasks=4)


def test_merge_pool_by_name(pool):
    pre = pool.pretrained_state()
    order = ["task3", "task1", "task0"]
    taus = [t for _, t in pool.task_vectors(order)]
    lams = [0.2, 0.4, 0.6]
    _equal(merge_pool(pool, "consensus_ta", tasks=order, lam=lams, alpha=0.4),
           consensus_ta(pre, taus, lam=lams, alpha=0.4))
    _equal(merge_pool(pool, "consensus_ta", preset="official"), merge_pool(pool, "consensus_ta"))
    _equal(merge_pool(pool, "consensus_ties", tasks=order, k=1), consensus_ties(pre, taus, k=1))
    with pytest.raises(MergeError, match="lam has 3 entries for 4 task vectors"):
        merge_pool(pool, "consensus_ta", lam=lams)
    enc = pool.build_encoder(merge_pool(pool, "consensus_ta"))
    assert torch.isfinite(enc(torch.randn(2, 3, 16, 16))).all()


@pytest.mark.parametrize("fn", [consensus_ta, consensus_ties])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": -1}, r"consensus k must be a whole number of tasks >= 0, got -1"),
        ({"k": 1.5}, r"consensus k must be a whole number of tasks >= 0, got 1.5"),
        ({"k": True}, r"consensus k must be a whole number"),
        ({"lam": -0.1}, "lam must be a finite number >= 0"),
        ({"lam": [0.5, 0.5]}, "lam has 2 entries for 5 task vectors"),
        ({"lam": [0.5, 0.5, float("nan"), 0.5, 0.5]}, r"lam\[2\] must be a finite number >= 0"),
        ({"alpha": float("inf")}, "alpha must be a finite number >= 0"),
    ],
)
def test_bad_arguments(fn, kwargs, match):
    with pytest.raises(MergeError, match=match):
        fn(PRE, TAUS, **kwargs)


def test_bad_inputs():
    with pytest.raises(MergeError, match=r"ties keep ratio must lie in \(0, 1\]"):
        consensus_ties(PRE, TAUS, keep=0.0)
    with pytest.raises(MergeError, match="unknown TIES merge function 'max'"):
        consensus_ties(PRE, TAUS, merge="max")
    for fn in (consensus_ta, consensus_ties, tall_masks):
        with pytest.raises(MergeError, match="empty list of task vectors"):
            fn(PRE, [])
        with pytest.raises(MergeError, match=r"task vector 1: shape mismatch at key 'w': expected \(48, 32\)"):
            fn(PRE, [TAUS[0], dict(TAUS[1], w=torch.zeros(32, 48))])
        with pytest.raises(MergeError, match="task vector 2: key 'b' contains NaN"):
            fn(PRE, [TAUS[0], TAUS[1], dict(TAUS[2], b=torch.full((32,), float("nan")))])
        with pytest.raises(MergeError, match="key 'w' is missing from the pretrained"):
            fn({k: v for k, v in PRE.items() if k != "w"}, TAUS)
    with pytest.raises(MergeError, match="merged multi-task vector is missing key 'b'"):
        tall_masks(PRE, TAUS, merged={"w": torch.zeros(48, 32)})
    with pytest.raises(MergeError, match=r"merged multi-task vector: shape mismatch at key 'b': expected \(32,\), "
                                         r"got \(3,\)"):
        tall_masks(PRE, TAUS, merged={key: torch.zeros(3) if key == "b" else torch.zeros(s) for key, s in SHAPES.items()})
    with pytest.raises(MergeError, match="task mask 1 is missing key 'b'"):
        consensus_mask([{"w": torch.ones(2, dtype=torch.bool), "b": torch.ones(1, dtype=torch.bool)},
                        {"w": torch.ones(2, dtype=torch.bool)}])
