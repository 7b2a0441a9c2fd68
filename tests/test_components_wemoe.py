"""WEMoE / E-WEMoE component: equivalences against independent computations, counts, pruning, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VISION, make_tiny_clip, make_tiny_pool
from torch import nn

from adamerge.components.wemoe import (
    WEMoEError,
    WEMoEModel,
    build_router,
    ensemble_linear,
    prune_top_magnitude,
)
from adamerge.models.pool import ModelPool

LAM = 0.3
MLP_NAMES = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


def images(n=5, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def ta_state(pool, lam=LAM):
    """θ0 + λ Σ_k (θ_k − θ0), written out from the experts (independent of upscale)."""
    theta0 = pool.pretrained_state()
    out = {k: v.clone() for k, v in theta0.items()}
    for t in pool.tasks:
        expert = pool.expert_state(t)
        for k, v in theta0.items():
            if v.is_floating_point():
                out[k] += lam * (expert[k] - v)
    return out


def randomise_routers(model, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))


class LoopMLP(nn.Module):
    """Reference MLP: explicit merged weights W0 + Σ_k r_k τ_k built in a Python loop, per sample."""

    def __init__(self, w0, taus, router, middle, reduce):
        super().__init__()
        self.w0, self.taus, self.middle, self.reduce = w0, taus, middle, reduce
        object.__setattr__(self, "router", router)

    def forward(self, x):
        r = self.router(x).mean(dim=1)
        if self.reduce:
            r = r.mean(dim=0, keepdim=True).expand(x.shape[0], -1)
        outs = []
        for b in range(x.shape[0]):
            w = {n: self.w0[n].clone() for n in MLP_NAMES}
            for k, tau in enumerate(self.taus):
                for n in MLP_NAMES:
                    w[n] = w[n] + r[b, k] * tau[n]
            h = self.middle(F.linear(x[b], w["c_fc.weight"], w["c_fc.bias"]))
            outs.append(F.linear(h, w["c_proj.weight"], w["c_proj.bias"]))
        return torch.stack(outs)


def reference_encoder(pool, model, reduce):
    theta0 = pool.pretrained_state()
    taus = [pool.task_vector(t) for t in pool.tasks]
    ref = pool.build_encoder(ta_state(pool))
    for i, block in enumerate(ref.transformer.resblocks):
        p = f"transformer.resblocks.{i}.mlp."
        router = model.routers[0] if len(model.routers) == 1 else model.routers[i]
        middle = nn.Sequential(*list(block.mlp.children())[1:-1])
        block.mlp = LoopMLP(
            {n: theta0[p + n] for n in MLP_NAMES},
            [{n: t[p + n] for n in MLP_NAMES} for t in taus],
            router,
            middle,
            reduce,
        )
    return ref


@pytest.fixture
def pool():
    return make_tiny_pool(num_tasks=3, scale=0.2)


def test_init_with_constant_router_equals_task_arithmetic(pool):
    model = WEMoEModel(pool, init_lam=LAM)  # base: task arithmetic, λ = 0.3 = LAM
    with torch.no_grad():
        for router in model.routers:
            for m in router:
                if isinstance(m, nn.Linear):
                    m.weight.zero_()
    expected = pool.build_encoder(ta_state(pool))(images())
    torch.testing.assert_close(model(images()), expected, atol=1e-5, rtol=1e-5)
    # the paper's init (weights N(0, 0.01²)) starts next to task arithmetic, not on it
    near = WEMoEModel(pool)(images())
    assert 0 < (near - expected).abs().max() < 0.05


def test_router_init():
    r = build_router(64, 5, hidden_layers=1, init_lam=0.25)
    assert [type(m) for m in r] == [nn.Linear, nn.ReLU, nn.Linear]
    assert torch.equal(r[0].bias, torch.zeros(64)) and torch.equal(r[2].bias, torch.full((5,), 0.25))
    assert abs(r[0].weight.std().item() - 0.01) < 0.002
    assert [type(m) for m in build_router(8, 2, 0)] == [nn.Linear]
    assert [type(m) for m in build_router(8, 2, 2)] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


@pytest.mark.parametrize("impl", ["weights", "experts"])
def test_per_sample_matches_python_loop(pool, impl):
    model = WEMoEModel(pool)
    randomise_routers(model)
    model.set_impl(impl)
    x = images(5)
    got = model(x)
    r0 = model.mlps[0].last_weights
    assert r0.shape == (5, 3) and (r0 - r0.mean(0)).abs().max() > 1e-2  # samples really differ
    ref = reference_encoder(pool, model, reduce=False)
    expected = torch.cat([ref(x[b : b + 1]) for b in range(5)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_chunked_per_sample_merging_equals_whole_batch(pool):
    model = WEMoEModel(pool)
    randomise_routers(model)
    x = images(5)
    whole = model(x)
    model.set_chunk_size(2)
    assert model.mlps[0].chunk_size == 2
    torch.testing.assert_close(model(x), whole, atol=1e-6, rtol=1e-5)
    assert model.mlps[0].last_weights.shape == (5, 3)
    with pytest.raises(WEMoEError, match="chunk_size"):
        model.set_chunk_size(0)


def test_batch_reduce_matches_loop_with_averaged_weights(pool):
    model = WEMoEModel(pool)
    randomise_routers(model)
    x = images(4)
    per_sample = model(x)
    model.set_batch_reduce(True)
    got = model(x)
    assert model.mlps[1].last_weights.shape == (3,)
    expected = reference_encoder(pool, model, reduce=True)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - per_sample).abs().max() > 1e-3


def test_only_routers_learn_and_are_saved(pool):
    before = {k: v.clone() for k, v in pool.encoder.state_dict().items()}
    model = WEMoEModel(pool)
    assert all(n.startswith("routers.") for n, _ in model.named_parameters())
    assert set(model.state_dict()) == {
        f"routers.{i}.{j}.{w}" for i in range(2) for j in (0, 2) for w in ("weight", "bias")
    }
    assert not any(b.requires_grad for b in model.buffers())
    model(images(2)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the pool's encoder is untouched (still a plain MLP, same weights)
    assert isinstance(pool.encoder.transformer.resblocks[0].mlp, nn.Sequential)
    for k, v in pool.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_trainable_counts_match_formula(pool):
    d, L, K = TINY_VISION["width"], TINY_VISION["layers"], 3
    per_router = {0: d * K + K, 1: d * d + d + d * K + K, 2: 2 * (d * d + d) + d * K + K}
    for h, n in per_router.items():
        assert WEMoEModel(pool, router_hidden_layers=h).trainable_parameter_count() == L * n
    shared = WEMoEModel(pool, shared_router=True, keep=0.1)
    assert shared.trainable_parameter_count() == per_router[1]
    assert all(m.router is shared.routers[0] for m in shared.mlps)


def test_e_wemoe_keeps_exact_top_fraction(pool):
    t = torch.randn(40, 25, generator=torch.Generator().manual_seed(3))
    p = prune_top_magnitude(t, 0.1)
    k = math.ceil(0.1 * t.numel())
    assert int((p != 0).sum()) == k
    kept = p != 0
    assert torch.equal(p[kept], t[kept])
    assert t[kept].abs().min() > t[~kept].abs().max()
    assert torch.equal(prune_top_magnitude(t, 1.0), t)

    model = WEMoEModel(pool, shared_router=True, keep=0.1)
    tau = pool.task_vector("task1")["transformer.resblocks.1.mlp.c_fc.weight"]
    threshold = tau.abs().flatten().sort(descending=True).values[math.ceil(0.1 * tau.numel()) - 1]
    expected = torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))
    assert torch.equal(model.mlps[1].tau_w_fc[1], expected)
    for m in model.mlps:
        for name in ("tau_w_fc", "tau_b_fc", "tau_w_proj", "tau_b_proj"):
            for tk in getattr(m, name):
                assert int((tk != 0).sum()) == math.ceil(0.1 * tk.numel())


def test_merged_state_is_used_outside_the_mlps(pool):
    theta0 = pool.pretrained_state()
    merged = {k: v + 1.0 if v.is_floating_point() else v for k, v in theta0.items()}
    model = WEMoEModel(pool, base_state=merged)
    assert torch.equal(model.encoder.conv1.weight, merged["conv1.weight"])
    assert torch.equal(
        model.encoder.transformer.resblocks[0].ln_2.bias, merged["transformer.resblocks.0.ln_2.bias"]
    )
    assert torch.equal(model.mlps[0].w0_fc, theta0["transformer.resblocks.0.mlp.c_fc.weight"])
    with pytest.raises(Exception, match="merged_state"):
        WEMoEModel(pool, base_state={k: v for k, v in merged.items() if k != "proj"})


def pool_over(enc, num_tasks=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    experts = {
        f"t{k}": {n: v + 0.2 * torch.randn(v.shape, generator=g) for n, v in enc.state_dict().items()}
        for k in range(num_tasks)
    }
    return ModelPool(enc, experts, {t: F.normalize(torch.randn(3, 16, generator=g), dim=-1) for t in experts})


def test_sequence_first_layout():
    """open_clip < 2.24 ran the blocks on [T, B, d] (no ``batch_first``): routing must average over T."""
    enc = make_tiny_clip().visual
    seq_enc = copy.deepcopy(enc)
    seq_enc.transformer.batch_first = False
    for b in seq_enc.transformer.resblocks:
        b.attn.batch_first = False
    x = images(3)
    torch.testing.assert_close(seq_enc(x), enc(x))  # same network, other layout
    models = [WEMoEModel(pool_over(e)) for e in (enc, seq_enc)]
    randomise_routers(models[0])
    models[1].load_state_dict(models[0].state_dict())
    assert models[0].config["batch_first"] is True and models[1].config["batch_first"] is False
    torch.testing.assert_close(models[1](x), models[0](x), atol=1e-5, rtol=1e-5)


def test_mlp_with_norm_inside_is_kept():
    """open_clip's custom blocks (scale_fc) put a LayerNorm between c_fc and c_proj; it is merged by TA."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    enc = VisionTransformer(
        image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16, scale_fc=True
    ).eval()
    pool = pool_over(enc)
    model = WEMoEModel(pool)
    assert isinstance(model.mlps[0].middle[1], nn.LayerNorm)
    randomise_routers(model)
    x = images(3)
    ref = reference_encoder(pool, model, reduce=False)
    torch.testing.assert_close(
        model(x), torch.cat([ref(x[b : b + 1]) for b in range(3)]), atol=1e-5, rtol=1e-4
    )


def test_bfloat16_task_vectors_stay_close(pool):
    full = WEMoEModel(pool)
    half = WEMoEModel(pool, tv_dtype="bfloat16")
    half.load_state_dict(full.state_dict())
    assert half.mlps[0].tau_w_fc.dtype == torch.bfloat16
    torch.testing.assert_close(half(images()), full(images()), atol=2e-2, rtol=2e-2)


def test_ensemble_linear_shared_vector_equals_per_sample_rows():
    g = torch.Generator().manual_seed(0)
    x, w0, b0 = torch.randn(3, 4, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    tw, tb, r = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, generator=g)
    expected = x @ (w0 + r[0] * tw[0] + r[1] * tw[1]).T + (b0 + r[0] * tb[0] + r[1] * tb[1])
    torch.testing.assert_close(ensemble_linear(x, w0, b0, tw, tb, r), expected)
    torch.testing.assert_close(ensemble_linear(x, w0, b0, tw, tb, r.expand(3, 2)), expected)
    with pytest.raises(WEMoEError, match="3 entries but there are 2 task vectors"):
        ensemble_linear(x, w0, b0, tw, tb, torch.ones(3))


def test_errors(pool):
    broken = copy.deepcopy(make_tiny_clip().visual)
    broken.transformer.resblocks[1].mlp = nn.Sequential(nn.Linear(32, 32))
    bad_pool = ModelPool(broken, {"a": broken.state_dict()}, {"a": torch.eye(16)[:2]})
    with pytest.raises(WEMoEError, match=r"transformer\.resblocks\.1.*no recognisable MLP"):
        WEMoEModel(bad_pool)
    with pytest.raises(WEMoEError, match="no transformer.resblocks"):
        WEMoEModel(ModelPool(nn.Linear(2, 2), {"a": nn.Linear(2, 2).state_dict()}, {"a": torch.eye(2)}))
    with pytest.raises(WEMoEError, match="keep"):
        WEMoEModel(pool, keep=0.0)
    with pytest.raises(WEMoEError, match="router_hidden_layers"):
        WEMoEModel(pool, router_hidden_layers=-1)
    three = WEMoEModel(pool)
    two = WEMoEModel(pool, tasks=["task0", "task2"])
    with pytest.raises(WEMoEError, match="2 outputs .* merges 3"):
        three.load_state_dict(two.state_dict())
    with pytest.raises(WEMoEError, match="1 router"):
        three.load_state_dict(WEMoEModel(pool, shared_router=True).state_dict())
    with pytest.raises(ValueError, match="unknown"):
        WEMoEModel(pool, tasks=["unknown"])


@pytest.mark.slow
def test_vit_b32_eight_task_trainable_counts():
    """Paper: 7.16M trainable parameters for WEMoE on ViT-B/32 with 8 tasks; E-WEMoE ~0.6M (~2.5 GB RAM)."""
    import open_clip

    enc = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    base = enc.state_dict()

    def expert(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda: {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}

    tasks = [f"t{k}" for k in range(8)]
    pool = ModelPool(
        enc, {t: expert(k) for k, t in enumerate(tasks)}, {t: torch.eye(512)[:10] for t in tasks}
    )
    d, L, K = enc.transformer.width, len(enc.transformer.resblocks), 8
    router = d * d + d + d * K + K
    wemoe = WEMoEModel(pool)
    assert wemoe.trainable_parameter_count() == L * router == 7_160_928
    del wemoe
    e_wemoe = WEMoEModel(pool, shared_router=True, keep=0.1)
    assert e_wemoe.trainable_parameter_count() == router == 596_744
