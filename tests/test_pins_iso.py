"""Pins for Iso-C / Iso-CTS (adamerge/merging/iso.py) beyond tests/test_merging_iso.py: one task, a 1×1
matrix, where and in which dtype the SVDs run, and Iso-CTS's default split of the directions."""

import importlib

import pytest
import torch

from adamerge.merging.iso import iso_c, iso_cts_sizes

iso_module = importlib.import_module("adamerge.merging.iso")


def test_iso_cts_sizes_default_fraction_on_a_vit_b_width():
    # r = 768, T = 8 with the documented f = 0.8: ⌊0.8·768⌋ = 614, s = round(154 / 8) = 19, k = 768 − 152.
    # Another f gives another split (f = 0.9: s = 10, k = 688), so the default is what is pinned.
    assert iso_cts_sizes(768, 8) == (616, 19)
    assert iso_cts_sizes(768, 8, 0.9) == (688, 10)


def test_iso_c_of_one_task_vector_by_hand():
    # One task: every index into a second task vector fails, and Iso-C of one τ is mean(σ)·U Vᵀ of τ itself.
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    tau = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    out = iso_c(pre, [tau], lam=0.7)
    u, s, vh = torch.linalg.svd(tau["w"], full_matrices=False)
    torch.testing.assert_close(out["w"], pre["w"] + 0.7 * s.mean() * (u @ vh))
    torch.testing.assert_close(out["b"], pre["b"] + 0.7 * tau["b"])


def test_a_one_by_one_matrix_is_merged_isotropically():
    # A [1, 1] matrix is a matrix: its flat-spectrum sum is the sum itself (σ = |Δ|, U Vᵀ = sign Δ), not the
    # mean that non-matrix keys get, so the two rules differ by the task count.
    pre = {"w": torch.tensor([[1.0]])}
    taus = [{"w": torch.tensor([[2.0]])}, {"w": torch.tensor([[4.0]])}]
    torch.testing.assert_close(iso_c(pre, taus, lam=0.5)["w"], torch.tensor([[4.0]]))


def test_svds_run_in_float32_on_the_device_asked(monkeypatch):
    # The matrices reach the per-weight rule in float32 on `device` (meta stands in for a GPU: it needs no
    # values), whatever the inputs' dtype; the rule's answer comes back to the inputs' device.
    seen = []

    def record(ts):
        seen.append([(t.device.type, t.dtype) for t in ts])
        return torch.zeros(ts[0].shape)

    monkeypatch.setattr(iso_module, "iso_c_weight", record)
    pre = {"w": torch.ones(3, 2, dtype=torch.bfloat16)}
    taus = [{"w": torch.ones(3, 2, dtype=torch.bfloat16)} for _ in range(2)]
    out = iso_c(pre, taus, device="meta")
    assert seen == [[("meta", torch.float32)] * 2]
    assert out["w"].device.type == "cpu"
    seen.clear()
    iso_c(pre, taus)
    assert seen == [[("cpu", torch.float32)] * 2]


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_an_empty_matrix_merges_to_an_empty_tensor(shape):
    pre = {"w": torch.ones(shape), "b": torch.ones(2)}
    taus = [{"w": torch.ones(shape), "b": torch.full((2,), float(i))} for i in range(2)]
    out = iso_c(pre, taus, lam=1.0)
    assert out["w"].shape == shape and torch.equal(out["b"], torch.full((2,), 1.5))
