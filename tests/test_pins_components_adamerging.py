"""Pins for AdaMerging's component (adamerge/components/adamerging.py): the argument checks of
``from_task_vectors`` and ``check_coefficient_args`` (messages matched whole, so a wrong option name or a
dropped choice list shows), the tensor source behind ``from_task_vectors``, and ``train()``'s default mode.

The data are chosen so that the near misses disagree: ``float16`` is a dtype ``dtype_named`` knows but
AdaMerging refuses (a check without the two-item choice list would accept it); two unknown tasks, so a
message naming the second one differs; a model put in eval mode first, so ``train()`` with a default of
``False`` would leave it there; a ``tasks`` keyword, which ``from_task_vectors`` already fills from
``task_names`` (dropping that argument would let it select a subset silently); init_lam at both ends of the
clamp range (accepted: a strict bound refuses one of them) and at 1.5 (refused only with the clamp, also through
the model's constructor); an encoder with only an integer buffer (nothing to merge); a θ_0 without the bias or with a NaN in it; a pool
of three tasks merged on two of them, in another order (merging all of them would give three rows). The fused merge runs
layer-wise on exactly two tensors with two different λ columns (a fast path taken for two columns would use
the first for both), and with one output left out of the loss while its direction holds an infinity: that
output sends no gradient, so its λ column is exactly 0 (a zero gradient materialised and multiplied would
make it 0·∞ = NaN)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adamerge.components.adamerging import (
    AdaMergingModel,
    FusedMerge,
    _TensorSource,
    check_coefficient_args,
    stack_task_vectors,
)
from adamerge.merging.task_vectors import MergeError
from adamerge.models.pool import ModelPool


class Tiny(nn.Module):
    """One linear layer (4 → 3): two float tensors, so a merge is checked by hand in one line."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


def _inputs():
    enc = Tiny()
    theta0 = {k: v.clone() for k, v in enc.state_dict().items()}
    taus = [{"lin.weight": torch.full((3, 4), float(k + 1)), "lin.bias": torch.full((3,), -float(k + 1))}
            for k in range(2)]
    return enc, theta0, taus


def test_from_task_vectors_refuses_bad_arguments_by_name():
    enc, theta0, taus = _inputs()
    with pytest.raises(MergeError, match=r"^no task vectors given: AdaMerging needs at least one$"):
        AdaMergingModel.from_task_vectors(enc, theta0, [])
    with pytest.raises(ValueError, match=r"^1 task names for 2 task vectors$"):
        AdaMergingModel.from_task_vectors(enc, theta0, taus, task_names=["a"])
    # float16 is a dtype dtype_named knows; AdaMerging stores its directions in float32 or bfloat16 only
    with pytest.raises(ValueError, match=r"^tv_dtype must be one of float32, bfloat16, got 'float16'$"):
        AdaMergingModel.from_task_vectors(enc, theta0, taus, tv_dtype="float16")
    with pytest.raises(ValueError, match=r"^tv_dtype must be one of float32, bfloat16, got 'float16'$"):
        check_coefficient_args("task", 0.3, True, "float16")
    assert check_coefficient_args("task", 0.3, True, "bfloat16") == torch.bfloat16
    # the tasks are the task names: a `tasks` keyword is refused, not used to merge a subset
    with pytest.raises(TypeError, match=r"multiple values for argument 'tasks'"):
        AdaMergingModel.from_task_vectors(enc, theta0, taus, task_names=["a", "b"], tasks=["b"])


def test_init_lam_is_checked_against_the_clamp_range_with_its_ends_included():
    with pytest.raises(ValueError, match=r"^init_lam must be finite, got inf$"):
        check_coefficient_args("layer", float("inf"), False, "float32")
    for lam in (0.0, 1.0):
        assert check_coefficient_args("layer", lam, True, "float32") == torch.float32
    assert check_coefficient_args("layer", 1.5, False, "float32") == torch.float32
    message = (r"^init_lam 1.5 is outside the clamp range \[0, 1\]: the clamp would zero every gradient and λ "
               r"would never move; use an init_lam in \[0, 1\] or clamp: false$")
    with pytest.raises(ValueError, match=message):
        check_coefficient_args("layer", 1.5, True, "float32")
    enc, theta0, taus = _inputs()
    with pytest.raises(ValueError, match=message):
        AdaMergingModel.from_task_vectors(enc, theta0, taus, init_lam=1.5, clamp=True)
    model = AdaMergingModel.from_task_vectors(enc, theta0, taus, init_lam=1.5, clamp=False)
    assert torch.equal(model.lambdas, torch.full((2, 2), 1.5)) and model.clamp is False


class IntOnly(nn.Module):
    """No floating-point tensor at all: one integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ids", torch.tensor([1, 2]))

    def forward(self, x):
        return x


def test_a_pretrained_state_that_does_not_fit_the_encoder_is_refused_by_name():
    enc, theta0, taus = _inputs()
    with pytest.raises(MergeError, match=r"^pretrained state dict is missing key 'lin.bias' \(1 missing in all\)$"):
        AdaMergingModel.from_task_vectors(enc, {"lin.weight": theta0["lin.weight"]}, taus)
    bad = dict(theta0, **{"lin.bias": torch.tensor([0.0, float("nan"), 1.0])})
    with pytest.raises(MergeError, match=r"^pretrained state dict: key 'lin.bias' contains NaN values$"):
        AdaMergingModel.from_task_vectors(enc, bad, taus)


def test_an_encoder_without_float_tensors_is_refused():
    enc = IntOnly()
    with pytest.raises(MergeError, match=r"^the encoder has no floating-point tensors to merge$"):
        AdaMergingModel.from_task_vectors(enc, dict(enc.state_dict()), [{}])


def test_from_task_vectors_merges_every_named_task_in_order():
    enc, theta0, taus = _inputs()
    model = AdaMergingModel.from_task_vectors(enc, theta0, taus, task_names=["a", "b"], granularity="task",
                                              clamp=False)
    assert model.task_names == ["a", "b"] and model.num_tasks == 2
    with torch.no_grad():
        model.lambdas.copy_(torch.tensor([[0.5], [2.0]]))
    merged = model.merged_state_dict()
    torch.testing.assert_close(merged["lin.weight"], theta0["lin.weight"] + 0.5 * 1 + 2.0 * 2)
    torch.testing.assert_close(merged["lin.bias"], theta0["lin.bias"] - 0.5 * 1 - 2.0 * 2)
    default = AdaMergingModel.from_task_vectors(enc, theta0, taus)
    assert default.task_names == ["task0", "task1"]


def test_layer_wise_coefficients_on_two_tensors_each_scale_their_own_tensor():
    enc, theta0, taus = _inputs()
    model = AdaMergingModel.from_task_vectors(enc, theta0, taus, clamp=False)  # layer-wise: λ is [2, 2]
    with torch.no_grad():
        model.lambdas.copy_(torch.tensor([[0.5, 3.0], [2.0, -1.0]]))  # rows: tasks; columns: weight, bias
    merged = model.merged_state_dict()
    torch.testing.assert_close(merged["lin.weight"], theta0["lin.weight"] + 0.5 * 1 + 2.0 * 2)
    torch.testing.assert_close(merged["lin.bias"], theta0["lin.bias"] - 3.0 * 1 + 1.0 * 2)


def test_stack_task_vectors_needs_at_least_one():
    reference = {"w": torch.zeros(2, 2), "b": torch.zeros(3)}
    with pytest.raises(MergeError, match=r"^no task vectors given: AdaMerging needs at least one$"):
        stack_task_vectors([], reference)
    got = stack_task_vectors([{"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([5.0, 6.0, 7.0])}],
                             reference, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.arange(1.0, 8.0)[None].bfloat16())


def test_an_output_outside_the_loss_adds_nothing_to_the_coefficient_gradient():
    lam = torch.tensor([[0.5, 2.0], [1.0, 3.0]], requires_grad=True)
    tv = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [0.5, 0.0, 1.0, 1.0]])  # two tensors of 2 entries each
    first, second = FusedMerge.apply(lam, tv, [2, 2], [(2,), (2,)], torch.zeros(2), torch.zeros(2))
    torch.testing.assert_close(first, torch.tensor([0.5 * 1 + 1.0 * 0.5, 0.5 * 2 + 1.0 * 0.0]))
    assert torch.equal(second, torch.tensor([2.0 * 3 + 3.0 * 1, float("inf")]))
    first.sum().backward()  # only the first tensor is used
    assert torch.equal(lam.grad, torch.tensor([[3.0, 0.0], [0.5, 0.0]]))


def test_a_subset_of_the_pools_tasks_is_merged_in_the_order_asked():
    enc, theta0, taus = _inputs()
    third = {"lin.weight": torch.full((3, 4), 10.0), "lin.bias": torch.full((3,), -10.0)}
    experts = {name: {k: theta0[k] + tau[k] for k in theta0} for name, tau in zip("abc", [*taus, third])}
    pool = ModelPool(enc, experts, {t: torch.zeros(2, 3) for t in "abc"})
    model = AdaMergingModel(pool, tasks=["c", "a"], granularity="task", clamp=False)
    assert model.task_names == ["c", "a"] and model.lambdas.shape == (2, 1)
    torch.testing.assert_close(model.task_vectors, torch.stack([
        torch.cat([third["lin.weight"].reshape(-1), third["lin.bias"]]),
        torch.cat([taus[0]["lin.weight"].reshape(-1), taus[0]["lin.bias"]])]))
    with torch.no_grad():
        model.lambdas.copy_(torch.tensor([[0.5], [2.0]]))
    torch.testing.assert_close(model.merged_state_dict()["lin.weight"], theta0["lin.weight"] + 0.5 * 10 + 2.0 * 1)


def test_the_tensor_source_checks_and_yields_tasks_like_a_pool():
    enc, theta0, taus = _inputs()
    source = _TensorSource(enc, theta0, taus, ["a", "b"])
    with pytest.raises(ValueError, match=r"^task 'x' has no task vector \(tasks: \['a', 'b'\]\)$"):
        source.check_tasks(["a", "x", "y"])  # two unknown: the first is named
    assert source.check_tasks(("b", "a")) == ["b", "a"]
    every = list(source.task_vectors())  # no tasks: all of them, in order
    assert [t for t, _ in every] == ["a", "b"]
    assert every[0][1] is taus[0] and every[1][1] is taus[1]
    only = list(source.task_vectors(["b"]))
    assert [t for t, _ in only] == ["b"] and only[0][1] is taus[1]
    with pytest.raises(ValueError, match=r"^task 'z' has no task vector"):
        list(source.task_vectors(["z"]))
    assert source.pretrained_state() is theta0


def test_train_without_an_argument_turns_training_on_but_keeps_the_encoder_in_eval():
    enc, theta0, taus = _inputs()
    model = AdaMergingModel.from_task_vectors(enc, theta0, taus)
    model.eval()
    assert not model.training
    assert model.train() is model
    assert model.training and not model.encoder.training
    model.train(False)
    assert not model.training and not model.encoder.training
