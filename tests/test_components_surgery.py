"""Surgery / SurgeryV2 component: aligners, hooks on open_clip blocks, loss, counts, errors."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from conftest import TINY_EMBED, TINY_VISION, make_tiny_pool
from torch import nn

from adamerge.components.surgery import (
    AlignedFeatures,
    Aligner,
    ExpertFeatures,
    SurgeryModel,
    alignment_loss,
    encode_with_block_means,
)
from adamerge.merging.task_vectors import add_task_vector, sum_task_vectors

RANK = 4


def _images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _ta_state(pool, lam: float = 0.3) -> dict:
    """Task arithmetic written out here (independent of adamerge.merging's dispatcher)."""
    taus = [tau for _, tau in pool.task_vectors()]
    return add_task_vector(pool.pretrained_state(), sum_task_vectors(taus), lam)


def _randomise_up(model: SurgeryModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _hand_forward(visual, images, block_fns=(), final_fn=None):
    """open_clip ViT forward written out step by step; block_fns[i] is applied to block i's output."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    means = []
    for i, block in enumerate(visual.transformer.resblocks):
        x = block(x)
        if block_fns:
            x = block_fns[i](x)
        means.append(x.mean(dim=1))
    pooled = visual.ln_post(x)[:, 0] @ visual.proj
    if final_fn is not None:
        pooled = final_fn(pooled)
    return pooled, means


def _manual_aligner(a: Aligner):
    return lambda z: z - torch.relu(z @ a.down.weight.t()) @ a.up.weight.t()


# ---- aligner ---------------------------------------------------------------------------------------
def test_aligner_starts_as_identity_and_has_the_paper_shapes():
    a = Aligner(12, rank=3)
    assert a.down.weight.shape == (3, 12) and a.up.weight.shape == (12, 3)
    assert a.down.bias is None and a.up.bias is None
    assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.down.weight) > 0
    z = torch.randn(4, 7, 12)
    assert torch.equal(a(z), z)


def test_aligner_matches_written_out_formula():
    a = Aligner(6, rank=2)
    torch.nn.init.normal_(a.up.weight)
    z = torch.randn(3, 6)
    expected = z - torch.clamp(z @ a.down.weight.t(), min=0) @ a.up.weight.t()
    torch.testing.assert_close(a(z), expected)


def test_aligner_rejects_wrong_width_and_bad_sizes():
    with pytest.raises(ValueError, match="width 6 got features of width 5"):
        Aligner(6, 2)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="rank >= 1"):
        Aligner(6, 0)


# ---- identity at init, hand-run equality ------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_surgery_model_starts_equal_to_the_merged_encoder(version):
    pool = make_tiny_pool()
    merged = pool.build_encoder(_ta_state(pool))
    model = SurgeryModel(merged, pool.tasks, rank=RANK, version=version)
    x = _images()
    expected = merged(x)
    for task in pool.tasks:
        out = model(task, x)
        # (V2's block inputs require grad, so MHA leaves its fused inference path: float rounding only)
        torch.testing.assert_close(out.final, expected, rtol=1e-5, atol=1e-6)
        assert len(out.blocks) == (2 if version == "v2" else 0)


def test_v2_blocks_and_final_match_a_hand_run_with_nonzero_aligners():
    pool = make_tiny_pool()
    merged = pool.build_encoder(_ta_state(pool))
    model = SurgeryModel(merged, pool.tasks, rank=RANK, version="v2")
    _randomise_up(model)
    x = _images()
    task = "task1"
    fns = [_manual_aligner(a) for a in model.block_aligners[task]]
    exp_final, exp_means = _hand_forward(merged, x, fns, _manual_aligner(model.aligners[task]))
    out = model(task, x)
    torch.testing.assert_close(out.final, exp_final, rtol=1e-5, atol=1e-5)
    assert len(out.blocks) == len(exp_means) == 2
    for got, exp in zip(out.blocks, exp_means):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    # the correction propagates: the final feature differs from aligning only the last block
    plain_final, _ = _hand_forward(merged, x)
    assert not torch.allclose(out.final, plain_final, atol=1e-4)


def test_encode_with_block_means_matches_hand_run_and_leaves_no_hooks():
    pool = make_tiny_pool()
    enc = pool.build_encoder()
    x = _images()
    out = encode_with_block_means(enc, x)
    exp_final, exp_means = _hand_forward(enc, x)
    torch.testing.assert_close(out.final, exp_final, rtol=1e-5, atol=1e-5)
    for got, exp in zip(out.blocks, exp_means):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert all(len(b._forward_hooks) == 0 for b in enc.transformer.resblocks)


class _SeqFirstViT(nn.Module):
    """A non-open_clip encoder with ``transformer.resblocks`` in sequence-first layout [L, B, D]."""

    def __init__(self, width=8, depth=3, out=5):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)
        )
        self.transformer.width = width
        self.transformer.batch_first = False
        self.head = nn.Linear(width, out)
        self.output_dim = out

    def forward(self, x):  # x: [B, L, D]
        x = x.transpose(0, 1)
        for b in self.transformer.resblocks:
            x = b(x)
        return self.head(x[0])


def test_v2_follows_any_depth_width_and_sequence_first_layout():
    torch.manual_seed(0)
    enc = _SeqFirstViT()
    model = SurgeryModel(enc, ["a", "b"], rank=2, version="v2")
    assert model.depth == 3 and model.width == 8 and model.feature_dim == 5
    _randomise_up(model)
    x = torch.randn(4, 6, 8)
    out = model("b", x)
    h, means = x.transpose(0, 1), []
    for blk, al in zip(enc.transformer.resblocks, model.block_aligners["b"]):
        h = _manual_aligner(al)(blk(h))
        means.append(h.mean(dim=0))
    torch.testing.assert_close(out.final, _manual_aligner(model.aligners["b"])(enc.head(h[0])))
    for got, exp in zip(out.blocks, means):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_forward_many_equals_one_call_per_task(version):
    pool = make_tiny_pool()
    model = SurgeryModel(pool.build_encoder(_ta_state(pool)), pool.tasks, rank=RANK, version=version)
    _randomise_up(model)
    images = {t: _images(3 + k, seed=k) for k, t in enumerate(pool.tasks)}
    many = model.forward_many(images)
    assert list(many) == pool.tasks
    for t, x in images.items():
        one = model(t, x)
        torch.testing.assert_close(many[t].final, one.final, rtol=1e-5, atol=1e-5)
        assert len(many[t].blocks) == len(one.blocks)
        for a, b in zip(many[t].blocks, one.blocks):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # gradients reach each task's aligners from its own slice only
    model.zero_grad()
    many["task1"].final.sum().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for n, p in model.named_parameters() if "task0" in n)
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for n, p in model.named_parameters() if "task1" in n)


def test_forward_many_on_sequence_first_blocks():
    torch.manual_seed(0)
    model = SurgeryModel(_SeqFirstViT(), ["a", "b"], rank=2, version="v2")
    _randomise_up(model)
    images = {"a": torch.randn(2, 6, 8), "b": torch.randn(3, 6, 8)}
    many = model.forward_many(images)
    for t, x in images.items():
        torch.testing.assert_close(many[t].final, model(t, x).final)


# ---- freezing, state dict, caller's model untouched --------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_only_aligners_learn_and_are_saved(version):
    pool = make_tiny_pool()
    model = SurgeryModel(pool.build_encoder(), pool.tasks, rank=RANK, version=version)
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith(("aligners.", "block_aligners.")) for n in names)
    assert all(p.requires_grad for p in model.parameters())
    assert list(model.encoder.parameters()) == []  # frozen weights are non-persistent buffers
    assert not any(b.requires_grad for b in model.encoder.buffers())
    assert set(model.state_dict()) == set(names)
    frozen = model.frozen_state_dict()
    assert list(frozen) == list(pool.encoder.state_dict())
    assert all(torch.equal(v, pool.encoder.state_dict()[k]) for k, v in frozen.items())
    model.train()
    assert not model.encoder.training


def test_callers_encoder_is_never_mutated():
    pool = make_tiny_pool()
    enc = pool.build_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    model = SurgeryModel(enc, pool.tasks, rank=RANK, version="v2")
    _randomise_up(model)
    model("task0", _images()).final.sum().backward()
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert all(len(b._forward_hooks) == 0 for b in enc.transformer.resblocks)
    assert model.encoder is not enc


def test_deepcopy_and_pickle_keep_v2_hooks_working():
    import pickle

    pool = make_tiny_pool()
    model = SurgeryModel(pool.build_encoder(), pool.tasks, rank=RANK, version="v2")
    _randomise_up(model)
    x = _images()
    expected = model("task1", x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        out = clone("task1", x)
        torch.testing.assert_close(out.final, expected.final)
        for a, b in zip(out.blocks, expected.blocks):
            torch.testing.assert_close(a, b)
        with torch.no_grad():
            clone.aligners["task1"].up.weight.zero_()  # the clone's aligners are its own
        assert not torch.allclose(clone("task1", x).final, expected.final)


def test_to_dtype_moves_the_frozen_encoder():
    pool = make_tiny_pool()
    model = SurgeryModel(pool.build_encoder(), pool.tasks, rank=RANK, version="v1").double()
    assert all(b.dtype == torch.float64 for b in model.frozen_state_dict().values())
    assert model("task0", _images().double()).final.dtype == torch.float64


# ---- loss and optimisation ---------------------------------------------------------------------------
def test_alignment_loss_is_the_sum_of_per_layer_mean_absolute_errors():
    g = torch.Generator().manual_seed(0)
    m = AlignedFeatures(torch.randn(3, 4, generator=g), (torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)))
    e = AlignedFeatures(torch.randn(3, 4, generator=g), (torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)))
    expected = sum((a - b).abs().sum() / a.numel() for a, b in zip([m.final, *m.blocks], [e.final, *e.blocks]))
    torch.testing.assert_close(alignment_loss(m, e), expected)
    v1 = alignment_loss(AlignedFeatures(m.final), AlignedFeatures(e.final))
    torch.testing.assert_close(v1, (m.final - e.final).abs().mean())
    with pytest.raises(ValueError, match="2 block features, expert 0"):
        alignment_loss(m, AlignedFeatures(e.final))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_few_adam_steps_reduce_the_l1_to_the_expert(version):
    pool = make_tiny_pool(scale=0.2)
    model = SurgeryModel(pool.build_encoder(_ta_state(pool)), pool.tasks, rank=8, version=version)
    experts = ExpertFeatures(pool, pool.tasks, with_blocks=version == "v2")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = _images(16)
    target = experts("task2", x)
    losses = []
    for _ in range(30):
        loss = alignment_loss(model("task2", x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    # other tasks' aligners got no gradient and are untouched (still identity)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "task0" in n and ".up." in n)


# ---- experts ------------------------------------------------------------------------------------------
def test_expert_features_match_the_expert_and_carry_no_grad():
    pool = make_tiny_pool()
    x = _images()
    expert = pool.build_encoder(pool.expert_state("task1"))
    feats = ExpertFeatures(pool, pool.tasks, with_blocks=True)("task1", x)
    ref = encode_with_block_means(expert, x)
    torch.testing.assert_close(feats.final, ref.final)
    assert len(feats.blocks) == 2 and not feats.final.requires_grad


def test_expert_features_half_precision_and_streaming():
    pool = make_tiny_pool()
    x = _images()
    ref = ExpertFeatures(pool, pool.tasks)("task0", x).final
    half = ExpertFeatures(pool, pool.tasks, dtype=torch.bfloat16, cache=False)
    out = half("task0", x).final
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    assert half._encoders == {}  # streamed: nothing kept
    cached = ExpertFeatures(pool, ["task0"])
    cached("task0", x)
    assert set(cached._encoders) == {"task0"}
    with pytest.raises(KeyError, match="task1"):
        cached("task1", x)


# ---- parameter counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parameter_count_on_the_tiny_model(version):
    pool = make_tiny_pool(num_tasks=3)
    model = SurgeryModel(pool.build_encoder(), pool.tasks, rank=RANK, version=version)
    width, layers = TINY_VISION["width"], TINY_VISION["layers"]
    per_task = 2 * TINY_EMBED * RANK + (layers * 2 * width * RANK if version == "v2" else 0)
    assert model.trainable_parameter_count() == 3 * per_task


def test_parameter_count_vit_b32_eight_tasks_without_allocating_weights():
    cfg = open_clip.get_model_config("ViT-B-32")
    with torch.device("meta"):  # shapes only: no 88M-parameter allocation
        visual = open_clip.CLIP(**cfg).visual
    tasks = [f"t{k}" for k in range(8)]
    v1 = SurgeryModel(visual, tasks, rank=16, version="v1")
    v2 = SurgeryModel(visual, tasks, rank=16, version="v2")
    assert (v2.depth, v2.width, v2.feature_dim) == (12, 768, 512)
    assert v1.trainable_parameter_count() == 8 * 2 * 512 * 16 == 131_072
    assert v2.trainable_parameter_count() == 8 * (12 * 2 * 768 * 16 + 2 * 512 * 16) == 2_490_368


# ---- bad input --------------------------------------------------------------------------------------------
def test_v2_on_a_model_without_blocks_is_refused():
    enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8))
    with pytest.raises(TypeError, match="transformer.resblocks"):
        SurgeryModel(enc, ["a"], version="v2")
    with pytest.raises(TypeError, match="feature_dim"):
        SurgeryModel(enc, ["a"], version="v1")
    model = SurgeryModel(enc, ["a"], version="v1", feature_dim=8)  # v1 works on any encoder
    assert model("a", _images()).final.shape == (5, 8)
    wrong = SurgeryModel(enc, ["a"], version="v1", feature_dim=9)
    with pytest.raises(ValueError, match="width 9 got features of width 8"):
        wrong("a", _images())


def test_bad_arguments_are_refused():
    enc = make_tiny_pool().build_encoder()
    with pytest.raises(ValueError, match="unknown surgery version 'v3'"):
        SurgeryModel(enc, ["a"], version="v3")
    with pytest.raises(ValueError, match="at least one task"):
        SurgeryModel(enc, [])
    with pytest.raises(ValueError, match="duplicate"):
        SurgeryModel(enc, ["a", "a"])
    with pytest.raises(KeyError, match="no aligner for task 'b'"):
        SurgeryModel(enc, ["a"])("b", _images())


def test_loading_aligners_of_other_tasks_or_widths_is_refused():
    pool = make_tiny_pool()
    enc = pool.build_encoder()
    model = SurgeryModel(enc, pool.tasks, rank=RANK, version="v2")
    _randomise_up(model)
    fresh = SurgeryModel(enc, pool.tasks, rank=RANK, version="v2")
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="tasks \\['task0', 'task1'\\], this model has"):
        fresh.load_state_dict(SurgeryModel(enc, ["task0", "task1"], rank=RANK, version="v2").state_dict())
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        fresh.load_state_dict(SurgeryModel(enc, pool.tasks, rank=RANK, version="v1").state_dict())
    other_width = SurgeryModel(_SeqFirstViT(width=32, depth=2, out=7), pool.tasks, rank=RANK, version="v2")
    with pytest.raises(ValueError, match="feature width 16"):
        fresh.load_state_dict(other_width.state_dict())
    # the check also runs when the aligners are loaded as part of a parent module (Lightning)
    parent, other = nn.Module(), nn.Module()
    parent.model, other.model = copy.deepcopy(fresh), SurgeryModel(enc, ["x", "y", "z"], rank=RANK)
    with pytest.raises(ValueError, match="tasks \\['x', 'y', 'z'\\]"):
        parent.load_state_dict(other.state_dict())
