"""TIES behaviours the mutation run found unpinned (scripts/mutation.sh on adamerge/merging/ties.py).

Each test says which surviving mutant it kills: a single task vector (code that reads ``taus[1]`` for
``taus[0]``), the documented ``keep = 0.2`` defaults, the at-least-one-entry rule of the trim, error
messages that name the problem, non-float keys passed through untouched, and half precision returned.
"""

from __future__ import annotations

import pytest
import torch

from adamerge.merging.task_vectors import MergeError
from adamerge.merging.ties import ties_elect_sign, ties_merge, ties_preprocess, ties_threshold, ties_trim

# ten entries with distinct magnitudes: keep 0.2 keeps exactly the two largest, |−0.9| and |0.8|
TAU = {"w": torch.tensor([[0.1, -0.9, 0.3, 0.05, -0.2], [0.8, -0.4, 0.0, 0.6, -0.7]])}
TOP2 = torch.tensor([[0.0, -0.9, 0.0, 0.0, 0.0], [0.8, 0.0, 0.0, 0.0, 0.0]])


def test_a_single_task_vector_is_merged_as_its_trimmed_self():
    # K = 1: every kept entry agrees with its own elected sign, so TIES "sum" is θ_0 + λ·trim(τ)
    pre = {"w": torch.full((2, 5), 2.0)}
    torch.testing.assert_close(ties_merge(pre, [TAU], keep=0.2, merge="sum", lam=0.3)["w"], 2.0 + 0.3 * TOP2)
    torch.testing.assert_close(ties_preprocess([TAU], keep=0.2)[0]["w"], TOP2)
    gamma = ties_elect_sign([{"w": TOP2}])["w"]
    assert gamma.shape == (2, 5)
    # the kept entries keep their sign; the zero-sum rest take the majority sign(Σ γ) over the elected
    # signs, −1 + 1 = 0 → +1 (a majority by mass, 0.8 − 0.9 < 0, would give −1)
    want = torch.ones(2, 5)
    want[0, 1] = -1.0
    torch.testing.assert_close(gamma, want)


def test_the_documented_keep_default_is_0_2():
    assert ties_threshold(TAU) == ties_threshold(TAU, keep=0.2) == pytest.approx(0.8)
    torch.testing.assert_close(ties_trim(TAU)["w"], TOP2)
    torch.testing.assert_close(ties_preprocess([TAU])[0]["w"], TOP2)


def test_trim_keeps_at_least_one_entry_and_only_one_when_d_times_keep_is_below_one():
    # d = 4, keep = 0.2: ⌊0.8⌋ = 0 entries by the formula, raised to 1 (not 2)
    got = ties_trim({"w": torch.tensor([0.1, -0.5, 0.3, 0.2])}, keep=0.2)["w"]
    torch.testing.assert_close(got, torch.tensor([0.0, -0.5, 0.0, 0.0]))


def test_trim_errors_name_the_problem():
    with pytest.raises(MergeError, match="^task vector has no floating-point entries to trim$"):
        ties_threshold({"ids": torch.arange(3)})
    with pytest.raises(MergeError, match="^task vector: key 'w' contains NaN values$"):
        ties_trim({"w": torch.tensor([1.0, float("nan")])})


def test_non_float_keys_pass_through_trim_and_preprocess_untouched():
    ids = torch.tensor([1, 2, 3])  # integers below the threshold 8 of 10·τ: a trim would zero them
    assert ties_threshold({"w": 10 * TAU["w"]}) == pytest.approx(8.0)
    assert torch.equal(ties_trim({"w": 10 * TAU["w"], "ids": ids})["ids"], ids)
    out = ties_preprocess([{**TAU, "ids": ids}, {**TAU, "ids": ids}], keep=0.2)
    assert all(torch.equal(o["ids"], ids) for o in out)
    torch.testing.assert_close(out[0]["w"], TOP2)


def test_preprocess_returns_each_task_vectors_own_dtype():
    half = {"w": TAU["w"].half()}
    out = ties_preprocess([half, {"w": TAU["w"]}], keep=0.2)
    assert out[0]["w"].dtype == torch.float16 and out[1]["w"].dtype == torch.float32
    torch.testing.assert_close(out[0]["w"].float(), TOP2.half().float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ties_on_cuda_keeps_every_buffer_there_and_matches_the_cpu():
    # the working buffers (|τ|, γ, masks) must be made on the inputs' device: one left on the CPU fails here
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(6, 10, generator=g)}
    taus = [{"w": torch.randn(6, 10, generator=g)} for _ in range(3)]
    cuda = [{k: v.cuda() for k, v in t.items()} for t in taus]
    got = ties_merge({k: v.cuda() for k, v in pre.items()}, cuda, keep=0.3)
    assert got["w"].is_cuda
    torch.testing.assert_close(got["w"].cpu(), ties_merge(pre, taus, keep=0.3)["w"])
    assert all(o["w"].is_cuda for o in ties_preprocess(cuda, keep=0.3))
    assert ties_elect_sign(cuda)["w"].is_cuda
