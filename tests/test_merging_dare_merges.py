"""DARE-TA and DARE-TIES: the drop re-drawn in the test from the documented generator, TIES written out
on the flattened model, p = 0 giving task arithmetic / TIES exactly, presets, the pool, errors, dtypes."""

import copy
import gc
import math
import weakref

import pytest
import torch
from conftest import make_tiny_pool

from adamerge.merging import MergeError, merge_pool, task_arithmetic, ties_merge
from adamerge.merging.dare import dare_all, dare_each
from adamerge.merging.dare_merges import dare_task_arithmetic, dare_ties_merge
from adamerge.merging.fused import QKVLayout
from adamerge.merging.registry import LABELS, PRESETS

ATTN = "attn.in_proj_weight"
SHAPES = {"w": (48, 32), "b": (32,), ATTN: (96, 32)}  # the fused q;k;v of a d = 32 attention


def _state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}
    out["ids"] = torch.arange(5)  # a non-float buffer: passes through from θ0
    return out


PRE = _state(100)
TAUS = [{k: v for k, v in _state(i, 0.1).items() if k != "ids"} for i in range(5)]


def _ref_dropped(taus, p, seed):
    """DARE by hand: one generator, tasks in turn, keys in order, keep = U[0,1) >= p, survivors / (1 − p)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for tau in taus:
        out.append({k: torch.where(torch.rand(v.shape, generator=g) >= p, v / (1 - p), torch.zeros(()))
                    for k, v in tau.items()})
    return out


def _ref_ties(taus, keep, merge):
    """TIES on the whole flattened model: top-⌊d·keep⌋ |τ_k| kept, mass sign (zeros: majority), disjoint."""
    keys = list(taus[0])
    flat = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in taus])
    n = max(1, math.floor(flat.shape[1] * keep + 1e-6))
    thr = flat.abs().sort(dim=1, descending=True).values[:, n - 1 : n]
    trimmed = torch.where(flat.abs() >= thr, flat, torch.zeros(()))
    gamma = torch.sign(trimmed.sum(0))
    gamma[gamma == 0] = 1.0 if float(gamma.sum()) >= 0 else -1.0
    agree = torch.where(gamma > 0, trimmed > 0, trimmed < 0)
    total = (trimmed * agree).sum(0)
    merged = total if merge == "sum" else total / agree.sum(0).clamp(min=1)
    out, i = {}, 0
    for k in keys:
        out[k] = merged[i : i + taus[0][k].numel()].reshape(taus[0][k].shape)
        i += taus[0][k].numel()
    return out


def _close(a, b, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), (k, (a[k].float() - b[k].float()).abs().max())


def _equal(a, b):
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_drop_zero_is_task_arithmetic_and_ties_exactly():
    _equal(dare_task_arithmetic(PRE, TAUS, drop=0.0, lam=0.4), task_arithmetic(PRE, TAUS, lam=0.4))
    for merge in ("sum", "mean"):
        _equal(dare_ties_merge(PRE, TAUS, drop=0.0, keep=0.3, merge=merge, lam=0.7),
               ties_merge(PRE, TAUS, keep=0.3, merge=merge, lam=0.7))


def test_single_task_drops_exactly_the_entries_of_an_independent_bernoulli_draw():
    p, lam, seed = 0.7, 0.5, 11
    out = dare_task_arithmetic(PRE, TAUS[:1], drop=p, lam=lam, seed=seed)
    g = torch.Generator().manual_seed(seed)
    kept = []
    for key, tau in TAUS[0].items():
        keep = torch.rand(tau.shape, generator=g) >= p
        assert torch.equal(out[key][~keep], PRE[key][~keep])  # dropped: θ0 exactly
        assert torch.allclose(out[key][keep], PRE[key][keep] + lam * tau[keep] / (1 - p), atol=1e-6)
        kept.append(keep.reshape(-1))
    assert abs(float(torch.cat(kept).float().mean()) - (1 - p)) < 0.03  # 4640 draws: sd 0.007
    assert torch.equal(out["ids"], PRE["ids"])


@pytest.mark.parametrize("seed", [0, 7])
def test_dare_ta_against_the_drop_by_hand(seed):
    p, lam = 0.5, 0.3
    dropped = _ref_dropped(TAUS, p, seed)
    want = {k: PRE[k] + lam * sum(d[k] for d in dropped) for k in SHAPES}
    got = dare_task_arithmetic(PRE, TAUS, drop=p, lam=lam, seed=seed)
    _close({k: got[k] for k in SHAPES}, want)
    _equal(got, task_arithmetic(PRE, TAUS, lam=lam, dare=p, seed=seed))  # the same as TA's dare= option


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_dare_ties_is_trim_after_the_drop(merge):
    p, keep, lam, seed = 0.5, 0.2, 0.5, 3
    dropped = _ref_dropped(TAUS, p, seed)
    want = {k: PRE[k] + lam * v for k, v in _ref_ties(dropped, keep, merge).items()}
    got = dare_ties_merge(PRE, TAUS, drop=p, keep=keep, merge=merge, lam=lam, seed=seed)
    _close({k: got[k] for k in SHAPES}, want)
    # trimming first and dropping the trimmed vectors (with the same masks) is another merge
    trimmed_first = _ref_ties(_ref_dropped(_trim_each(TAUS, keep), p, seed), 1.0, merge)
    assert not torch.allclose(got["w"], PRE["w"] + lam * trimmed_first["w"], atol=1e-4)


def _trim_each(taus, keep):
    out = []
    for t in taus:
        flat = torch.cat([v.reshape(-1) for v in t.values()]).abs()
        thr = flat.sort(descending=True).values[math.floor(flat.numel() * keep) - 1]
        out.append({k: torch.where(v.abs() >= thr, v, torch.zeros(())) for k, v in t.items()})
    return out


def test_seed_and_generator_order():
    a = dare_task_arithmetic(PRE, TAUS, drop=0.5, seed=1)
    assert not torch.equal(a["w"], dare_task_arithmetic(PRE, TAUS, drop=0.5, seed=2)["w"])
    _equal(a, dare_task_arithmetic(PRE, TAUS, drop=0.5, seed=1))
    # each task vector gets its own draw from the one generator (not one mask reused)
    one, two = dare_all([TAUS[0], TAUS[0]], drop=0.5, seed=4)
    assert not torch.equal(one["w"], two["w"])
    lazy = list(dare_each(iter(TAUS), drop=0.5, seed=4))
    for x, y in zip(lazy, dare_all(TAUS, drop=0.5, seed=4)):
        _equal(x, y)


def test_fused_qkv_gets_the_masks_of_three_matrices():
    """DARE and TA/TIES are element-wise and the draw runs through the keys in order, so the merge on
    open_clip's fused [96, 32] equals the merge on q, k, v apart ([32, 32] each), fused back."""
    layout = QKVLayout.of(PRE)
    assert layout  # attn.in_proj_weight [96, 32] is a fused q;k;v
    split_pre, split_taus = layout.split(PRE), [layout.split(t) for t in TAUS]
    assert {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"} <= set(split_pre)
    _equal(dare_task_arithmetic(PRE, TAUS, seed=5), layout.fuse(dare_task_arithmetic(split_pre, split_taus, seed=5)))
    _equal(dare_ties_merge(PRE, TAUS, seed=5), layout.fuse(dare_ties_merge(split_pre, split_taus, seed=5)))


def test_bf16_in_bf16_out():
    pre = {k: v.bfloat16() if v.is_floating_point() else v for k, v in PRE.items()}
    taus = [{k: v.bfloat16() for k, v in t.items()} for t in TAUS]
    out = dare_task_arithmetic(pre, taus, drop=0.5, lam=0.3, seed=2)
    assert out["w"].dtype == torch.bfloat16 and out["ids"].dtype == torch.int64
    dropped = dare_all(taus, drop=0.5, seed=2)  # DARE returns τ̃ in τ's dtype
    for k in SHAPES:
        want = (pre[k].float() + 0.3 * sum(d[k].float() for d in dropped)).bfloat16()
        assert torch.equal(out[k], want), k
    ties = dare_ties_merge(pre, taus)
    assert ties["b"].dtype == torch.bfloat16 and torch.equal(ties["ids"], PRE["ids"])


def test_inputs_untouched():
    before = copy.deepcopy((PRE, TAUS))
    dare_task_arithmetic(PRE, TAUS)
    dare_ties_merge(PRE, TAUS)
    for a, b in zip((before[0], *before[1]), (PRE, *TAUS)):
        _equal(a, b)


def test_defaults_are_the_official_presets_and_labels():
    assert PRESETS["dare_ta"]["official"] == {"drop": 0.5, "lam": 0.3}
    assert PRESETS["dare_ties"]["official"] == {"drop": 0.5, "keep": 0.2, "merge": "sum", "lam": 0.5}
    assert PRESETS["dare_ta"]["mllm"] == {"drop": 0.2, "lam": 0.3, "seed": 42}
    assert PRESETS["dare_ties"]["mllm"] == {"drop": 0.2, "keep": 0.2, "merge": "mean", "lam": 0.3, "seed": 42}
    assert LABELS["dare_ta"] == "DARE-TA" and LABELS["dare_ties"] == "DARE-TIES"
    _equal(dare_task_arithmetic(PRE, TAUS), dare_task_arithmetic(PRE, TAUS, **PRESETS["dare_ta"]["official"]))
    _equal(dare_ties_merge(PRE, TAUS), dare_ties_merge(PRE, TAUS, **PRESETS["dare_ties"]["official"]))


@pytest.fixture(scope="module")
def pool():
    return make_tiny_pool(num_tasks=3)


def test_merge_pool_by_name_streams_the_same_merge(pool):
    pre = pool.pretrained_state()
    order = ["task2", "task0", "task1"]
    taus = [t for _, t in pool.task_vectors(order)]
    _equal(merge_pool(pool, "dare_ta", tasks=order, drop=0.4, lam=0.35, seed=9),
           dare_task_arithmetic(pre, taus, drop=0.4, lam=0.35, seed=9))
    _equal(merge_pool(pool, "dare_ta", preset="official"), merge_pool(pool, "dare_ta"))
    _equal(merge_pool(pool, "dare_ta", drop=0.0), merge_pool(pool, "task_arithmetic"))
    _equal(merge_pool(pool, "dare_ties", tasks=order, seed=1), dare_ties_merge(pre, taus, seed=1))
    _equal(merge_pool(pool, "dare_ties", preset="mllm"),
           ties_merge(pre, [t for _, t in pool.task_vectors()], keep=0.2, merge="mean", lam=0.3, dare=0.2, seed=42))
    enc = pool.build_encoder(merge_pool(pool, "dare_ties"))
    assert torch.isfinite(enc(torch.randn(2, 3, 16, 16))).all()


@pytest.mark.parametrize("fn", [dare_task_arithmetic, dare_ties_merge])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"drop": 1.0}, r"dare drop rate must lie in \[0, 1\)"),
        ({"drop": -0.1}, r"dare drop rate must lie in \[0, 1\)"),
        ({"drop": float("nan")}, "dare drop rate"),
        ({"lam": -0.5}, "lam must be a finite number >= 0"),
    ],
)
def test_bad_arguments(fn, kwargs, match):
    with pytest.raises(MergeError, match=match):
        fn(PRE, TAUS, **kwargs)


def test_bad_ties_arguments_and_task_vectors(pool):
    with pytest.raises(MergeError, match=r"ties keep ratio must lie in \(0, 1\]"):
        dare_ties_merge(PRE, TAUS, keep=0.0)
    with pytest.raises(MergeError, match="unknown TIES merge function 'max'"):
        dare_ties_merge(PRE, TAUS, merge="max")
    for fn in (dare_task_arithmetic, dare_ties_merge):
        with pytest.raises(MergeError, match="empty list of task vectors"):
            fn(PRE, [])
        with pytest.raises(MergeError, match=r"task vector 1: shape mismatch at key 'w': expected \(48, 32\)"):
            fn(PRE, [TAUS[0], dict(TAUS[1], w=torch.zeros(32, 48))])
        with pytest.raises(MergeError, match="task vector 2: key 'b' contains NaN"):
            fn(PRE, [TAUS[0], TAUS[1], dict(TAUS[2], b=torch.full((32,), float("nan")))])
        with pytest.raises(MergeError, match="key 'w' is missing from the pretrained"):
            fn({k: v for k, v in PRE.items() if k != "w"}, TAUS)
    with pytest.raises(MergeError, match=r"dare drop rate must lie in \[0, 1\)"):
        merge_pool(pool, "dare_ta", drop=1.0)
    with pytest.raises(MergeError, match="merging method 'dare_ta': .*unexpected keyword argument 'dare'"):
        merge_pool(pool, "dare_ta", dare=0.5)


class _OnceEach:
    """A pool that hands each τ_k out once and remembers a weak reference to its tensors."""

    def __init__(self, pre, taus):
        self.pre, self.taus, self.refs, self.alive_when_read = pre, list(taus), [], []

    def pretrained_state(self):
        return dict(self.pre)

    def task_vectors(self, tasks=None):
        k = 0
        while self.taus:
            gc.collect()
            self.alive_when_read.append(sum(r() is not None for r in self.refs))
            tau = self.taus.pop(0)
            self.refs.append(weakref.ref(next(iter(tau.values()))))
            yield f"task{k}", tau
            del tau
            k += 1


@pytest.mark.parametrize("name", ["dare_ta", "dare_ties"])
def test_pool_dare_methods_let_each_original_task_vector_go(name):
    # a pool reading experts from disk hands each τ_k out once: the streamed DARE merges keep only its
    # dropped copy, so when τ_k is read no earlier original is alive (a list method would hold them all)
    taus = [{k: v.clone() for k, v in t.items()} for t in TAUS]
    want = merge_pool(_OnceEach(PRE, [dict(t) for t in taus]), name, seed=3)
    pool = _OnceEach(PRE, taus)
    del taus
    got = merge_pool(pool, name, seed=3)
    assert pool.alive_when_read == [0] * len(TAUS)
    _equal(got, want)
    ref = (dare_ties_merge if name == "dare_ties" else dare_task_arithmetic)(PRE, TAUS, seed=3)
    _equal(got, ref)
