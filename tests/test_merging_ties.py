"""TIES-Merging checked entry by entry against values computed by hand (3 task vectors, 8 entries)."""

import copy

import pytest
import torch

from adamerge.merging import MergeError, dare_all, ties_elect_sign, ties_merge, ties_preprocess, ties_trim


def _tau(w, b):
    return {"w": torch.tensor(w, dtype=torch.float32).reshape(2, 3), "b": torch.tensor(b, dtype=torch.float32)}


# keep = 0.5 of d = 8 entries -> the 4 largest magnitudes of each task vector, over both keys.
TAUS = [
    _tau([0.5, -0.1, 0.3, -0.9, 0.05, 0.2], [0.5, 0.01]),  # keeps 0.9, 0.5, 0.5, 0.3
    _tau([-0.4, 0.2, 0.6, -0.1, 0.0, -0.7], [-0.5, 0.02]),  # keeps 0.7, 0.6, 0.5, 0.4
    _tau([0.3, -0.8, -0.2, 0.1, 0.05, 0.0], [0.0, 0.03]),  # keeps 0.8, 0.3, 0.2, 0.1
]
TRIMMED = [
    _tau([0.5, 0, 0.3, -0.9, 0, 0], [0.5, 0]),
    _tau([-0.4, 0, 0.6, 0, 0, -0.7], [-0.5, 0]),
    _tau([0.3, -0.8, -0.2, 0.1, 0, 0], [0, 0]),
]
# sums: w = [0.4, -0.8, 0.7, -0.8, 0, -0.7], b = [0 (0.5 - 0.5), 0]; signs sum to -1 -> majority -1,
# so the three zero sums (w4, b0, b1) elect -1.
GAMMA = _tau([1, -1, 1, -1, -1, -1], [-1, -1])
SELECTED = [  # entries agreeing with the elected sign
    _tau([0.5, 0, 0.3, -0.9, 0, 0], [0, 0]),
    _tau([0, 0, 0.6, 0, 0, -0.7], [-0.5, 0]),
    _tau([0.3, -0.8, 0, 0, 0, 0], [0, 0]),
]
MERGED_SUM = _tau([0.8, -0.8, 0.9, -0.9, 0, -0.7], [-0.5, 0])
MERGED_MEAN = _tau([0.4, -0.8, 0.45, -0.9, 0, -0.7], [-0.5, 0])  # sum / number of agreeing entries

PRE = {"w": torch.ones(2, 3), "b": torch.full((2,), 2.0), "ids": torch.arange(4)}


def _close(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), (k, a[k], b[k])


def test_trim_keeps_top_fraction_over_whole_model():
    for tau, want in zip(TAUS, TRIMMED):
        _close(ties_trim(tau, keep=0.5), want)


def test_elect_sign_by_mass_with_majority_for_zeros():
    _close(ties_elect_sign(TRIMMED), GAMMA)


def test_preprocess_is_per_task_selected_and_sums_to_ties_sum():
    pre = ties_preprocess(TAUS, keep=0.5)
    for got, want in zip(pre, SELECTED):
        _close(got, want)
    _close({k: sum(p[k] for p in pre) for k in ("w", "b")}, MERGED_SUM)


@pytest.mark.parametrize("merge,want", [("mean", MERGED_MEAN), ("sum", MERGED_SUM)])
def test_merge_entry_by_entry(merge, want):
    out = ties_merge(PRE, TAUS, keep=0.5, merge=merge, lam=0.3)
    _close({k: out[k] for k in ("w", "b")}, {k: PRE[k] + 0.3 * want[k] for k in ("w", "b")})
    assert torch.equal(out["ids"], PRE["ids"])


def test_lambda_zero_gives_pretrained_and_inputs_untouched():
    before = copy.deepcopy((PRE, TAUS))
    out = ties_merge(PRE, TAUS, keep=0.2, lam=0.0)
    for k, v in PRE.items():
        assert torch.equal(out[k], v)
    ties_preprocess(TAUS, keep=0.5)
    for a, b in zip(before[1], TAUS):
        for k in a:
            assert torch.equal(a[k], b[k])
    assert all(torch.equal(before[0][k], PRE[k]) for k in PRE)


def test_keep_one_without_conflicts_is_task_arithmetic():
    taus = [
        _tau([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1.0, 2.0]),
        _tau([0.3, 0.2, 0.1, 0.0, 0.5, 0.6], [1.0, 0.0]),
    ]
    out = ties_merge(PRE, taus, keep=1.0, merge="sum", lam=0.5)
    for k in ("w", "b"):
        assert torch.allclose(out[k], PRE[k] + 0.5 * (taus[0][k] + taus[1][k]))


def test_half_precision_computed_in_float32_and_returned_half():
    pre = {k: v.half() if v.is_floating_point() else v for k, v in PRE.items()}
    taus = [{k: v.half() for k, v in t.items()} for t in TAUS]
    out = ties_merge(pre, taus, keep=0.5, merge="sum", lam=0.3)
    assert out["w"].dtype == torch.float16 and out["ids"].dtype == torch.int64
    want = ties_merge(PRE, [{k: v.half().float() for k, v in t.items()} for t in TAUS], keep=0.5, merge="sum")
    assert torch.equal(out["w"], want["w"].half())


def test_dare_option_is_dare_then_ties():
    got = ties_merge(PRE, TAUS, keep=0.5, dare=0.5, seed=3)
    want = ties_merge(PRE, dare_all(TAUS, drop=0.5, seed=3), keep=0.5)
    for k in PRE:
        assert torch.equal(got[k], want[k])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"keep": 0.0}, r"keep ratio must lie in \(0, 1\]"),
        ({"keep": 1.5}, r"keep ratio must lie in \(0, 1\]"),
        ({"keep": float("nan")}, "keep ratio"),
        ({"lam": -0.1}, "lam must be a finite number >= 0"),
        ({"lam": float("inf")}, "lam must be a finite number >= 0"),
        ({"merge": "max"}, "unknown TIES merge function 'max'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MergeError, match=match):
        ties_merge(PRE, TAUS, **kwargs)


def test_bad_task_vectors():
    with pytest.raises(MergeError, match="empty list of task vectors"):
        ties_merge(PRE, [])
    bad_shape = dict(TAUS[1], w=torch.zeros(3, 2))
    with pytest.raises(
        MergeError, match=r"task vector 1: shape mismatch at key 'w': expected \(2, 3\), got \(3, 2\)"
    ):
        ties_merge(PRE, [TAUS[0], bad_shape])
    nan = dict(TAUS[2], b=torch.tensor([float("nan"), 0.0]))
    with pytest.raises(MergeError, match="task vector 2: key 'b' contains NaN"):
        ties_merge(PRE, [TAUS[0], TAUS[1], nan])
    with pytest.raises(MergeError, match="key 'w' is missing from the pretrained"):
        ties_merge({"b": PRE["b"]}, TAUS)
    with pytest.raises(MergeError, match="trimmed task vector 1 is missing key 'b'"):
        ties_elect_sign([TRIMMED[0], {"w": TRIMMED[1]["w"]}])


def test_sign_is_elected_by_mass_not_by_count():
    # one large negative against two small positives: the mass (sum) elects -1, a count of signs +1
    taus = [{"w": torch.tensor([-0.9])}, {"w": torch.tensor([0.2])}, {"w": torch.tensor([0.3])}]
    pre = {"w": torch.zeros(1)}
    assert ties_merge(pre, taus, keep=1.0, merge="sum", lam=1.0)["w"].item() == pytest.approx(-0.9)
    assert ties_elect_sign(taus)["w"].item() == -1.0


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_a_zero_sum_entry_takes_the_majority_sign_plus_when_the_signs_cancel(merge):
    # entries 0 and 1 elect +1 and -1 (their signs cancel: the total is exactly 0); entry 2 sums to 0 and
    # must take +1, keeping task 0's 0.5 (majority -1 would keep -0.5; no sign at all would give 0)
    taus = [{"w": torch.tensor([1.0, -1.0, 0.5])}, {"w": torch.tensor([1.0, -1.0, -0.5])}]
    pre = {"w": torch.zeros(3)}
    out = ties_merge(pre, taus, keep=1.0, merge=merge, lam=1.0)["w"]
    assert out[2].item() == 0.5
    assert ties_elect_sign(taus)["w"].tolist() == [1.0, -1.0, 1.0]
    assert [p["w"][2].item() for p in ties_preprocess(taus, keep=1.0)] == [0.5, 0.0]


def _written_out_ties(pre, taus, keep, merge, lam):
    """TIES on the flattened model with plain ops: sort for the thresholds, sum for the sign."""
    keys = list(taus[0])
    flat = [torch.cat([t[k].reshape(-1) for k in keys]) for t in taus]
    n = max(1, int(flat[0].numel() * keep + 1e-6))
    trimmed = torch.stack([f * (f.abs() >= f.abs().sort(descending=True).values[n - 1]) for f in flat])
    gamma = torch.sign(trimmed.sum(0))
    gamma[gamma == 0] = 1.0 if gamma.sum() >= 0 else -1.0
    agree = trimmed * (torch.sign(trimmed) == gamma)
    merged = agree.sum(0) if merge == "sum" else agree.sum(0) / (agree != 0).sum(0).clamp(min=1)
    out, offset = {}, 0
    for k in keys:
        size = pre[k].numel()
        out[k] = pre[k] + lam * merged[offset:offset + size].reshape(pre[k].shape)
        offset += size
    return out


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_chunked_merge_equals_the_written_out_merge_across_chunk_boundaries(merge, monkeypatch):
    # the election and the disjoint merge run in chunks of _CHUNK entries: a chunk of 7 cuts every key
    # ([48, 32], [32], [96, 32]) at odd places, so an offset slip between chunks shows
    import adamerge.merging.ties as ties_module

    monkeypatch.setattr(ties_module, "_CHUNK", 7)
    g = torch.Generator().manual_seed(5)
    shapes = {"w": (48, 32), "b": (32,), "attn.in_proj_weight": (96, 32)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    taus = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(5)]
    got = ties_merge(pre, taus, keep=0.3, merge=merge, lam=0.7)
    _close(got, _written_out_ties(pre, taus, 0.3, merge, 0.7))
    if merge == "sum":
        summed = {k: pre[k] + 0.7 * sum(p[k] for p in ties_preprocess(taus, keep=0.3)) for k in shapes}
        _close(summed, got)
