"""ModelPool and its helpers (adamerge/models/pool.py), pinned exactly.

Pinned: :func:`check_task_list` (order kept, the exact messages for an empty list, a task listed twice and
unknown tasks, the *first* unknown named); :func:`zero_shot_logits` against a hand computation; the pool's
defaults (``logit_scale`` 100.0, name and benchmark id ``"pool"``), the frozen encoder, heads kept only for
tasks with experts; experts read from a dict or a callable, validated with messages naming the task;
fingerprints (file sources hashed from their file, in-memory ones from the state, computed once);
task vectors over float keys only, streamed in the order asked; ``export`` (dtype cast, metadata,
validation message) and ``build_encoder`` (a deep copy: the pool's encoder is never touched).

Why the data: the tiny encoder holds a GELU (so ``export`` writes an ``activation`` entry), an int64
buffer (a task vector must drop it) and float32 weights. Features have two rows of different norms and
two columns, so normalising over the wrong axis, or over everything, or dividing by ``logit_scale``,
gives other numbers (a stacked ``[2, 2, 2]`` batch tells the last axis from axis 1); a float64 head with float32 features fails unless the head is cast. Task lists
with two unknown tasks tell "the first unknown" from "the second"; one-expert pools catch an
off-by-one emptiness test; a float64 merged state tells "saved in the encoder's dtype" apart.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from adamerge.files import file_fingerprint
from adamerge.merging.task_vectors import MergeError, state_fingerprint
from adamerge.models.checkpoints import save_state_dict
from adamerge.models.pool import ModelPool, check_task_list, zero_shot_logits


class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.act = nn.GELU()
        self.register_buffer("steps", torch.tensor([7], dtype=torch.int64))

    def forward(self, x):
        return self.act(self.lin(x))


def _enc(seed=0):
    torch.manual_seed(seed)
    return Enc()


def _expert(enc, delta):
    return {k: (v + delta) if v.is_floating_point() else v + 1 for k, v in enc.state_dict().items()}


class Loader:
    """A callable expert source counting its calls; with ``path``, a file source."""

    def __init__(self, state, path=None):
        self.state, self.calls = state, 0
        if path is not None:
            self.path = path

    def __call__(self):
        self.calls += 1
        return self.state


def _pool(**kw):
    enc = _enc()
    experts = {"a": _expert(enc, 0.5), "b": Loader(_expert(enc, -0.25))}
    heads = {t: F.normalize(torch.randn(2, 3), dim=-1) for t in ("a", "b", "extra")}
    return ModelPool(enc, experts, heads, **kw), enc, experts, heads


# ---- check_task_list -------------------------------------------------------------------------
def test_check_task_list_keeps_order_and_messages():
    assert check_task_list(("b", "a"), ["a", "b", "c"]) == ["b", "a"]
    assert check_task_list(iter(["c"]), ["a", "b", "c"]) == ["c"]
    with pytest.raises(MergeError, match=r"^empty task list$"):
        check_task_list([], ["a"])
    with pytest.raises(MergeError, match=re.escape("task 'a' is listed twice in ['a', 'b', 'a']")):
        check_task_list(["a", "b", "a"], ["a", "b"])
    msg = "task 'x' has no expert in the pool (pool tasks: ['a', 'b'])"
    with pytest.raises(MergeError, match="^" + re.escape(msg) + "$"):
        check_task_list(["a", "x", "y"], ("a", "b"))


# ---- zero_shot_logits ------------------------------------------------------------------------
def test_zero_shot_logits_by_hand():
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    head = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    out = zero_shot_logits(features, head, 10.0)
    expected = torch.tensor([[6.0, 8.0, 10.0], [0.0, 10.0, 8.0]])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    # leading dims are batch dims: the feature axis is the last one (not axis 1)
    stacked = torch.stack([features, features.flip(0)])
    out3 = zero_shot_logits(stacked, head, 10.0)
    torch.testing.assert_close(out3, torch.stack([expected, expected.flip(0)]))


# ---- construction ----------------------------------------------------------------------------
def test_defaults_frozen_encoder_and_heads():
    pool, enc, _, heads = _pool()
    assert pool.logit_scale == 100.0 and pool.name == "pool" and pool.benchmark_id == "pool"
    assert pool.encoder is enc and not enc.training
    assert all(not p.requires_grad for p in enc.parameters())
    assert pool.tasks == ["a", "b"] and set(pool.heads) == {"a", "b"}
    assert torch.equal(pool.head("b"), heads["b"])
    with pytest.raises(MergeError, match=re.escape("task 'extra' has no expert in the pool")):
        pool.head("extra")
    named = ModelPool(_enc(), {"only": {}}, {"only": torch.ones(1, 3)}, logit_scale=7, name="n", benchmark="bm")
    assert named.logit_scale == 7.0 and isinstance(named.logit_scale, float)
    assert named.name == "n" and named.benchmark_id == "bm" and named.tasks == ["only"]
    assert ModelPool(_enc(), {"o": {}}, {"o": torch.ones(1, 3)}, name="n2").benchmark_id == "n2"


def test_construction_errors():
    with pytest.raises(ValueError, match=r"^empty expert list: a model pool needs at least one expert$"):
        ModelPool(_enc(), {}, {"a": torch.ones(1, 3)})
    with pytest.raises(ValueError, match=r"^no zero-shot head for task 'b'$"):
        ModelPool(_enc(), {"a": {}, "b": {}, "c": {}}, {"a": torch.ones(1, 3)})


def test_check_tasks_uses_pool_tasks():
    pool, *_ = _pool()
    assert pool.check_tasks(("b", "a")) == ["b", "a"]
    with pytest.raises(MergeError, match=re.escape("task 'z' has no expert in the pool (pool tasks: ['a', 'b'])")):
        pool.check_tasks(["z"])


# ---- experts ---------------------------------------------------------------------------------
def test_expert_state_from_dict_and_callable():
    pool, _, experts, _ = _pool()
    base = pool.pretrained_state()
    a = pool.expert_state("a")
    b = pool.expert_state("b")
    assert experts["b"].calls == 1
    torch.testing.assert_close(a["lin.weight"], base["lin.weight"] + 0.5)
    torch.testing.assert_close(b["lin.bias"], base["lin.bias"] - 0.25)
    assert int(b["steps"]) == 8


def test_expert_state_errors_name_the_task():
    enc = _enc()
    bad_keys = {k: v for k, v in enc.state_dict().items() if k != "lin.bias"}
    nan = _expert(enc, 0.0)
    nan["lin.weight"][0, 1] = float("nan")
    heads = {t: torch.ones(1, 3) for t in ("k", "n")}
    pool = ModelPool(enc, {"k": bad_keys, "n": Loader(nan)}, heads)
    msg = "expert 'k' is missing key 'lin.bias' (1 missing in all)"
    with pytest.raises(MergeError, match="^" + re.escape(msg) + "$") as info:
        pool.expert_state("k")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(MergeError, match="^" + re.escape("expert 'n': key 'lin.weight' contains NaN values") + "$"):
        pool.expert_state("n")


def test_task_vectors_float_keys_in_order():
    pool, *_ = _pool()
    tv = pool.task_vector("a")
    assert set(tv) == {"lin.weight", "lin.bias"}
    torch.testing.assert_close(tv["lin.weight"], torch.full((3, 2), 0.5))
    got = list(pool.task_vectors())
    assert [t for t, _ in got] == ["a", "b"]
    torch.testing.assert_close(got[1][1]["lin.bias"], torch.full((3,), -0.25))
    got = list(pool.task_vectors(["b"]))
    assert [t for t, _ in got] == ["b"]
    torch.testing.assert_close(got[0][1]["lin.weight"], torch.full((3, 2), -0.25))
    with pytest.raises(MergeError, match=r"^empty task list$"):
        list(pool.task_vectors([]))


# ---- fingerprints ----------------------------------------------------------------------------
def test_fingerprints_file_and_memory_sources_computed_once(tmp_path):
    enc = _enc()
    file_state = _expert(enc, 1.0)
    path = save_state_dict(file_state, tmp_path / "e.safetensors")
    mem = _expert(enc, 2.0)
    loader = Loader(_expert(enc, 3.0))
    file_src = Loader(file_state, path=path)
    heads = {t: torch.ones(1, 3) for t in ("f", "m", "c")}
    pool = ModelPool(enc, {"f": file_src, "m": mem, "c": loader}, heads)
    fp = pool.fingerprints()
    assert fp == {
        "pretrained": state_fingerprint(enc.state_dict()),
        "experts": {"f": file_fingerprint(path), "m": state_fingerprint(mem), "c": state_fingerprint(loader.state)},
    }
    assert file_src.calls == 0 and loader.calls == 1
    assert pool.fingerprints() is fp and loader.calls == 1


# ---- export and build_encoder ----------------------------------------------------------------
def test_export_casts_and_records_metadata(tmp_path):
    pool, enc, *_ = _pool()
    merged = {k: v.double() + 1 if v.is_floating_point() else v for k, v in pool.pretrained_state().items()}
    out = pool.export(merged, tmp_path / "m.safetensors")
    assert out == tmp_path / "m.safetensors"
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"activation": "gelu"}
        assert f.get_tensor("lin.weight").dtype == torch.float32
        torch.testing.assert_close(f.get_tensor("lin.weight"), enc.lin.weight + 1)
        assert f.get_tensor("steps").tolist() == [7]
    pool.model_name, pool.model_config = "tiny-name", {"embed_dim": 3}
    out = pool.export(merged, tmp_path / "n.safetensors")
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"activation": "gelu", "open_clip_model": "tiny-name",
                                "open_clip_config": '{"embed_dim": 3, "quick_gelu": false}'}


def test_export_refuses_bad_state_and_writes_nothing(tmp_path):
    pool, *_ = _pool()
    state = pool.pretrained_state()
    state["extra"] = torch.zeros(1)
    msg = "merged state dict has unexpected key 'extra' (1 unexpected in all)"
    with pytest.raises(MergeError, match="^" + re.escape(msg) + "$"):
        pool.export(state, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_build_encoder_is_a_frozen_deep_copy():
    pool, enc, *_ = _pool()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    plain = pool.build_encoder()
    assert plain is not pool.encoder and plain.lin is not enc.lin
    torch.testing.assert_close(plain.lin.weight, before["lin.weight"])
    enc.train()
    state = {k: v + 2 if v.is_floating_point() else v for k, v in before.items()}
    built = pool.build_encoder(state)
    assert not built.training and all(not p.requires_grad for p in built.parameters())
    torch.testing.assert_close(built.lin.weight, before["lin.weight"] + 2)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k])
    bad = dict(state)
    bad["extra"] = torch.zeros(1)
    msg = "merged state dict has unexpected key 'extra' (1 unexpected in all)"
    with pytest.raises(MergeError, match="^" + re.escape(msg) + "$"):
        pool.build_encoder(bad)
