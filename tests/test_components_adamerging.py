"""AdaMergingModel and the entropy loss against independent, written-out computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pool
from torch import nn
from torch.func import functional_call

from adamerge.components.adamerging import AdaMergingModel
from adamerge.components.losses import entropy
from adamerge.merging.task_vectors import MergeError
from adamerge.models.pool import ModelPool


def soft_pool(num_tasks: int = 3, logit_scale: float = 10.0) -> ModelPool:
    """The tiny pool with a smaller logit scale, so the entropy is far from saturated."""
    p = make_tiny_pool(num_tasks)
    return ModelPool(p.encoder, {t: p.expert_state(t) for t in p.tasks}, p.heads, logit_scale, name="tiny")


def explicit_merge(pool: ModelPool, lam: torch.Tensor, clamp: bool) -> dict[str, torch.Tensor]:
    """θ_0 + Σ_k λ[k, l] τ_k, one task at a time, with plain tensor ops (lam: [K, L])."""
    theta0 = pool.pretrained_state()
    taus = [pool.task_vector(t) for t in pool.tasks]
    lam = lam.clamp(0, 1) if clamp else lam
    out = {}
    for l, key in enumerate(k for k, v in theta0.items() if v.is_floating_point()):
        acc = theta0[key].clone()
        for k, tau in enumerate(taus):
            acc = acc + lam[k, l] * tau[key]
        out[key] = acc
    return out


def test_entropy_matches_definition_and_is_stable():
    logits = torch.randn(5, 7)
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy(logits), -(p * p.log()).sum(-1))
    assert entropy(torch.zeros(2, 4)).allclose(torch.full((2,), math.log(4)))
    big = torch.tensor([[1e4, 0.0, -1e4]])  # softmax underflows to exact zeros
    assert torch.isfinite(entropy(big)).all() and entropy(big).abs().item() < 1e-6
    with pytest.raises(ValueError, match="class dimension"):
        entropy(torch.zeros(3, 0))


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_merged_weights_equal_explicit_sum(granularity):
    pool = make_tiny_pool()
    model = AdaMergingModel(pool, granularity=granularity, clamp=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # values outside [0, 1] exercise the clamp
        model.lambdas.copy_(torch.rand(model.lambdas.shape, generator=g) * 1.6 - 0.3)
    lam = model.lambdas.detach().expand(3, len(model.layer_names))
    expected = explicit_merge(pool, lam, clamp=True)
    merged = model.merged_state_dict()
    assert set(merged) == set(pool.pretrained_state())
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.coefficients(), lam.clamp(0, 1))


def test_keep_merges_ties_preprocessed_vectors():
    from adamerge.merging.ties import ties_preprocess

    pool = make_tiny_pool()
    model = AdaMergingModel(pool, granularity="task", directions={"method": "ties", "keep": 0.2})
    with torch.no_grad():
        model.lambdas.copy_(torch.tensor([[0.2], [0.5], [0.9]]))
    theta0 = pool.pretrained_state()
    taus = ties_preprocess([pool.task_vector(t) for t in pool.tasks], keep=0.2)
    merged = model.merged_state_dict()
    for key in model.layer_names:
        expected = theta0[key] + 0.2 * taus[0][key] + 0.5 * taus[1][key] + 0.9 * taus[2][key]
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
    plain = AdaMergingModel(pool, granularity="task")
    assert (model.task_vectors == 0).float().mean() > 0.75  # trimmed to ~20 %, then sign-elected
    assert (plain.task_vectors == 0).float().mean() < 0.01


def test_unclamped_and_init():
    pool = make_tiny_pool()
    model = AdaMergingModel(pool, granularity="task", clamp=False, init_lam=0.3)
    assert model.lambdas.shape == (3, 1) and torch.all(model.lambdas == 0.3)
    with torch.no_grad():
        model.lambdas.copy_(torch.tensor([[1.5], [-0.5], [0.2]]))
    expected = explicit_merge(pool, model.lambdas.detach().expand(3, len(model.layer_names)), clamp=False)
    for key, value in expected.items():
        torch.testing.assert_close(model.merged_state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_forward_equals_encoder_with_merged_weights():
    pool = make_tiny_pool()
    model = AdaMergingModel(pool, granularity="layer")
    images = torch.randn(4, 3, 16, 16)
    reference = pool.build_encoder(model.merged_state_dict())
    torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_gradient_matches_independent_autograd(granularity):
    pool = soft_pool()
    model = AdaMergingModel(pool, granularity=granularity, clamp=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.lambdas.copy_(0.1 + 0.8 * torch.rand(model.lambdas.shape, generator=g))
    batches = {t: torch.randn(6, 3, 16, 16, generator=g) for t in pool.tasks}

    def loss_of(features_fn):
        return sum(
            entropy(pool.logit_scale * F.normalize(features_fn(x), dim=-1) @ pool.heads[t].t()).mean()
            for t, x in batches.items()
        )

    loss_of(model).backward()
    # Independent: a leaf λ, an explicitly merged state dict, a fresh encoder copy.
    lam = model.lambdas.detach().clone().requires_grad_(True)
    lam_full = lam.expand(3, len(model.layer_names))
    encoder = pool.build_encoder()
    loss = loss_of(lambda x: functional_call(encoder, explicit_merge(pool, lam_full, clamp=True), (x,)))
    (grad,) = torch.autograd.grad(loss, lam)
    assert grad.abs().max() > 1e-4  # a gradient that could be wrong
    torch.testing.assert_close(model.lambdas.grad, grad, rtol=1e-3, atol=1e-6)


def test_task_gradient_matches_finite_differences():
    pool = soft_pool()
    model = AdaMergingModel(pool, granularity="task", clamp=False)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        return sum(
            entropy(pool.logit_scale * F.normalize(model(images), dim=-1) @ pool.heads[t].t()).mean()
            for t in pool.tasks
        )

    loss().backward()
    eps = 1e-2
    for k in range(3):
        with torch.no_grad():
            model.lambdas[k, 0] += eps
            up = loss().item()
            model.lambdas[k, 0] -= 2 * eps
            down = loss().item()
            model.lambdas[k, 0] += eps
        fd = (up - down) / (2 * eps)
        assert model.lambdas.grad[k, 0].item() == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_only_coefficients_learn_and_are_saved():
    pool = make_tiny_pool()
    model = AdaMergingModel(pool, granularity="layer")
    assert [n for n, p in model.named_parameters()] == ["lambdas"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lambdas"]
    assert list(model.state_dict()) == ["lambdas"]
    assert model.lambdas.shape == (3, len(model.layer_names))
    assert len(model.layer_names) == sum(v.is_floating_point() for v in pool.pretrained_state().values())
    assert model.task_vectors.shape == (3, sum(v.numel() for v in pool.pretrained_state().values()))
    model.train()
    assert not model.encoder.training  # the frozen encoder stays in eval mode


def test_load_state_dict_restores_coefficients():
    pool = make_tiny_pool()
    a = AdaMergingModel(pool, granularity="layer")
    with torch.no_grad():
        a.lambdas.uniform_()
    b = AdaMergingModel(pool, granularity="layer")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.merged_state_dict(), a.merged_state_dict())


def test_caller_encoder_and_pool_untouched():
    pool = make_tiny_pool()
    before = {k: v.clone() for k, v in pool.encoder.state_dict().items()}
    n_params = len(list(pool.encoder.parameters()))
    model = AdaMergingModel(pool)
    with torch.no_grad():
        model.lambdas.fill_(0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert len(list(pool.encoder.parameters())) == n_params
    for k, v in pool.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bfloat16_task_vectors_close_to_float32():
    pool = make_tiny_pool()
    f32 = AdaMergingModel(pool, tv_dtype="float32")
    bf16 = AdaMergingModel(pool, tv_dtype="bfloat16")
    assert bf16.task_vectors.dtype == torch.bfloat16
    assert bf16.task_vectors.element_size() * 2 == f32.task_vectors.element_size()
    a, b = f32.merged_state_dict(), bf16.merged_state_dict()
    for key in a:
        assert b[key].dtype == a[key].dtype
        tau_scale = (a[key] - pool.pretrained_state()[key]).abs().max().item()
        assert (a[key] - b[key]).abs().max().item() <= 0.02 * tau_scale + 1e-7, key


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_bfloat16_gradient_close_to_float32(granularity):
    pool = soft_pool()
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    grads = []
    for dtype in ("float32", "bfloat16"):
        model = AdaMergingModel(pool, granularity=granularity, tv_dtype=dtype)
        feats = F.normalize(model(images), dim=-1)
        sum(entropy(pool.logit_scale * feats @ pool.heads[t].t()).mean() for t in pool.tasks).backward()
        grads.append(model.lambdas.grad)
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=0.02 * grads[0].abs().max().item())


class WithIntBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("offset", torch.tensor([1, 2, 3]))

    def forward(self, x):
        return self.lin(x) + self.offset


def test_generic_constructor_passes_non_float_buffers_through():
    enc = WithIntBuffer()
    theta0 = {k: v.clone() for k, v in enc.state_dict().items()}
    taus = [
        {"lin.weight": torch.ones(3, 4), "lin.bias": torch.zeros(3)},
        {"lin.weight": torch.zeros(3, 4), "lin.bias": torch.ones(3)},
    ]
    model = AdaMergingModel.from_task_vectors(enc, theta0, taus, granularity="task", init_lam=0.5, task_names=["a", "b"])
    assert model.layer_names == ["lin.weight", "lin.bias"]
    merged = model.merged_state_dict()
    assert torch.equal(merged["offset"], theta0["offset"])
    torch.testing.assert_close(merged["lin.weight"], theta0["lin.weight"] + 0.5)
    x = torch.randn(2, 4)
    expected = x @ merged["lin.weight"].t() + merged["lin.bias"] + theta0["offset"]
    torch.testing.assert_close(model(x), expected)


def test_bad_inputs_are_refused():
    pool = make_tiny_pool()
    theta0 = pool.pretrained_state()
    tau = pool.task_vector("task0")
    with pytest.raises(ValueError, match="granularity"):
        AdaMergingModel.from_task_vectors(pool.encoder, theta0, [tau], granularity="block")
    with pytest.raises(ValueError, match="tv_dtype"):
        AdaMergingModel.from_task_vectors(pool.encoder, theta0, [tau], tv_dtype="float16x")
    with pytest.raises(MergeError, match="no task vectors"):
        AdaMergingModel.from_task_vectors(pool.encoder, theta0, [])
    missing = dict(tau)
    key = next(iter(missing))
    del missing[key]
    with pytest.raises(MergeError, match="task vector 1 is missing key"):
        AdaMergingModel.from_task_vectors(pool.encoder, theta0, [tau, missing])
    bad = {k: v.clone() for k, v in tau.items()}
    bad[key].view(-1)[0] = float("nan")
    with pytest.raises(MergeError, match=f"task vector 0: key '{key}' contains NaN"):
        AdaMergingModel.from_task_vectors(pool.encoder, theta0, [bad])
    with pytest.raises(ValueError, match="has no expert"):
        AdaMergingModel(pool, tasks=["task0", "nope"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_runs_on_the_gpu_without_host_copies():
    pool = soft_pool()
    model = AdaMergingModel(pool, granularity="layer").cuda()
    assert all(b.is_cuda for b in model.buffers()) and model.lambdas.is_cuda
    images = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        feats = model(images)
    feats.float().sum().backward()
    assert model.lambdas.grad.is_cuda and torch.isfinite(model.lambdas.grad).all()
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        merged = model.merged_parameters()  # float32 arithmetic even under autocast
    expected = AdaMergingModel(pool, granularity="layer").merged_state_dict()
    for key, value in merged.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.cpu(), expected[key], rtol=1e-5, atol=1e-6)


def test_an_explicit_theta0_is_used_not_the_encoders_own_weights():
    # θ0 given to from_task_vectors differs from the encoder's weights: the merge must start from it
    enc = WithIntBuffer()
    theta0 = {k: (v + 1.0) if v.is_floating_point() else v.clone() for k, v in enc.state_dict().items()}
    taus = [{"lin.weight": torch.ones(3, 4), "lin.bias": torch.zeros(3)}]
    model = AdaMergingModel.from_task_vectors(enc, theta0, taus, granularity="task", init_lam=0.25)
    merged = model.merged_state_dict()
    torch.testing.assert_close(merged["lin.weight"], theta0["lin.weight"] + 0.25)
    torch.testing.assert_close(merged["lin.bias"], theta0["lin.bias"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_entropy_of_half_precision_logits_is_computed_in_float32(dtype):
    # logits whose softmax in half precision loses the small probabilities: computed in float32 the
    # entropy matches the float32 value of the same (rounded) logits to float32 accuracy
    logits = torch.tensor([[12.0, 0.0, -3.0, 5.5], [0.1, 0.2, 0.3, 0.4]]).to(dtype)
    got = entropy(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, entropy(logits.float()), rtol=0, atol=0)
    p = logits.float().softmax(-1)
    torch.testing.assert_close(got, -(p * p.log()).sum(-1), rtol=1e-6, atol=1e-6)
