"""RegMean (adamerge/systems/regmean.py): layer discovery, option checks and statistics, pinned exactly.

Besides the tiny CLIP (8 linear maps: more than the 4 a message lists), a toy encoder is used whose
linear inputs are written out by hand: ``fc1`` reads the images' mean colour ``[B, 3]``, ``fc2`` reads
``tanh(fc1(·))`` ``[B, 5]``; variants add a linear layer that never runs in the forward, an ``_embeds``
method without transformer blocks (one of RegMean++'s two requirements but not the other), or (on the
tiny CLIP) a linear layer outside the blocks. Each attention option RegMean cannot capture is tried
alone, so a check that needs two of them at once is seen; ``linear_layers`` is run on a bare
``nn.Linear`` and a bare attention module (the root's empty name has no prefix). The options are set to
their edges (alpha 0 and 1), a task subset in another order, a single task (so that the first expert,
not the second, is the one whose layers are listed), and a non-default ``export_dir``. A NaN image in the
second task's batch (the first task's is clean) and a linear layer added inside a block (RegMean++) reach
the merge's errors, which must name that task and that layer rather than an index. Messages are matched
whole (``^…$``). RegMean++ is checked against a hand-written reference at alpha 0.5 (not the default
0.95), on the tiny CLIP and on the same weights with sequence-first blocks (``[T, B, D]``, open_clip
before ``batch_first``), which must merge alike.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip, make_tiny_pool
from test_systems_statistics import plus_plus_reference
from torch import nn

from adamerge.merging import MergeError
from adamerge.merging.regmean import regmean_merge
from adamerge.models.pool import ModelPool
from adamerge.systems.regmean import RegMean, linear_layers

CLIP_LINEAR = [f"transformer.resblocks.{i}.{name}" for i in range(2)
               for name in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")]


class Toy(nn.Module):
    """features = fc2(tanh(fc1(mean colour))); ``unused``, when present, never runs."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 16)
        if unused:
            self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.mean((2, 3)))))


class ToyWithEmbeds(Toy):
    """Has open_clip's ``_embeds`` but no ``transformer.resblocks``."""

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        return x


def toy_pool(encoder: nn.Module, num_tasks: int = 2) -> ModelPool:
    g = torch.Generator().manual_seed(3)
    experts = {f"task{k}": {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in encoder.state_dict().items()}
               for k in range(num_tasks)}
    heads = {t: F.normalize(torch.randn(3, 16, generator=g), dim=-1) for t in experts}
    return ModelPool(encoder, experts, heads, logit_scale=10.0, name="toy")


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---- linear layers -----------------------------------------------------------------------------------------
def test_linear_layers_of_a_root_module_have_no_prefix():
    linear = nn.Linear(3, 4)
    assert linear_layers(linear) == {"weight": (linear, "linear")}
    attn = nn.MultiheadAttention(8, 2)
    assert linear_layers(attn) == {"in_proj_weight": (attn, "in_proj"), "out_proj.weight": (attn, "out_proj")}
    seq = nn.Sequential(linear, attn)
    assert linear_layers(seq) == {"0.weight": (linear, "linear"), "1.in_proj_weight": (attn, "in_proj"),
                                  "1.out_proj.weight": (attn, "out_proj")}


@pytest.mark.parametrize("option", [{"kdim": 4, "vdim": 4}, {"add_bias_kv": True}, {"add_zero_attn": True}])
def test_each_attention_option_the_capture_cannot_handle_is_refused(option):
    encoder = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, **option))
    with pytest.raises(ValueError, match=r"^RegMean: attention '1' has separate q/k/v widths, bias_k/v or zero "
                                         r"attention, which its input capture does not handle$"):
        linear_layers(encoder)


# ---- options -------------------------------------------------------------------------------------------------
def test_alpha_edges_tasks_and_export_dir_are_kept(tmp_path):
    p = make_tiny_pool(3)
    for alpha in (0, 1):
        system = RegMean(p, alpha=alpha)
        assert system.alpha == float(alpha) and isinstance(system.alpha, float)
    system = RegMean(p, tasks=["task2", "task0"], export_dir=str(tmp_path / "out"))
    assert system.tasks == ["task2", "task0"] and len(system.experts) == 2
    assert system.export_dir == str(tmp_path / "out")
    single = RegMean(p, tasks=["task1"])
    assert single.regmean_keys == CLIP_LINEAR
    assert RegMean(p).export_dir is None


def test_a_layers_pattern_matching_nothing_lists_four_of_the_weights():
    message = f"layers='nothing' matches none of the linear weights ({', '.join(CLIP_LINEAR[:4])}, ...)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RegMean(make_tiny_pool(2), layers="nothing")


def test_the_summary_names_every_option():
    system = RegMean(make_tiny_pool(2), alpha=0.5, layers="mlp")
    system.training_step({"task0": images(2, 0)}, 0)
    assert system.statistics_summary() == {
        "batches_seen": 1, "images_seen": {"task0": 2, "task1": 0}, "alpha": 0.5, "layers": "mlp",
        "plus_plus": False, "regmean_keys": [k for k in CLIP_LINEAR if "mlp" in k]}


# ---- statistics ----------------------------------------------------------------------------------------------
def test_grams_are_the_inputs_of_each_linear_layer_and_the_merge_uses_them():
    p = toy_pool(Toy())
    system = RegMean(p, alpha=0.7)
    batches = [images(6, 1), images(5, 2)]
    for i, x in enumerate(batches):
        system.training_step({t: x + k for k, t in enumerate(p.tasks)}, i)
    expected = []
    for k, t in enumerate(p.tasks):
        enc = p.build_encoder(p.expert_state(t))
        first = torch.cat([(x + k).mean((2, 3)) for x in batches]).double()
        second = torch.tanh(enc.fc1(first.float())).double()
        expected.append({"fc1.weight": first.t() @ first / 11, "fc2.weight": second.t() @ second / 11})
    got = system.grams()
    for t, g in zip(p.tasks, expected):
        assert set(got[t]) == set(g)
        for key, value in g.items():
            torch.testing.assert_close(got[t][key], value, rtol=1e-5, atol=1e-7)
    merged = system.merged_state_dict()
    reference = regmean_merge([p.expert_state(t) for t in p.tasks], expected, alpha=0.7)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-6)


def test_a_layer_that_never_runs_is_named_with_the_task():
    p = toy_pool(Toy(unused=True))
    system = RegMean(p)
    system.training_step({t: images(8, 4) for t in p.tasks}, 0)
    with pytest.raises(RuntimeError, match=r"^RegMean: layer 'unused\.weight' never ran in expert 'task0''s forward; "
                                           r"leave it out with the layers option$"):
        system.merged_state_dict()
    chosen = RegMean(p, layers="fc")
    chosen.training_step({t: images(8, 4) for t in p.tasks}, 0)
    assert set(chosen.merged_state_dict()) == set(p.encoder.state_dict())


# ---- RegMean++ -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", [Toy(), ToyWithEmbeds()], ids=["neither", "embeds-only"])
def test_plus_plus_needs_embeds_and_transformer_blocks(encoder):
    with pytest.raises(ValueError, match=r"^plus_plus needs an open_clip VisionTransformer encoder \(_embeds, "
                                         r"transformer\.resblocks\)$"):
        RegMean(toy_pool(encoder), plus_plus=True)


def test_plus_plus_refuses_a_linear_layer_outside_the_blocks():
    visual = make_tiny_clip().visual
    visual.extra = nn.Linear(2, 2)
    p = toy_pool(visual)
    with pytest.raises(ValueError, match=r"^plus_plus merges linear layers inside the blocks only; 'extra\.weight' "
                                         r"is outside \(leave it out with the layers option\)$"):
        RegMean(p, plus_plus=True)
    assert RegMean(p, plus_plus=True, layers="resblocks").regmean_keys == CLIP_LINEAR


def test_merge_errors_name_the_task_and_the_layer():
    p = toy_pool(Toy())
    system = RegMean(p)
    bad = images(8, 5)
    bad[3] = float("nan")
    system.training_step({"task0": images(8, 6), "task1": bad}, 0)
    with pytest.raises(MergeError, match=r"^fc1\.weight: the Gram matrix of expert 'task1' holds NaN or Inf$"):
        system.merged_state_dict()
    plus = RegMean(make_tiny_pool(2), plus_plus=True)
    plus.training_step({"task0": images(4, 6), "task1": bad[:4]}, 0)
    with pytest.raises(MergeError, match=r"^transformer\.resblocks\.0\.attn\.in_proj_weight: the Gram matrix of "
                                         r"expert 'task1' holds NaN or Inf$"):
        plus.merged_state_dict()


def test_plus_plus_names_the_task_of_a_block_layer_that_never_runs():
    visual = make_tiny_clip().visual
    visual.transformer.resblocks[1].extra = nn.Linear(2, 2)
    p = toy_pool(visual)
    system = RegMean(p, plus_plus=True)
    system.training_step({t: images(2, 7) for t in p.tasks}, 0)
    with pytest.raises(RuntimeError, match=r"^RegMean: layer 'transformer\.resblocks\.1\.extra\.weight' never ran in "
                                           r"expert 'task0''s forward; leave it out with the layers option$"):
        system.merged_state_dict()


def sequence_first(p: ModelPool) -> ModelPool:
    """The same pool on an encoder whose blocks run on ``[T, B, D]`` (open_clip before ``batch_first``)."""
    encoder = copy.deepcopy(p.encoder)
    encoder.transformer.batch_first = False
    for block in encoder.transformer.resblocks:
        block.attn.batch_first = False
    return ModelPool(encoder, {t: p.expert_state(t) for t in p.tasks}, p.heads, p.logit_scale, name="seq")


def test_plus_plus_uses_alpha_and_runs_sequence_first_blocks_alike():
    p = make_tiny_pool(2, scale=0.2)
    batches = [{"task0": images(3, 8), "task1": images(3, 9)}, {"task0": images(2, 10), "task1": images(2, 11)}]
    expected = plus_plus_reference(p, batches, alpha=0.5)
    for pool in (p, sequence_first(p)):
        system = RegMean(pool, alpha=0.5, plus_plus=True)
        for i, batch in enumerate(batches):
            system.training_step(batch, i)
        merged = system.merged_state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-5)


def test_a_layers_pattern_that_is_no_regular_expression_is_refused():
    with pytest.raises(ValueError, match=r"^layers='\(' is not a regular expression: missing \), unterminated "
                                         r"subpattern at position 0$"):
        RegMean(make_tiny_pool(1), layers="(")
