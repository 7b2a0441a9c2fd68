"""Task-conditioned merges (EMR-Merging, TALL masks' compressed form): each against an entry-by-entry
computation in Python floats, their defining properties, the file round trip bit for bit, the storage
arithmetic by hand, the pool by name, errors, dtypes and the fused q;k;v."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from conftest import make_tiny_pool
from safetensors import safe_open
from safetensors.torch import save_file

from adamerge.merging import METHODS, MergeError
from adamerge.merging.conditioned import (
    CONDITIONED,
    CONDITIONED_LABELS,
    CONDITIONED_PRESETS,
    TaskConditionedMerge,
    merge_pool_conditioned,
)
from adamerge.merging.consensus import tall_mask_merge
from adamerge.merging.emr import emr_merge
from adamerge.merging.fused import QKVLayout

ATTN = "attn.in_proj_weight"
SHAPES = {"w": (48, 32), "b": (32,), ATTN: (96, 32)}
K = 4


def _state(seed, scale=1.0, low=-8, high=9):
    """Multiples of 1/8 (sums and differences are exact in float32 and bf16, as in Python's floats)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: scale * torch.randint(low, high, s, generator=g).float() / 8 for k, s in SHAPES.items()}
    out["ids"] = torch.arange(5)
    return out


PRE = _state(100)
# τ in {−2, −1, 0, 1, 2}/8 · 1/4 for K = 4 tasks: few values, so that with this many entries every case
# EMR has to decide occurs often: sums that are exactly 0 (γ = −1 by the authors' rule), several agreeing
# tasks tied at the largest magnitude, tasks that disagree with γ (masked out), all-zero entries (ε = 0)
TAUS = [{k: v for k, v in _state(i, 0.25, -2, 3).items() if k != "ids"} for i in range(K)]


def _cols(taus, key):
    return list(zip(*(t[key].reshape(-1).tolist() for t in taus)))


def _emr_by_hand(taus, rescale="key_means"):
    """τ_uni, masks and λ from the paper's rules, one entry at a time in Python floats."""
    vector, masks = {}, [{} for _ in taus]
    num, den = [0.0] * len(taus), [0.0] * len(taus)
    for key in taus[0]:
        shape, uni, agree = taus[0][key].shape, [], []
        for col in _cols(taus, key):
            gamma = 1.0 if sum(col) > 0 else -1.0  # a zero sum elects −1 (authors: (mean > 0) * 2 − 1)
            ok = [x * gamma > 0 for x in col]
            uni.append(gamma * max([abs(x) for x, a in zip(col, ok) if a], default=0.0))
            agree.append(ok)
        vector[key] = torch.tensor(uni).reshape(shape)
        n = len(uni) if rescale == "key_means" else 1
        for i in range(len(taus)):
            masks[i][key] = torch.tensor([a[i] for a in agree]).reshape(shape)
            num[i] += sum(abs(c[i]) for c in _cols(taus, key)) / n
            den[i] += sum(abs(u) for u, a in zip(uni, agree) if a[i]) / n
    return vector, masks, [x / y for x, y in zip(num, den)]


def _equal(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _close(a, b, atol=1e-6):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), key


def test_the_data_holds_every_case_emr_decides():
    stack = torch.stack([t["w"] for t in TAUS])
    total = stack.sum(0)
    gamma = torch.where(total > 0, 1.0, -1.0)
    agree = stack * gamma > 0
    top = (stack.abs() * agree).amax(0)
    assert int(((total == 0) & (stack != 0).any(0)).sum()) > 20  # zero sums with nonzero τ
    assert int(((stack.abs() == top) & agree).sum(0).ge(2).sum()) > 100  # ties at the largest magnitude
    assert int(((stack * gamma) < 0).any(0).sum()) > 500  # disagreeing signs, masked out
    assert int((stack == 0).all(0).sum()) > 0  # no task moves the entry


@pytest.mark.parametrize("rescale", ["key_means", "entries"])
def test_emr_against_the_computation_by_hand(rescale):
    got = emr_merge(PRE, TAUS, rescale=rescale)
    vector, masks, scales = _emr_by_hand(TAUS, rescale)
    _equal(got.vector, vector)
    assert len(got) == K and got.method == "EMR-Merging" and got.tasks is None
    for g, w in zip(got.masks, masks):
        _equal(g, w)
    assert got.scales == pytest.approx(scales, rel=1e-6)
    for i in range(K):  # each task's model is θ0 + λ_i M_i ⊙ τ_uni
        want = {k: PRE[k] + scales[i] * torch.where(masks[i][k], vector[k], 0.0) for k in SHAPES}
        _close(got.state_for(i), dict(want, ids=PRE["ids"]))


def test_the_two_rescalers_differ_and_the_authors_one_is_the_default():
    by_key, by_entry = emr_merge(PRE, TAUS), emr_merge(PRE, TAUS, rescale="entries")
    assert by_key.scales == pytest.approx(_emr_by_hand(TAUS)[2], rel=1e-6)
    assert max(abs(a - b) for a, b in zip(by_key.scales, by_entry.scales)) > 1e-3


def test_the_rescaler_restores_each_tasks_mean_magnitude():
    """λ_i makes Σ_keys mean|λ_i M_i ⊙ τ_uni| equal Σ_keys mean|τ_i|: the rule the rescaler is built from."""
    got = emr_merge(PRE, TAUS)
    for i, tau in enumerate(TAUS):
        model = got.state_for(i)
        rebuilt = sum(float((model[k] - PRE[k]).abs().mean()) for k in SHAPES)
        assert rebuilt == pytest.approx(sum(float(tau[k].abs().mean()) for k in SHAPES), rel=1e-6)
        assert got.scales[i] > 0


def test_one_task_gives_the_expert_back_exactly():
    expert = {k: PRE[k] + TAUS[0][k] if k in SHAPES else PRE[k] for k in PRE}  # exact: multiples of 1/32
    got = emr_merge(PRE, [TAUS[0]])
    assert got.scales == (1.0,)
    _equal(got.state_for(0), expert)
    assert all(torch.equal(got.masks[0][k], TAUS[0][k] != 0) for k in SHAPES)


def test_an_expert_that_disagrees_everywhere_gets_theta0_and_scale_one():
    pre = {"w": torch.zeros(3, 2)}
    taus = [{"w": torch.full((3, 2), 1.0)}, {"w": torch.full((3, 2), -2.0)}]  # γ = −1 everywhere
    got = emr_merge(pre, taus)
    assert not got.masks[0]["w"].any() and got.scales[0] == 1.0  # the authors' 6/0 would be inf
    _equal(got.state_for(0), pre)
    assert torch.equal(got.state_for(1)["w"], torch.full((3, 2), -2.0))


def test_emr_is_elementwise_on_the_fused_qkv_and_only_key_means_sees_the_layout():
    layout = QKVLayout.of(PRE)
    split_pre, split_taus = layout.split(PRE), [layout.split(t) for t in TAUS]
    assert "attn.v_proj.weight" in split_pre
    for rescale in ("key_means", "entries"):
        fused, split = emr_merge(PRE, TAUS, rescale=rescale), emr_merge(split_pre, split_taus, rescale=rescale)
        _equal(fused.vector, layout.fuse(split.vector))
        for f, s in zip(fused.masks, split.masks):
            _equal(f, layout.fuse(s))
        same = fused.scales == pytest.approx(split.scales, rel=1e-6)
        assert same == (rescale == "entries")  # three key means of q, k, v ≠ one of [q; k; v]


def _tall_by_hand(taus, lams):
    mtl = {k: sum(t[k] for t in taus) for k in taus[0]}
    masks = [{} for _ in taus]
    for key in taus[0]:
        for t, (lam, col) in enumerate(zip(lams, (tau[key].reshape(-1).tolist() for tau in taus))):
            flags = [abs(x) > lam * abs(s - x) for x, s in zip(col, mtl[key].reshape(-1).tolist())]
            masks[t][key] = torch.tensor(flags).reshape(taus[0][key].shape)
    return mtl, masks


@pytest.mark.parametrize("lam", [0.6, [0.2, 0.3, 0.5, 0.6]])
def test_tall_masks_against_the_computation_by_hand(lam):
    lams = lam if isinstance(lam, list) else [lam] * K
    got = tall_mask_merge(PRE, TAUS, lam=lam)
    mtl, masks = _tall_by_hand(TAUS, lams)
    _equal(got.vector, mtl)
    assert got.scales == (1.0,) * K and got.method == "TALL masks"
    density = sum(float(m[k].float().mean()) for m in got.masks for k in SHAPES) / (K * len(SHAPES))
    assert 0.05 < density < 0.95
    for t in range(K):
        _equal(got.masks[t], masks[t])
        want = {k: PRE[k] + torch.where(masks[t][k], mtl[k], 0.0) for k in SHAPES}  # θ0 + m_t ⊙ τ_MTL
        _equal(got.state_for(t), dict(want, ids=PRE["ids"]))


def test_tall_lambda_zero_keeps_every_entry_the_task_moved():
    got = tall_mask_merge(PRE, TAUS, lam=0.0)
    mtl = {k: sum(t[k] for t in TAUS) for k in SHAPES}
    for t, tau in enumerate(TAUS):
        want = {k: PRE[k] + torch.where(tau[k] != 0, mtl[k], 0.0) for k in SHAPES}
        _equal(got.state_for(t), dict(want, ids=PRE["ids"]))


# ---- the container: file, storage, errors ------------------------------------------------------------
ODD = {"w": torch.zeros(48, 32), "b": torch.zeros(30), "ids": torch.arange(5)}  # 30: not a multiple of 8


def _odd_merge(k=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    vector = {key: torch.randn(ODD[key].shape, generator=g).to(dtype) for key in ("w", "b")}
    vector["b"][0] = -0.0  # the sign bit of a zero must survive too
    masks = [{key: torch.rand(v.shape, generator=g) > 0.5 for key, v in vector.items()} for _ in range(k)]
    return TaskConditionedMerge(ODD, vector, masks, [0.1 * (i + 1) / 3 for i in range(k)],
                                tasks=[f"t{i}" for i in range(k)], method="by hand")


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_round_trip_bit_for_bit(tmp_path, dtype):
    merge = _odd_merge(dtype=dtype)
    path = tmp_path / "emr.safetensors"
    merge.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["emr.safetensors"]  # written atomically, no temporaries
    back = TaskConditionedMerge.load(path, ODD)
    for key, v in merge.vector.items():
        assert back.vector[key].dtype == dtype and torch.equal(_bits(back.vector[key]), _bits(v)), key
    assert math.copysign(1.0, float(back.vector["b"][0])) == -1.0
    for a, b in zip(back.masks, merge.masks):
        _equal(a, b)
    assert back.scales == merge.scales and back.tasks == merge.tasks and back.method == "by hand"
    with safe_open(str(path), framework="pt") as f:  # masks bit-packed: ⌈n/8⌉ bytes per key and task
        names = list(f.keys())  # a safe_open handle is not iterable
        packed = {name: f.get_tensor(name) for name in names if name.startswith("mask/")}
        meta = json.loads(f.metadata()["adamerge"])
    assert sorted(packed) == sorted(f"mask/{k}/{key}" for k in range(3) for key in ("b", "w"))
    assert all(t.dtype == torch.uint8 for t in packed.values())
    assert packed["mask/0/w"].numel() == 192 and packed["mask/2/b"].numel() == 4
    assert meta["shapes"] == {"w": [48, 32], "b": [30]} and meta["tasks"] == ["t0", "t1", "t2"]


def test_a_real_merge_round_trips_and_rebuilds_the_same_models(tmp_path):
    merge = dataclasses.replace(emr_merge(PRE, TAUS), tasks=["a", "b", "c", "d"])
    merge.save(tmp_path / "m.safetensors")
    back = TaskConditionedMerge.load(tmp_path / "m.safetensors", PRE)
    for task in ("a", 3):
        _equal(back.state_for(task), merge.state_for(task))


def test_storage_bytes_by_hand():
    got = _odd_merge(k=3).storage_bytes()
    pre = 1536 * 4 + 30 * 4 + 5 * 8  # θ0 in its own dtypes: 6304
    vec = (1536 + 30) * 4  # float32: 6264
    masks = 3 * (1536 // 8 + math.ceil(30 / 8))  # 1 bit per entry, whole bytes per key: 588
    assert got == {"tasks": 3, "entries": 1566, "pretrained": pre, "vector": vec, "masks": masks,
                   "scales": 12, "total": pre + vec + masks + 12, "experts": 3 * pre,
                   "ratio": (pre + vec + masks + 12) / (3 * pre)}
    assert _odd_merge(k=3).storage_bytes(torch.bfloat16)["vector"] == 1566 * 2
    # all float32, every key shared: (2 + K/32) / K of K experts, plus the K scalars
    full = TaskConditionedMerge({"w": torch.zeros(64, 32)}, {"w": torch.zeros(64, 32)},
                                [{"w": torch.zeros(64, 32, dtype=torch.bool)}] * 8, [1.0] * 8).storage_bytes()
    assert full["ratio"] == (2 + 8 / 32) / 8 + 32 / full["experts"]


def test_state_for_returns_theta0_dtypes_and_copies():
    merge = _odd_merge()
    out = merge.state_for("t1")
    assert torch.equal(out["ids"], ODD["ids"]) and out["ids"].data_ptr() != ODD["ids"].data_ptr()
    assert torch.equal(out["b"], merge.scales[1] * merge.vector["b"] * merge.masks[1]["b"])


@pytest.mark.parametrize(
    "change,match",
    [
        ({"vector": {"w": torch.zeros(48, 32), "x": torch.zeros(2)}}, "vector key 'x' is missing from the pretrained"),
        ({"vector": {"w": torch.zeros(32, 48), "b": torch.zeros(30)}}, r"shape mismatch at key 'w': pretrained \(48, 32\)"),
        ({"vector": {"ids": torch.zeros(5)}}, "key 'ids': .* both must be floating point"),
        ({"vector": {"w": torch.full((48, 32), float("nan")), "b": torch.zeros(30)}}, "key 'w' contains NaN"),
        ({"masks": []}, "no task masks"),
        ({"masks": {"w": torch.zeros(48, 32, dtype=torch.bool)}}, "got a single dict"),
        ({"masks": [{"w": torch.zeros(48, 32, dtype=torch.bool)}] * 3}, "mask 0 and the shared task vector differ at key 'b'"),
        ({"masks": [{"w": torch.zeros(48, 32), "b": torch.zeros(30, dtype=torch.bool)}] * 3},
         r"mask 0 at key 'w' must be bool of shape \(48, 32\), got torch.float32"),
        ({"scales": [1.0, 2.0]}, "got 2 scales for 3 task masks"),
        ({"scales": [1.0, float("inf"), 1.0]}, r"scales\[1\] must be finite"),
        ({"scales": [1.0, "x", 1.0]}, r"scales\[1\] must be a number"),
        ({"tasks": ["a", "a", "b"]}, "task names must be unique strings"),
        ({"tasks": ["a"]}, "got 1 task names for 3 task masks"),
    ],
)
def test_bad_containers_are_named(change, match):
    merge = _odd_merge()
    fields = {f.name: getattr(merge, f.name) for f in dataclasses.fields(merge)}
    with pytest.raises(MergeError, match=match):
        TaskConditionedMerge(**{**fields, **change})


def test_bad_task_ids_and_files(tmp_path):
    merge = _odd_merge()
    for bad in (3, -1, True, 1.0):
        with pytest.raises(MergeError, match=r"task index must be an int in \[0, 3\)"):
            merge.state_for(bad)
    with pytest.raises(MergeError, match="unknown task 'x'; tasks: t0, t1, t2"):
        merge.state_for("x")
    with pytest.raises(MergeError, match="has no task names: pass task 'a' by index"):
        emr_merge(PRE, TAUS).state_for("a")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MergeError, match="is not a readable .safetensors file"):
        TaskConditionedMerge.load(tmp_path / "junk.safetensors", ODD)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MergeError, match="is not a task-conditioned merge file"):
        TaskConditionedMerge.load(tmp_path / "plain.safetensors", ODD)
    merge.save(tmp_path / "m.safetensors")
    with pytest.raises(MergeError, match="key 'b' is missing from the pretrained"):
        TaskConditionedMerge.load(tmp_path / "m.safetensors", {"w": ODD["w"]})
    with pytest.raises(MergeError, match=r"shape mismatch at key 'w': pretrained \(32, 48\)"):
        TaskConditionedMerge.load(tmp_path / "m.safetensors", dict(ODD, w=torch.zeros(32, 48)))


@pytest.mark.parametrize("fn", [emr_merge, tall_mask_merge])
def test_bad_merge_inputs_are_named(fn):
    with pytest.raises(MergeError, match="empty list of task vectors"):
        fn(PRE, [])
    with pytest.raises(MergeError, match=r"task vector 1: shape mismatch at key 'w': expected \(48, 32\)"):
        fn(PRE, [TAUS[0], dict(TAUS[1], w=torch.zeros(32, 48))])
    with pytest.raises(MergeError, match="task vector 2: key 'b' contains NaN"):
        fn(PRE, [TAUS[0], TAUS[1], dict(TAUS[2], b=torch.full((32,), float("nan")))])
    with pytest.raises(MergeError, match="key 'w' is missing from the pretrained"):
        fn({k: v for k, v in PRE.items() if k != "w"}, TAUS)
    with pytest.raises(MergeError, match="expected a list of task vectors, got a single state dict"):
        fn(PRE, TAUS[0])


def test_bad_arguments_are_named():
    with pytest.raises(MergeError, match=r"unknown EMR rescale 'sum': use one of \('key_means', 'entries'\)"):
        emr_merge(PRE, TAUS, rescale="sum")
    with pytest.raises(MergeError, match="lam must be a finite number >= 0"):
        tall_mask_merge(PRE, TAUS, lam=-0.1)
    with pytest.raises(MergeError, match="lam has 2 entries for 4 task vectors"):
        tall_mask_merge(PRE, TAUS, lam=[0.5, 0.5])


@pytest.mark.parametrize("fn", [emr_merge, tall_mask_merge])
def test_bf16_in_bf16_out(fn):
    pre = {k: v.bfloat16() if v.is_floating_point() else v for k, v in PRE.items()}
    taus = [{k: v.bfloat16() for k, v in t.items()} for t in TAUS]  # multiples of 1/32: exact in bf16
    got, want = fn(pre, taus), fn(PRE, TAUS)
    _equal(got.vector, want.vector)  # the shared vector is float32 either way
    assert got.scales == want.scales
    for i in range(K):
        out, ref = got.state_for(i), want.state_for(i)
        assert out["w"].dtype == torch.bfloat16 and torch.equal(out["ids"], PRE["ids"])
        assert all(torch.equal(out[k], ref[k].bfloat16()) for k in SHAPES)


def test_inputs_untouched():
    before = copy.deepcopy((PRE, TAUS))
    for merge in (emr_merge(PRE, TAUS), tall_mask_merge(PRE, TAUS)):
        merge.state_for(1)
    for a, b in zip((before[0], *before[1]), (PRE, *TAUS)):
        _equal(a, b)


# ---- by name on a pool ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    return make_tiny_pool(num_tasks=4)


def test_merge_pool_conditioned_by_name(pool):
    pre = pool.pretrained_state()
    order = ["task3", "task1", "task0"]
    taus = [t for _, t in pool.task_vectors(order)]
    emr = merge_pool_conditioned(pool, "emr", tasks=order)
    assert emr.tasks == tuple(order) and emr.method == "EMR-Merging"
    _equal(emr.state_for("task1"), emr_merge(pre, taus).state_for(1))
    tall = merge_pool_conditioned(pool, "tall_masks", tasks=order, lam=[0.2, 0.4, 0.6])
    _equal(tall.state_for("task0"), tall_mask_merge(pre, taus, lam=[0.2, 0.4, 0.6]).state_for(2))
    assert merge_pool_conditioned(pool, "emr").tasks == ("task0", "task1", "task2", "task3")
    enc = pool.build_encoder(emr.state_for("task3"))
    assert torch.isfinite(enc(torch.randn(2, 3, 16, 16))).all()
    assert CONDITIONED_LABELS["emr"] == "EMR-Merging" and CONDITIONED_LABELS["tall_masks"] == "TALL masks"
    assert CONDITIONED_PRESETS["emr"] == {} and {"emr", "tall_masks"} <= set(CONDITIONED)
    assert "emr" not in METHODS and "tall_masks" not in METHODS  # not a single merged model


def test_merge_pool_conditioned_errors(pool):
    with pytest.raises(MergeError, match="unknown conditioned merge 'emr2'; known merges: .*emr"):
        merge_pool_conditioned(pool, "emr2")
    with pytest.raises(MergeError, match="conditioned merge 'emr' has no preset 'official'; its presets: none"):
        merge_pool_conditioned(pool, "emr", preset="official")
    with pytest.raises(MergeError, match="conditioned merge 'emr': .*unexpected keyword argument 'lam'"):
        merge_pool_conditioned(pool, "emr", lam=0.3)
    with pytest.raises(MergeError, match="lam has 3 entries for 4 task vectors"):
        merge_pool_conditioned(pool, "tall_masks", lam=[0.2, 0.4, 0.6])
