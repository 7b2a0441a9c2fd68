"""Pins for TSV-M's per-weight pieces (adamerge/merging/tsv.py): the cases where nothing is kept (no task,
rank 0, all-zero task vectors), a single kept component, and the float32 result whatever torch's default."""

import contextlib

import pytest
import torch

from adamerge.merging.tsv import orthogonalised_stack, task_components, tsv_merge_weight, tsv_weight_parts


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_an_empty_stack_is_none():
    assert orthogonalised_stack([]) is None
    # every task vector all zero: each task keeps no component, so there is nothing to orthogonalise
    parts = [task_components(torch.zeros(4, 3), 2) for _ in range(2)]
    assert [p[1].numel() for p in parts] == [0, 0]
    assert orthogonalised_stack(parts) is None


def test_one_kept_component_is_merged():
    # A single rank-1 task vector keeps exactly one triplet; TSV-M of one τ of rank 1 is τ itself.
    tau = torch.outer(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(tsv_merge_weight([tau]), tau)
    (part,) = tsv_weight_parts([tau])
    torch.testing.assert_close(part, tau)


@pytest.mark.parametrize("taus", [
    [torch.zeros(3, 2)],                                  # one task, nothing kept
    [torch.randn(2, 3) for _ in range(3)],                # K = 3 > min(m, n) = 2: rank ⌊2/3⌋ = 0
], ids=["zero", "rank0"])
def test_nothing_kept_gives_float32_zeros_even_under_a_float64_default(taus):
    with default_dtype(torch.float64):
        merged = tsv_merge_weight(taus)
        parts = tsv_weight_parts(taus)
    shape = taus[0].shape
    assert merged.dtype == torch.float32 and torch.equal(merged, torch.zeros(shape))
    assert len(parts) == len(taus)
    assert all(p.dtype == torch.float32 and torch.equal(p, torch.zeros(shape)) for p in parts)


def test_rank_zero_zeros_are_made_on_the_task_vectors_device():
    """Rank 0 is decided by the shapes alone (⌊min(2, 5) / 3⌋ = 0), so task vectors on the ``meta`` device reach
    the zeros without any arithmetic: zeros made without the inputs' device would be on the CPU. (The device of
    the SVD path needs a GPU: tests/test_gpu.py.)"""
    taus = [torch.empty(2, 5, device="meta") for _ in range(3)]
    merged = tsv_merge_weight(taus)
    assert (merged.device.type, merged.shape, merged.dtype) == ("meta", (2, 5), torch.float32)
    parts = tsv_weight_parts(taus)
    assert [(p.device.type, p.shape) for p in parts] == [("meta", (2, 5))] * 3
