"""Pins for Surgery's component (adamerge/components/surgery.py): every refusal matched whole (each names
its task, width, block, version or key), the aligner's boundaries and dtype, the embedding width read from
``proj``, the V2 hooks on a hand-made encoder, and the frozen experts' cache.

The data are chosen so that the near misses disagree: a tiny hand-made encoder (``Toy``: tokens [B, L, 4],
two blocks, a ``proj`` matrix [4, 3] and no ``output_dim``) whose blocks can be told to skip one block or to
return a tuple; widths 4 and 3 differ, so a message or a shape using the wrong one differs; dim = rank = 1
are the smallest aligners accepted and 0 is refused on either side; checkpoints of another task list, of
another version (a key missing) and of a model with a key the checkpoint lacks are refused with different
messages; a float64 feature through a float32 aligner comes back float64.

Later pins (from the mutation run s11a, each checked to fail on its mutant) say in their own docstrings why
their data were chosen: a transformer without ``batch_first`` (old open_clip), experts without parameters or
moved to the ``meta`` device (a device move seen without a GPU), hooks that stay dormant outside a surgery
pass, bfloat16 features, a stacked ``proj`` and the range of the Kaiming-uniform ``W_down``."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_pool
from torch import nn

from adamerge.components.surgery import (
    AlignedFeatures,
    Aligner,
    ExpertFeatures,
    SurgeryModel,
    alignment_loss,
    encode_with_block_means,
    layer_alignment_losses,
    transformer_blocks,
)
from adamerge.models.pool import ModelPool


class _Block(nn.Module):
    def __init__(self, width: int, tuple_out: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.tuple_out = tuple_out

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        return (y,) if self.tuple_out else y


class Toy(nn.Module):
    """Tokens [B, 2, 4] from a [B, 8] input ([B, 2n, 4] from [B, n, 8]), two blocks, the first token through ``proj`` [4, 3]."""

    def __init__(self, skip: bool = False, tuple_out: bool = False, width: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 8)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_Block(4, tuple_out), _Block(4)])
        if width:
            self.transformer.width = 4
        self.transformer.batch_first = True
        self.proj = nn.Parameter(torch.randn(4, 3))
        self.skip = skip

    def forward(self, x):
        h = self.embed(x).reshape(x.shape[0], -1, 4)
        for i, block in enumerate(self.transformer.resblocks):
            if self.skip and i == 1:
                continue
            h = block(h)
            h = h[0] if isinstance(h, tuple) else h
        return h[:, 0] @ self.proj


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(1))


def test_aligner_bounds_and_dtype():
    with pytest.raises(ValueError, match=r"^aligner needs dim >= 1 and rank >= 1, got dim=0, rank=4$"):
        Aligner(0, 4)
    with pytest.raises(ValueError, match=r"^aligner needs dim >= 1 and rank >= 1, got dim=3, rank=0$"):
        Aligner(3, 0)
    one = Aligner(1, 1)
    assert (one.dim, one.rank) == (1, 1) and one.down.weight.shape == (1, 1) and one.up.weight.shape == (1, 1)
    a = Aligner(3, 2)
    assert a.down.bias is None and a.up.bias is None and torch.equal(a.up.weight, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"^aligner of width 3 got features of width 4$"):
        a(torch.zeros(2, 4))
    with torch.no_grad():
        a.up.weight.fill_(0.5)
    z = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    got = a(z)
    assert got.dtype == torch.float64  # computed in the aligner's float32, returned in the input's dtype
    h = torch.relu(z.float() @ a.down.weight.t())
    torch.testing.assert_close(got, (z.float() - h @ a.up.weight.t()).double())


def test_blocks_and_widths_are_read_from_the_model_or_refused_by_name():
    blocks, width, batch_first = transformer_blocks(Toy())
    assert len(blocks) == 2 and width == 4 and batch_first is True
    with pytest.raises(TypeError, match=(
            r"^SurgeryV2 needs per-block hooks, but Sequential has no non-empty `transformer\.resblocks` ModuleList "
            r"\(an open_clip VisionTransformer has one; timm/ResNet towers do not: use version='v1'\)$")):
        SurgeryModel(nn.Sequential(nn.Linear(8, 3)), ["a"], version="v2")
    empty = Toy()
    empty.transformer.resblocks = nn.ModuleList()
    with pytest.raises(TypeError, match=r"^SurgeryV2 needs per-block hooks, but Toy has no non-empty"):
        SurgeryModel(empty, ["a"], version="v2")
    with pytest.raises(TypeError, match=r"^Module has no `width` attribute to size the V2 aligners$"):
        SurgeryModel(Toy(width=False), ["a"], version="v2")
    no_dim = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(TypeError, match=(r"^cannot read the embedding width of Sequential \(no `output_dim` or "
                                         r"`proj`\): pass feature_dim explicitly$")):
        SurgeryModel(no_dim, ["a"])
    v2 = SurgeryModel(Toy(), ["a", "b"], rank=2, version="v2")  # no output_dim: proj's last dim, 3
    assert (v2.feature_dim, v2.width, v2.depth, v2.rank) == (3, 4, 2, 2)
    assert [a.dim for a in v2.block_aligners["b"]] == [4, 4] and v2.aligners["b"].dim == 3
    assert v2.trainable_parameter_count() == 2 * (2 * 3 * 2 + 2 * 2 * 4 * 2)
    assert v2.label == "SurgeryV2" and v2.identity() == {"version": "v2", "rank": 2}
    v1 = SurgeryModel(Toy(), ["a"], rank=5)
    assert (v1.feature_dim, v1.width, v1.depth) == (3, 0, 0) and v1.label == "Surgery"
    assert v1.identity() == {"version": "v1", "rank": 5} and SurgeryModel(Toy(), ["a"]).rank == 16


def test_bad_model_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"^SurgeryModel needs at least one task$"):
        SurgeryModel(Toy(), [])
    with pytest.raises(ValueError, match=r"^duplicate task names in \['a', 'b', 'a'\]$"):
        SurgeryModel(Toy(), ["a", "b", "a"])
    with pytest.raises(ValueError, match=r"^unknown surgery version 'v3'; expected one of \('v1', 'v2'\)$"):
        SurgeryModel(Toy(), ["a"], version="v3")
    with pytest.raises(ValueError, match=r"^rank must be at least 1, got 0$"):
        SurgeryModel(Toy(), ["a"], rank=0)
    assert SurgeryModel(Toy(), ["a"], rank=1).aligners["a"].rank == 1
    model = SurgeryModel(Toy(), ["a", "b"])
    with pytest.raises(KeyError) as err:
        model("c", _x())
    assert err.value.args == ("no aligner for task 'c' (tasks: ['a', 'b'])",)
    with pytest.raises(KeyError) as err:
        model.forward_many({"a": _x(), "d": _x()})
    assert err.value.args == ("no aligner for task 'd' (tasks: ['a', 'b'])",)


def test_v2_hooks_refuse_a_tuple_output_and_a_skipped_block():
    with pytest.raises(TypeError, match=r"^block 0 returned tuple, expected a token tensor$"):
        SurgeryModel(Toy(tuple_out=True), ["a"], version="v2")("a", _x())
    with pytest.raises(RuntimeError, match=r"^not every transformer block ran during the forward pass$"):
        encode_with_block_means(Toy(skip=True), _x())
    model = SurgeryModel(Toy(skip=True), ["a"], version="v2")
    with pytest.raises(RuntimeError, match=r"^not every transformer block ran during the forward pass$"):
        model("a", _x())
    model.encoder.skip = False  # the recorder is reset after a failed pass: the next one works
    out = model("a", _x())
    assert out.final.shape == (3, 3) and [m.shape for m in out.blocks] == [(3, 4), (3, 4)]


def test_v2_on_the_toy_equals_a_hand_run_and_forward_many_equals_single_calls():
    enc = Toy()
    model = SurgeryModel(enc, ["a", "b"], rank=2, version="v2")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = _x()
    h = enc.embed(x).view(3, 2, 4)
    means = []
    for block, aligner in zip(enc.transformer.resblocks, model.block_aligners["b"]):
        h = aligner(block(h))
        means.append(h.mean(dim=1))
    final = model.aligners["b"](h[:, 0] @ enc.proj)
    out = model("b", x)
    torch.testing.assert_close(out.final, final)
    for got, want in zip(out.blocks, means):
        torch.testing.assert_close(got, want)
    many = model.forward_many({"a": x[:1], "b": x})
    torch.testing.assert_close(many["b"].final, final)
    torch.testing.assert_close(many["a"].final, model("a", x[:1]).final)
    mixed = model.forward_many({"a": torch.randn(2, 8), "b": torch.randn(1, 2, 8)})  # shapes differ: one per task
    assert list(mixed) == ["a", "b"] and mixed["a"].final.shape == (2, 3) and mixed["b"].final.shape == (1, 3)


def test_train_keeps_the_frozen_encoder_in_eval_mode():
    model = SurgeryModel(Toy(), ["a"])
    model.eval()
    assert model.train() is model and model.training and not model.encoder.training
    assert model.aligners.training
    model.train(False)
    assert not model.training and not model.encoder.training


def test_checkpoints_of_other_tasks_versions_or_widths_are_refused_by_name():
    model = SurgeryModel(Toy(), ["a", "b"], rank=2, version="v2")
    with pytest.raises(ValueError, match=r"^surgery checkpoint has aligners for tasks \['a'\], this model has \['a', 'b'\]$"):
        model.load_state_dict(SurgeryModel(Toy(), ["a"], rank=2, version="v2").state_dict())
    with pytest.raises(ValueError, match=(r"^surgery checkpoint key 'block_aligners\.a\.0\.down\.weight' is missing "
                                          r"from the checkpoint \(model: v2, depth 2\)$")):
        model.load_state_dict(SurgeryModel(Toy(), ["a", "b"], rank=2, version="v1").state_dict())
    v1 = SurgeryModel(Toy(), ["a", "b"], rank=2, version="v1")
    with pytest.raises(ValueError, match=(r"^surgery checkpoint key 'block_aligners\.a\.0\.down\.weight' is not in "
                                          r"this model \(model: v1, depth 0\)$")):
        v1.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=(r"^surgery checkpoint aligner 'aligners\.a\.down\.weight' has shape \(3, 3\), "
                                          r"the backbone needs \(2, 3\) \(feature width 3, block width 4, rank 2\)$")):
        model.load_state_dict(SurgeryModel(Toy(), ["a", "b"], rank=3, version="v2").state_dict())


def test_alignment_losses_refuse_features_of_another_depth():
    two = AlignedFeatures(torch.zeros(2, 3), (torch.zeros(2, 4), torch.ones(2, 4)))
    one = AlignedFeatures(torch.ones(2, 3), (torch.zeros(2, 4),))
    with pytest.raises(ValueError, match=r"^merged model has 2 block features, expert 1$"):
        alignment_loss(two, one)
    with pytest.raises(ValueError, match=r"^merged model has 1 block features, expert 2$"):
        layer_alignment_losses(one, two)
    expert = AlignedFeatures(torch.full((2, 3), 0.5), (torch.full((2, 4), 2.0), torch.ones(2, 4)))
    assert torch.equal(layer_alignment_losses(two, expert), torch.tensor([2.0, 0.0, 0.5]))
    assert float(alignment_loss(two, expert)) == 2.5


def test_expert_features_refuse_an_unrequested_task_and_cache_or_rebuild():
    pool = make_tiny_pool(2)
    experts = ExpertFeatures(pool, ["task1"])
    with pytest.raises(KeyError) as err:
        experts.encoder("task0", torch.device("cpu"))
    assert err.value.args == ("no expert requested for task 'task0' (tasks: ['task1'])",)
    assert experts.with_blocks is False and experts.dtype is None and experts.cache is True
    first = experts.encoder("task1", torch.device("cpu"))
    assert experts.encoder("task1", torch.device("cpu")) is first
    experts.clear()
    assert experts.encoder("task1", torch.device("cpu")) is not first
    streaming = ExpertFeatures(pool, ["task1"], cache=False, dtype=torch.bfloat16)
    enc = streaming.encoder("task1", torch.device("cpu"))
    assert streaming.encoder("task1", torch.device("cpu")) is not enc and next(enc.parameters()).dtype == torch.bfloat16
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = streaming("task1", images)
    assert out.final.dtype == torch.float32 and out.blocks == ()
    want = pool.build_encoder(pool.expert_state("task1")).to(torch.bfloat16)(images.bfloat16()).float()
    torch.testing.assert_close(out.final, want)


def test_a_transformer_without_batch_first_is_read_as_sequence_first():
    """Old open_clip (2.0.2, the task_vectors checkpoints) has no ``transformer.batch_first``: absent means
    sequence-first ``[L, B, D]``. The Toy's tokens are [3, 2, 4]: with the attribute removed the block means
    are taken over dim 0 (shape [2, 4]), with it they would be over dim 1 ([3, 4]); the batch (3) and the
    token count (2) differ, so the two readings give different shapes and values."""
    enc = Toy()
    del enc.transformer.batch_first
    blocks, width, batch_first = transformer_blocks(enc)
    assert batch_first is False and width == 4 and blocks is enc.transformer.resblocks
    x = _x()
    out = encode_with_block_means(enc, x)
    with torch.no_grad():
        h0 = enc.transformer.resblocks[0](enc.embed(x).reshape(3, 2, 4))
    assert [m.shape for m in out.blocks] == [(2, 4), (2, 4)]
    torch.testing.assert_close(out.blocks[0], h0.mean(dim=0))


class _BufferOnly(nn.Module):
    """An encoder with no parameter at all (one float buffer): ``next(parameters())`` has nothing to give."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))

    def forward(self, x):
        return x * self.scale


class _Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


def _pool(encoder: nn.Module) -> ModelPool:
    state = {k: v + 1.0 for k, v in encoder.state_dict().items()}
    return ModelPool(encoder, {"a": state}, {"a": torch.eye(2)})


def test_an_expert_without_parameters_is_returned_as_built():
    """No parameter means no device to compare: the expert is returned as built (its buffer is θ_0 + 1),
    not an error from reading the device of a missing first parameter."""
    experts = ExpertFeatures(_pool(_BufferOnly()), ["a"])
    enc = experts.encoder("a", torch.device("cpu"))
    assert isinstance(enc, _BufferOnly) and torch.equal(enc.scale, torch.tensor([3.0, 4.0]))
    assert experts.encoder("a", torch.device("cpu")) is enc


def test_an_expert_is_moved_to_the_device_asked_for():
    """The meta device differs from the CPU the pool builds on, so the move is observable without a GPU:
    the cached expert's parameters end up on ``meta`` (moved in place: the same module is returned)."""
    experts = ExpertFeatures(_pool(_Lin()), ["a"])
    cpu = experts.encoder("a", torch.device("cpu"))
    assert cpu.lin.weight.device.type == "cpu"
    meta = experts.encoder("a", torch.device("meta"))
    assert meta is cpu and {p.device.type for p in meta.parameters()} == {"meta"}
    streamed = ExpertFeatures(_pool(_Lin()), ["a"], cache=False).encoder("a", torch.device("meta"))
    assert {p.device.type for p in streamed.parameters()} == {"meta"}


def test_the_block_hooks_are_dormant_outside_forward():
    """The frozen encoder called by itself (outside ``forward``) runs its own forward unchanged: the hooks
    only act during a surgery pass. The Toy's first block returns a tuple, which an active hook refuses
    (TypeError) but the Toy's own forward unpacks: so the plain call works before any pass, after a failed
    pass and after a successful one, and it records no block mean."""
    model = SurgeryModel(Toy(tuple_out=True), ["a"], version="v2")
    x = _x()
    want = Toy(tuple_out=True)(x)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), want)  # before any pass
    assert model._recorder.means == [None, None]
    with pytest.raises(TypeError, match=r"^block 0 returned tuple, expected a token tensor$"):
        model("a", x)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), want)  # after a failed pass
    model.encoder.transformer.resblocks[0].tuple_out = False
    assert model("a", x).final.shape == (3, 3)
    model.encoder.transformer.resblocks[0].tuple_out = True
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), want)  # after a successful pass
    assert model._recorder.means == [None, None]


def test_the_aligner_names_the_last_dimension_and_returns_half_precision_features_as_they_came():
    """Features [2, 5, 4] into an aligner of width 3: the width named is the last dimension (4), not the
    token count (5). A bfloat16 feature through a float32 aligner comes back bfloat16 (float64 would not
    tell: float64 minus a float32 correction is float64 anyway), with the correction rounded to bfloat16
    before the subtraction."""
    a = Aligner(3, 2)
    with pytest.raises(ValueError, match=r"^aligner of width 3 got features of width 4$"):
        a(torch.zeros(2, 5, 4))
    with torch.no_grad():
        a.up.weight.fill_(0.5)
    z = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], dtype=torch.bfloat16)
    got = a(z)
    assert got.dtype == torch.bfloat16
    correction = torch.relu(z.float() @ a.down.weight.t()) @ a.up.weight.t()
    assert torch.equal(got, z - correction.bfloat16())


def test_the_embedding_width_is_the_last_dimension_of_proj():
    """``x @ proj`` ends in proj's last dimension whatever proj's rank: a [1, 4, 3] proj (a stacked
    projection) gives width 3, where its second dimension is 4."""
    enc = Toy()
    enc.proj = nn.Parameter(torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(3)))
    model = SurgeryModel(enc, ["a"])
    assert model.feature_dim == 3 and model.aligners["a"].dim == 3
    with torch.no_grad():
        torch.testing.assert_close(model("a", _x()).final, enc(_x()))  # identity at initialisation


def test_the_aligner_defaults_to_rank_16_and_draws_down_from_the_linear_layers_range():
    """Rank 16 by default (the papers' r). W_down is Kaiming-uniform with a = √5, PyTorch's nn.Linear
    default: U(−1/√d, 1/√d). With d = r = 64 (4096 draws, bound 0.125) the largest |w| is within 4 % of the
    bound (a miss has probability 0.96^4096 ≈ e^-167; the seed makes it fixed anyway) and never above it:
    a = 0 (or None, slope 0.01) would draw up to √6/√d ≈ 0.31, a = √6 only up to 0.926/√d ≈ 0.116."""
    assert Aligner(5).rank == 16 and Aligner(5).down.weight.shape == (16, 5)
    torch.manual_seed(0)
    w = Aligner(64, 64).down.weight.detach().abs()
    assert 0.96 * 0.125 < float(w.max()) <= 0.125
