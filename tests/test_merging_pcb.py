"""PCB-Merging against a direct numpy re-derivation of the paper's vision code on flat task vectors."""

import copy

import numpy as np
import pytest
import torch

from adamerge.merging import MergeError, pcb_merge


def _numpy_pcb(x: np.ndarray, keep: float, clamp: float, lams) -> np.ndarray:
    """vision_source_code/pcb.py of Du et al., written out with full sorts on an [n, d] matrix."""
    n, d = x.shape
    a = np.abs(x)
    s = np.sort(a, axis=1)
    a = np.clip(a, s[:, [int(d * clamp)]], s[:, [int(d * (1 - clamp) - 1)]])
    clamped = np.sign(x) * a
    norm = (a - a.min(1, keepdims=True)) / (a.max(1, keepdims=True) - a.min(1, keepdims=True))
    intra = np.exp(n * norm**2)
    inter = np.tanh(x * np.sum(np.sign(x) * norm, axis=0))
    bal = intra * inter
    sb = np.sort(bal, axis=1)
    bal = np.clip(bal, sb[:, [int(d * (1 - keep))]], sb[:, [int(d * 1 - 1)]])
    scale = (bal - bal.min(1, keepdims=True)) / (bal.max(1, keepdims=True) - bal.min(1, keepdims=True))
    tvs = clamped * np.asarray(lams, dtype=np.float64)[:, None]
    return np.sum(tvs * scale, axis=0) / np.maximum(np.sum(scale, axis=0), 1e-12)


def _setup(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g), "ids": torch.arange(3)}
    taus = [
        {"w": torch.randn(4, 5, generator=g) * (k + 1), "b": torch.randn(7, generator=g)} for k in range(n)
    ]
    flat = np.stack(
        [np.concatenate([t["w"].numpy().ravel(), t["b"].numpy()]).astype(np.float64) for t in taus]
    )
    return pre, taus, flat


def _unflat(pre, v):
    return {
        "w": pre["w"] + torch.from_numpy(v[:20].reshape(4, 5)).float(),
        "b": pre["b"] + torch.from_numpy(v[20:]).float(),
    }


@pytest.mark.parametrize(
    "keep,clamp,lam", [(0.05, 0.01, 1.2), (0.3, 0.1, 1.0), (1.0, 0.0, 0.7), (0.5, 0.05, [0.9, 1.1, 1.3])]
)
def test_matches_numpy_rederivation(keep, clamp, lam):
    pre, taus, flat = _setup()
    lams = lam if isinstance(lam, list) else [lam] * 3
    want = _unflat(pre, _numpy_pcb(flat, keep, clamp, lams))
    got = pcb_merge(pre, taus, keep=keep, lam=lam, clamp=clamp)
    for k in ("w", "b"):
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    assert torch.equal(got["ids"], pre["ids"])


def test_keeps_top_ratio_per_task():
    pre, taus, _ = _setup(n=1)
    out = pcb_merge(pre, taus, keep=0.2, clamp=0.0, lam=1.0)  # one task: merged = kept entries of τ
    changed = sum(int((out[k] != pre[k]).sum()) for k in ("w", "b"))
    # scores strictly above sorted(score)[int(d·(1 − r))] survive the min-max scaling (the one at
    # the threshold becomes 0): d − int(d·(1 − r)) − 1 entries, as in the reference code
    assert changed == 27 - int(27 * 0.8) - 1


def test_zero_lambda_and_no_mutation_and_half():
    pre, taus, _ = _setup()
    before = copy.deepcopy(taus)
    out = pcb_merge(pre, taus, lam=0.0)
    assert all(torch.equal(out[k], pre[k]) for k in pre)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, taus) for k in a)
    half = pcb_merge(
        {k: v.half() if v.is_floating_point() else v for k, v in pre.items()},
        [{k: v.half() for k, v in t.items()} for t in taus],
    )
    assert half["w"].dtype == torch.float16 and half["ids"].dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"keep": 0.0}, r"pcb keep must lie in \(0, 1\]"),
        ({"keep": 1.2}, r"pcb keep must lie in \(0, 1\]"),
        ({"clamp": 0.5}, r"clamp quantile must lie in \[0, 0.5\)"),
        ({"lam": -1.0}, "lam must be a finite number >= 0"),
        ({"lam": [1.0, 1.0]}, "lam has 2 entries for 3 task vectors"),
        ({"lam": [1.0, float("nan"), 1.0]}, r"lam\[1\] must be a finite number"),
    ],
)
def test_bad_arguments(kwargs, match):
    pre, taus, _ = _setup()
    with pytest.raises(MergeError, match=match):
        pcb_merge(pre, taus, **kwargs)


def test_bad_task_vectors():
    pre, taus, _ = _setup()
    with pytest.raises(MergeError, match="empty list"):
        pcb_merge(pre, [])
    with pytest.raises(MergeError, match="task vector 1: key 'b' contains NaN"):
        pcb_merge(pre, [taus[0], dict(taus[1], b=torch.full((7,), float("nan")))])
    with pytest.raises(MergeError, match="task vector 2 has unexpected key 'x'"):
        pcb_merge(pre, [taus[0], taus[1], dict(taus[2], x=torch.zeros(1))])
