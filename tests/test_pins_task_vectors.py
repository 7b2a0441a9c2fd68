"""Task-vector helpers: behaviours the mutation run found unpinned (scripts/mutation.sh on
adamerge/merging/task_vectors.py), each against a written-out expectation.

The state dicts mix float32, float16 and integer keys, with an integer key *between* float keys, so that
code that stops at the first non-float key, or treats it as a float, shows; half-precision values are
chosen where a float16 accumulator loses what a float32 one keeps.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from adamerge.merging.task_vectors import (
    MergeError,
    add_task_vector,
    check_compatible,
    check_finite,
    dtype_named,
    flatten,
    linear_combination,
    running_sum,
    scale,
    state_fingerprint,
    sum_task_vectors,
    task_vector,
    unflatten,
)


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(2, 3, generator=g), "ids": torch.tensor([4, 5]),
            "b": torch.randn(4, generator=g).half(), "c": torch.randn(3, 1, generator=g)}


# ---- checks and their messages ---------------------------------------------------------------------
def test_check_messages_name_the_dict_the_key_and_the_problem():
    with pytest.raises(MergeError, match=r"^state dict is missing key 'a' \(1 missing in all\)$"):
        check_compatible({"a": torch.zeros(1)}, {})
    with pytest.raises(MergeError, match=r"^state dict: key 'a' holds torch.int64 values where the model has "
                                         r"torch.float32$"):
        check_compatible({"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(MergeError, match=r"^fine-tuned state dict is missing key 'c'"):
        task_vector({"a": torch.zeros(1)}, {"a": torch.zeros(1), "c": torch.zeros(1)})
    with pytest.raises(MergeError, match=r"^state dict: key 'x' contains Inf values$"):
        check_finite({"x": torch.tensor([1.0, -float("inf")])})
    with pytest.raises(MergeError, match=r"^state dict: key 'x' contains NaN values$"):
        check_finite({"x": torch.tensor([float("inf"), float("nan")])})  # NaN named first when both
    with pytest.raises(MergeError, match=r"^no task vectors: the task list is empty$"):
        running_sum(iter([]))


def test_check_finite_on_single_entries_and_overflowing_sums():
    with pytest.raises(MergeError, match="key 's' contains NaN"):
        check_finite({"s": torch.tensor([float("nan")])})  # a one-entry tensor (a logit scale) is checked too
    big = torch.full((4,), 3e38)  # finite entries whose float32 sum overflows to Inf: not refused
    assert not torch.isfinite(big.sum())
    check_finite({"big": big, "ids": torch.tensor([1, 2]), "empty": torch.zeros(0)})


def test_dtype_named():
    assert dtype_named("bfloat16", "tv_dtype") is torch.bfloat16
    assert dtype_named("float16", "precision") is torch.float16
    with pytest.raises(ValueError, match=r"^tv_dtype must be one of float32, bfloat16, got 'float16'$"):
        dtype_named("float16", "tv_dtype", ("float32", "bfloat16"))
    with pytest.raises(ValueError, match=r"^x must be one of float32, bfloat16, float16, got 'fp8'$"):
        dtype_named("fp8", "x")


# ---- fingerprints ------------------------------------------------------------------------------
def _fingerprint_written_out(state, samples=64):
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        h.update(f"{key}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        flat = t.reshape(-1).numpy()
        if flat.size:
            idx = np.linspace(0, flat.size - 1, min(samples, flat.size)).astype(np.int64)
            h.update(flat[idx].tobytes())
    return h.hexdigest()[:16]


def test_state_fingerprint_is_the_documented_hash():
    # 300 entries: 64 evenly spaced samples (a 65th, or an index range shifted by one, changes the bytes)
    state = {"w": torch.arange(300.0).view(3, 100), "ids": torch.arange(5), "s": torch.tensor([2.5]),
             "e": torch.zeros(0)}
    got = state_fingerprint(state)
    assert got == _fingerprint_written_out(state) and len(got) == 16
    assert state_fingerprint(dict(reversed(list(state.items())))) == got  # key order does not matter
    changed = {**state, "w": state["w"].clone()}
    changed["w"][0, 0] = -1.0  # the first sampled entry
    assert state_fingerprint(changed) != got
    changed["w"][0, 0], changed["w"][2, 99] = 0.0, -1.0  # the last one
    assert state_fingerprint(changed) != got
    assert state_fingerprint({**state, "w": state["w"].view(100, 3)}) != got  # same entries, other shape


# ---- arithmetic --------------------------------------------------------------------------------
def test_task_vector_skips_integer_keys_wherever_they_are():
    theta0, expert = _mixed(0), _mixed(1)
    tau = task_vector(expert, theta0)
    assert list(tau) == ["a", "b", "c"]  # 'c' comes after the integer key
    torch.testing.assert_close(tau["c"], expert["c"] - theta0["c"])
    assert tau["b"].dtype == torch.float16


def test_add_task_vector_copies_keys_the_task_vector_does_not_have():
    theta0 = _mixed(0)
    out = add_task_vector(theta0, {"a": torch.ones(2, 3)}, lam=0.5)
    torch.testing.assert_close(out["a"], theta0["a"] + 0.5)
    for k in ("ids", "b", "c"):
        assert torch.equal(out[k], theta0[k]) and out[k] is not theta0[k]


def test_scale_multiplies_float_keys_in_their_dtype_and_copies_the_rest():
    tau = _mixed(0)
    out = scale(tau, 0.25)
    torch.testing.assert_close(out["a"], 0.25 * tau["a"])
    assert out["b"].dtype == torch.float16 and torch.equal(out["b"], (0.25 * tau["b"].float()).half())
    assert torch.equal(out["ids"], tau["ids"])  # integers are not scaled


def test_linear_combination_accumulates_in_float32_from_the_first_dict():
    # float16 values 2048, 1, −2048: a float16 accumulator rounds 2048 + 1 to 2048 and ends at 0; float32 gives 1
    states = [{"ids": torch.tensor([7]), "h": torch.tensor([v], dtype=torch.float16)} for v in (2048.0, 1.0, -2048.0)]
    out = linear_combination(states, [1.0, 1.0, 1.0])
    assert out["h"].dtype == torch.float16 and out["h"].item() == 1.0
    assert torch.equal(out["ids"], torch.tensor([7]))
    single = linear_combination([_mixed(0)], [2.0])  # one state dict: 2·s
    torch.testing.assert_close(single["c"], 2.0 * _mixed(0)["c"])
    taus = [_mixed(s) for s in range(3)]
    total = sum_task_vectors(taus)
    torch.testing.assert_close(total["a"], taus[0]["a"] + taus[1]["a"] + taus[2]["a"])
    assert total["b"].dtype == torch.float16


def test_flatten_and_unflatten_follow_the_key_order_and_dtypes():
    state = _mixed(0)
    vec = flatten(state, keys=["c", "a"])  # the order asked for, not the dict's
    torch.testing.assert_close(vec, torch.cat([state["c"].reshape(-1), state["a"].reshape(-1)]))
    assert flatten({"ids": torch.arange(3)}).numel() == 0
    full = flatten(state)  # a (6) b (4) c (3): 13 entries, the integer key skipped
    assert full.numel() == 13 and full.dtype == torch.float32
    back = unflatten(full, state)
    assert list(back) == ["a", "b", "c"]
    for k in back:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k


def test_running_sum_names_a_streamed_task_vector_that_does_not_fit():
    # A pool's stream is summed without check_taus; the k-th task vector is named by its index (from 0) and
    # checked on float keys only (integer buffers may differ or be absent).
    first = {"w": torch.ones(2), "b": torch.ones(3), "ids": torch.arange(2)}
    with pytest.raises(MergeError, match=r"^task vector 2: shape mismatch at key 'b': expected \(3,\), got \(4,\)$"):
        running_sum(iter([first, first, {"w": torch.ones(2), "b": torch.ones(4)}]))
    with pytest.raises(MergeError, match=r"^task vector 1 is missing key 'b' \(1 missing in all\)$"):
        running_sum(iter([first, {"w": torch.ones(2), "b": torch.arange(3)}]))
    total, count = running_sum(iter([first, {"w": torch.ones(2), "b": torch.ones(3)}]))
    assert count == 2 and torch.equal(total["b"], torch.full((3,), 2.0)) and set(total) == {"w", "b"}
