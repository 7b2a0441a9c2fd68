"""The shared validation helpers of adamerge/merging/_common.py, pinned directly: every message word for
word, every interval at its two ends (0 and 1 exactly, and just outside), the defaults of each flag, and
the in-place order statistics against ``sorted``. Boundary values are chosen so that ``>`` for ``>=``,
a swapped flag or a dropped ``isfinite`` each turn one accepted value into an error or back."""

from __future__ import annotations

import pytest
import torch

from adamerge.merging._common import (
    check_against_pretrained,
    check_lam,
    check_ratio,
    check_same_keys,
    check_taus,
    float_keys,
    is_linear_weight,
    kth_largest_,
    kth_smallest_,
)
from adamerge.merging.task_vectors import MergeError


# ---- check_ratio --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, interval, ok, bad", [
    ({}, "(0, 1]", [1e-12, 0.5, 1.0, 1], [0.0, 0, -0.1, 1.0 + 1e-9, 2]),
    ({"allow_zero": True}, "[0, 1]", [0.0, 0, 1.0], [-1e-12, 1.5]),
    ({"allow_one": False}, "(0, 1)", [1e-12, 1.0 - 1e-9], [0.0, 1.0, 1]),
    ({"allow_zero": True, "allow_one": False}, "[0, 1)", [0.0, 0.999], [1.0, -0.5]),
])
def test_check_ratio_intervals_at_both_ends(flags, interval, ok, bad):
    for v in ok:
        got = check_ratio(v, "keep", **flags)
        assert type(got) is float and got == float(v), v
    for v in bad:
        msg = f"keep must lie in {interval}, got {v!r}"
        with pytest.raises(MergeError) as err:
            check_ratio(v, "keep", **flags)
        assert str(err.value) == msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_ratio_refuses_non_finite_even_with_both_ends_open(value):
    # nan fails every comparison but inf passes `v >= 0`: only the isfinite test refuses +inf in [0, 1]
    with pytest.raises(MergeError) as err:
        check_ratio(value, "p", allow_zero=True, allow_one=True)
    assert str(err.value) == f"p must lie in [0, 1], got {value!r}"


@pytest.mark.parametrize("value", ["a", None, [0.5]])
def test_check_ratio_names_a_non_number(value):
    with pytest.raises(MergeError) as err:
        check_ratio(value, "dare drop rate")
    assert str(err.value) == f"dare drop rate must be a number, got {value!r}"


def test_check_ratio_accepts_numeric_strings_and_tensors():
    assert check_ratio("0.25", "r") == 0.25
    assert check_ratio(torch.tensor(0.5), "r") == 0.5
    with pytest.raises(MergeError) as err:
        check_ratio("2", "r")
    assert str(err.value) == "r must lie in (0, 1], got '2'"  # the value as given, not as converted


# ---- check_lam ----------------------------------------------------------------------------------------
def test_check_lam_scalar_zero_is_allowed_and_negative_or_non_finite_are_not():
    assert check_lam(0) == 0.0 and type(check_lam(0)) is float
    assert check_lam(0.3) == 0.3
    assert check_lam(torch.tensor(0.5)) == 0.5 and type(check_lam(torch.tensor(0.5))) is float
    for v in (-1e-12, -1, float("nan"), float("inf")):
        with pytest.raises(MergeError) as err:
            check_lam(v)
        assert str(err.value) == f"lam must be a finite number >= 0, got {v!r}"
    with pytest.raises(MergeError) as err:
        check_lam(-2.0, name="alpha")
    assert str(err.value) == "alpha must be a finite number >= 0, got -2.0"


def test_check_lam_sequence_per_task():
    got = check_lam((0, 0.5, 2), count=3)
    assert got == [0.0, 0.5, 2.0] and all(type(v) is float for v in got)
    assert check_lam(torch.tensor([0.25, 0.75])) == [0.25, 0.75]  # a 1-D tensor is a sequence
    assert check_lam([1.0, 2.0, 3.0, 4.0]) == [1.0, 2.0, 3.0, 4.0]  # count None: any length
    with pytest.raises(MergeError) as err:
        check_lam([0.1, 0.2], count=3)
    assert str(err.value) == "lam has 2 entries for 3 task vectors"
    with pytest.raises(MergeError) as err:
        check_lam([0.1, 0.2, 0.3, 0.4], name="scales", count=3)
    assert str(err.value) == "scales has 4 entries for 3 task vectors"
    # the first bad entry is named, by index, with its float value
    with pytest.raises(MergeError) as err:
        check_lam([0.0, 1.0, -0.5, float("nan")], count=4)
    assert str(err.value) == "lam[2] must be a finite number >= 0, got -0.5"
    with pytest.raises(MergeError) as err:
        check_lam([1, float("inf")], name="w")
    assert str(err.value) == "w[1] must be a finite number >= 0, got inf"
    with pytest.raises(MergeError) as err:
        check_lam([2, float("nan")])
    assert str(err.value) == "lam[1] must be a finite number >= 0, got nan"


# ---- check_taus / check_against_pretrained ------------------------------------------------------------
def test_check_taus_messages():
    a, b = {"w": torch.zeros(2, 3)}, {"w": torch.zeros(2, 3)}
    got = check_taus(t for t in (a, b))
    assert got == [a, b] and isinstance(got, list)
    with pytest.raises(MergeError) as err:
        check_taus(a)
    assert str(err.value) == "expected a list of task vectors, got a single state dict"
    with pytest.raises(MergeError) as err:
        check_taus(a, what="state dict")
    assert str(err.value) == "expected a list of state dicts, got a single state dict"
    with pytest.raises(MergeError) as err:
        check_taus([])
    assert str(err.value) == "empty list of task vectors: need at least one"
    with pytest.raises(MergeError) as err:
        check_taus([], what="expert")
    assert str(err.value) == "empty list of experts: need at least one"
    # the third one is wrong: it is named by its index (2) against the first one's shapes
    with pytest.raises(MergeError, match=r"^task vector 2: shape mismatch at key 'w'"):
        check_taus([a, b, {"w": torch.zeros(3, 2)}])
    with pytest.raises(MergeError, match=r"^state dict 1 is missing key 'w'"):
        check_taus([a, {"v": torch.zeros(2, 3)}], what="state dict")
    # finiteness of every one, the first included, named by index
    with pytest.raises(MergeError) as err:
        check_taus([{"w": torch.tensor([float("nan")])}, {"w": torch.zeros(1)}])
    assert str(err.value) == "task vector 0: key 'w' contains NaN values"
    with pytest.raises(MergeError) as err:
        check_taus([a, b, {"w": torch.full((2, 3), float("inf"))}])
    assert str(err.value) == "task vector 2: key 'w' contains Inf values"


def test_check_against_pretrained_messages():
    pre = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    check_against_pretrained(pre, [{"w": torch.ones(2, 3), "ids": torch.arange(4)}])  # int keys are not merged
    with pytest.raises(MergeError) as err:
        check_against_pretrained(pre, [{"w": torch.ones(2, 3), "x": torch.ones(1)}])
    assert str(err.value) == "task vector key 'x' is missing from the pretrained state dict"
    with pytest.raises(MergeError) as err:  # a non-float key first: skipped, the keys after it still checked
        check_against_pretrained(pre, [{"ids": torch.arange(4), "x": torch.ones(1)}])
    assert str(err.value) == "task vector key 'x' is missing from the pretrained state dict"
    with pytest.raises(MergeError) as err:
        check_against_pretrained(pre, [{"b": torch.ones(3), "w": torch.ones(3, 2)}])
    assert str(err.value) == "shape mismatch at key 'w': pretrained (2, 3), task vector (3, 2)"
    with pytest.raises(MergeError) as err:
        check_against_pretrained({"w": torch.tensor([0.0, float("-inf")])}, [{"w": torch.ones(2)}])
    assert str(err.value) == "pretrained state dict: key 'w' contains Inf values"


# ---- small helpers ------------------------------------------------------------------------------------
def test_float_keys_in_order():
    state = {"b": torch.zeros(1), "ids": torch.arange(2), "a": torch.zeros(1, dtype=torch.float16),
             "mask": torch.ones(1, dtype=torch.bool), "c": torch.zeros(1, dtype=torch.bfloat16)}
    assert float_keys(state) == ["b", "a", "c"]


def test_kth_smallest_and_largest_against_sorted():
    torch.manual_seed(0)
    x = torch.randn(101)
    x[7] = x[50] = x[99] = 0.125  # ties
    ref = sorted(x.tolist())
    for i in (0, 1, 50, 99, 100):
        assert kth_smallest_(x.clone(), i) == ref[i], i
    for k in (1, 2, 51, 101):
        assert kth_largest_(x.clone(), k) == ref[101 - k], k
    # indices outside [0, n-1] are clamped to the ends
    assert kth_smallest_(x.clone(), -5) == ref[0] and kth_smallest_(x.clone(), 1000) == ref[-1]
    assert kth_smallest_(x.clone(), 100.7) == ref[100]  # int() of a float index
    y = x.clone()
    kth_smallest_(y, 50)  # in place: the buffer is partitioned around the answer
    assert y[50].item() == ref[50] and (y[:50] <= ref[50]).all() and (y[51:] >= ref[50]).all()
    assert sorted(y.tolist()) == ref
    assert type(kth_smallest_(torch.tensor([3.0, 1.0]), 0)) is float


@pytest.mark.parametrize("key, tensor, want", [
    ("transformer.resblocks.0.attn.in_proj_weight", torch.zeros(6, 2), True),
    ("mlp.c_fc.weight", torch.zeros(8, 2, dtype=torch.float16), True),
    ("positional_embedding", torch.zeros(5, 2), False),
    ("token_embedding.weight", torch.zeros(5, 2), False),
    ("embeddings.position_embedding.weight", torch.zeros(5, 2), False),
    ("proj", torch.zeros(4, 2), False),
    ("ln.weight", torch.zeros(4), False),
    ("conv1.weight", torch.zeros(4, 3, 2, 2), False),
    ("int.weight", torch.zeros(4, 2, dtype=torch.int64), False),
    ("weight_decay_table", torch.zeros(4, 2), False),
])
def test_is_linear_weight(key, tensor, want):
    assert is_linear_weight(key, tensor) is want


def test_check_same_keys_names_the_expert_and_the_first_key():
    a = {"x": 1, "y": 2}
    assert check_same_keys([a, {"y": 0, "x": 0}], ["a", "b"], "the Fisher") == ["x", "y"]
    with pytest.raises(MergeError) as err:
        check_same_keys([a, {"x": 0, "y": 0}, {"x": 0, "y": 0, "z": 0, "w": 0}], ["a", "b", "c"], "the Fisher")
    assert str(err.value) == "the Fisher of expert 'c': has key 'w' it should not, unlike that of expert 'a'"
    with pytest.raises(MergeError) as err:
        check_same_keys([a, {"x": 0}], ["a", "b"], "the Gram matrices")
    assert str(err.value) == "the Gram matrices of expert 'b': has no key 'y', unlike that of expert 'a'"
    with pytest.raises(MergeError) as err:  # both extra and missing: the extra one is named
        check_same_keys([a, {"x": 0, "q": 0}], ["a", "b"], "the Fisher")
    assert str(err.value) == "the Fisher of expert 'b': has key 'q' it should not, unlike that of expert 'a'"
    with pytest.raises(MergeError) as err:  # two missing: the first in sorted order
        check_same_keys([{"b": 0, "a": 0, "c": 0}, {"c": 0}], ["e0", "e1"], "X")
    assert str(err.value) == "X of expert 'e1': has no key 'a', unlike that of expert 'e0'"
