"""Pins for the causal-LM AdaMerging component (adamerge/components/causal_lm.py): the next-token entropy and
next-token pairs on hand-made logits, the component's arguments and refusals (messages matched whole), what
``identity()`` holds, the clamp of λ to [0, 1] in ``coefficients()`` and in the merge, ``train()`` keeping
the LM in eval mode, precomputed ``params`` in ``forward``, and tied weights.

The data are chosen so that the near misses disagree:

* the entropy batch has three prompts over four positions (B ≠ T, so a batch index taken from the position
  axis, or the other way round, fails or reads other rows), prompts of 4, 2 and 1 tokens (per-prompt means
  differ from a pooled mean or from sums, and a one-token prompt is legal), padding at the left, inside and
  at the right (the last token is not always the last position, nor position 1), and logits of different
  scales per position (every position has its own entropy, far from log V);
* the all-padding batch has an empty prompt at index 1 and 2, a one-token prompt at 0 (so "the first
  non-empty" or "the first one-token prompt" or "the second empty one" each name another prompt);
* λ is set to values below 0, inside (0, 1) and above 1 (also above 2), so each missing or shifted bound
  of the clamp changes a coefficient;
* the tasks are merged as a subset (``code`` only), so merging every task gives two rows;
* the tied model is written with both ``model.embed_tokens.weight`` and ``lm_head.weight`` in its files
  (some checkpoints are), so both names reach the merge and the refusal is reachable.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("transformers")

from test_llm_adamerging import TASKS, build_family, merged_state, pool_of, reference_lm

from adamerge.components.causal_lm import (
    CausalLMAdaMerging,
    _tied_groups,
    next_token_entropy,
    next_token_targets,
)
from adamerge.merging.task_vectors import MergeError
from adamerge.models.hf_causal_lm import CausalLMPool

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ---- the math -------------------------------------------------------------------------------------------
def _entropy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [3, 4, 5] (position t scaled by t + 1: four distinct entropies per prompt) and a mask with a
    full prompt, one padded left and inside (tokens at 1 and 3), and a one-token prompt (token at 0)."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 5, generator=g) * torch.arange(1.0, 5.0).view(1, 4, 1)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0]])
    return logits, mask


def _entropies(logits: torch.Tensor) -> torch.Tensor:
    """−Σ p log p over the last axis, float64, written out with softmax."""
    p = torch.softmax(logits.double(), dim=-1)
    return -(p * torch.log(p)).sum(dim=-1)


def test_the_entropy_refuses_logits_or_masks_of_the_wrong_shape_naming_both():
    """A 2-D logits with a mask of the same shape (only the rank is wrong), and a 3-D logits with a mask one
    position longer (only the mask is wrong): each check alone must refuse."""
    message = r"^logits \[B, T, V\] and attention_mask \[B, T\] expected, got {} and {}$"
    with pytest.raises(ValueError, match=message.format(r"\(2, 3\)", r"\(2, 3\)")):
        next_token_entropy(torch.randn(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=message.format(r"\(2, 3, 5\)", r"\(2, 4\)")):
        next_token_entropy(torch.randn(2, 3, 5), torch.ones(2, 4))
    with pytest.raises(ValueError, match=message.format(r"\(2, 3, 5, 1\)", r"\(2, 3\)")):
        next_token_entropy(torch.randn(2, 3, 5, 1), torch.ones(2, 3))


def test_an_all_padding_prompt_is_refused_by_its_index():
    """Prompts 1 and 2 are empty, prompt 0 has one token, prompt 3 three: the message names prompt 1."""
    logits = torch.randn(4, 3, 5)
    mask = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1]])
    for positions in ("all", "last"):
        with pytest.raises(ValueError, match=r"^prompt 1 of the batch has no tokens \(all padding\)$"):
            next_token_entropy(logits, mask, positions)


def test_the_entropy_over_all_positions_is_each_prompts_mean_over_its_own_tokens():
    """Written out per prompt in float64. No warning is raised (an implicit softmax dimension is deprecated).
    The pooled mean over the batch's tokens, the sums, and a mean over all four positions all differ here."""
    logits, mask = _entropy_batch()
    h = _entropies(logits)
    want = torch.stack([h[0].mean(), h[1, [1, 3]].mean(), h[2, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = next_token_entropy(logits, mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # the near misses are far from it on this batch
    assert (h.mean(dim=1) - want)[1:].abs().min() > 1e-2  # padding counted (prompts 1 and 2)
    assert (h[mask.bool()].mean() - want).abs().min() > 1e-2  # pooled
    assert abs(want[1] - h[1, [1, 3]].sum()) > 1e-2
    # a boolean mask or float logits in another dtype mean the same
    torch.testing.assert_close(next_token_entropy(logits.double(), mask.bool()), got)


def test_the_entropy_at_the_last_position_reads_each_prompts_last_token():
    """Last tokens at positions 3, 3 (after an inside gap) and 0 (a one-token prompt): the last padding
    position (2 in prompt 1), position 1, or one shared last position would read other logits."""
    logits, mask = _entropy_batch()
    h = _entropies(logits)
    want = torch.stack([h[0, 3], h[1, 3], h[2, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = next_token_entropy(logits, mask, "last")
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (next_token_entropy(logits, mask, "all").double() - want).abs().max() > 1e-2  # "last" is not "all"
    # right padding: prompt 2 keeps its tokens at 0..1, its last one is at 1, not at 3
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    torch.testing.assert_close(next_token_entropy(logits, right, "last").double(),
                               torch.stack([h[0, 3], h[1, 1], h[2, 2]]), rtol=1e-5, atol=1e-6)


def test_the_entropy_is_float32_under_a_float64_default_dtype():
    """The per-prompt sums are accumulated in the entropies' own dtype (float32), not torch's default."""
    logits, mask = _entropy_batch()
    want = next_token_entropy(logits, mask)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = next_token_entropy(logits, mask)
    finally:
        torch.set_default_dtype(old)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_the_next_token_pairs_are_the_positions_whose_token_and_next_token_are_the_prompts():
    """Five positions (more than two, so a wrong slice has another length), padding left, inside and right:
    the pairs are (0: 1→2) and (1: 0→1, 1→2, 2→3), written out by hand."""
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 0]])
    got_logits, got_targets = next_token_targets(logits, ids, mask)
    assert torch.equal(got_logits, torch.stack([logits[0, 1], logits[1, 0], logits[1, 1], logits[1, 2]]))
    assert torch.equal(got_targets, torch.tensor([12, 21, 22, 23]))


def test_tied_groups_are_the_names_of_each_parameter_held_under_several_names():
    """A tied pair next to untied parameters: only the pair is a group, with both names in module order."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), nn.Linear(2, 3))
    model[1].weight = model[0].weight
    assert _tied_groups(model) == [["0.weight", "1.weight"]]
    assert _tied_groups(nn.Linear(2, 2)) == []


# ---- the component --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return build_family(tmp_path_factory.mktemp("llama"))


def _add_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One more shard in a sharded HF folder, listed in its index."""
    save_file(tensors, str(folder / "model-extra.safetensors"))
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update(dict.fromkeys(tensors, "model-extra.safetensors"))
    index.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def tied_fam(tmp_path_factory) -> dict:
    """Tied embeddings, with ``lm_head.weight`` also written in every folder's files (a copy of the embedding)."""
    family = build_family(tmp_path_factory.mktemp("tied"), tied=True)
    for name in ("base", *TASKS):
        _add_tensors(family["root"] / name, {HEAD: family["states"][name][EMBED].clone()})
    return family


def _with_extra_tensors(fam: dict, root: Path) -> dict:
    """A copy of the family whose files also hold a rotary ``inv_freq`` of 3 entries (the model's has 4)
    and a tensor no Llama has."""
    shutil.copytree(fam["root"], root)
    for name in ("base", *TASKS):
        _add_tensors(root / name, {"model.rotary_emb.inv_freq": torch.ones(3), "model.extra.weight": torch.ones(2)})
    return {**fam, "root": root}


def _set_lambdas(model: CausalLMAdaMerging, values) -> None:
    with torch.no_grad():
        model.lambdas.copy_(torch.as_tensor(values, dtype=torch.float32).expand_as(model.lambdas))


def test_the_defaults_and_identity_hold_exactly_the_documented_keys(fam):
    """identity() is what a resumed run compares: these four keys and values, nothing else."""
    model = CausalLMAdaMerging(pool_of(fam))
    assert model.identity() == {"granularity": "layer", "clamp": True, "directions": {"method": "task_arithmetic"},
                                "layers": 21}
    assert model.clamp is True and model.init_lam == 0.3 and model.task_names == list(TASKS)
    assert torch.equal(model.lambdas.detach(), torch.full((2, 21), 0.3))
    assert model.task_vectors.dtype == torch.float32 and set(model.state_dict()) == {"lambdas"}
    other = CausalLMAdaMerging(pool_of(fam, exclude=[r"norm\.weight$"]), granularity="task", init_lam=1.5,
                               clamp=False, directions={"method": "ties", "keep": 1.0}, tv_dtype="bfloat16")
    assert other.identity() == {"granularity": "task", "clamp": False, "directions": {"method": "ties", "keep": 1.0},
                                "layers": 16}
    assert torch.equal(other.lambdas.detach(), torch.full((2, 1), 1.5))
    assert other.task_vectors.dtype == torch.bfloat16


def test_the_pool_may_be_a_causal_lm_pool_and_anything_else_is_refused_by_type(fam):
    model = CausalLMAdaMerging(CausalLMPool(pool_of(fam)), tasks=["code"])
    assert model.task_names == ["code"] and model.lambdas.shape == (1, 21)
    with pytest.raises(TypeError, match=r"^pool must be a CausalLMPool or an HFPool, got dict$"):
        CausalLMAdaMerging({"base": fam["root"] / "base"})


def test_a_subset_of_tasks_merges_only_their_task_vectors(fam):
    """``code`` alone: one row of τ_code over the merged tensors (merging both tasks would give two rows)."""
    model = CausalLMAdaMerging(pool_of(fam), tasks=("code",))
    s = fam["states"]
    want = torch.cat([(s["code"][k] - s["base"][k]).reshape(-1) for k in model.layer_names])
    assert model.task_vectors.shape == (1, want.numel())
    torch.testing.assert_close(model.task_vectors[0], want, rtol=0, atol=1e-6)
    merged = model.merged_parameters()
    key = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(merged[key], s["base"][key] + 0.3 * (s["code"][key] - s["base"][key]))


def test_init_lam_outside_the_clamp_range_is_refused_only_with_the_clamp(fam):
    message = r"^init_lam 1.5 is outside the clamp range \[0, 1\]"
    with pytest.raises(ValueError, match=message):
        CausalLMAdaMerging(pool_of(fam), init_lam=1.5)
    with pytest.raises(ValueError, match=message):
        CausalLMAdaMerging(pool_of(fam), init_lam=1.5, clamp=True)
    assert CausalLMAdaMerging(pool_of(fam), init_lam=1.5, clamp=False).lambdas.detach().max() == 1.5


def test_a_pool_that_merges_nothing_is_refused(fam):
    with pytest.raises(MergeError, match=r"^no tensors to merge: the pool's include / exclude patterns leave none$"):
        CausalLMAdaMerging(pool_of(fam, include=["no-such-tensor"]))


def test_tensors_of_the_files_that_the_model_lacks_or_shapes_differently_are_refused_by_name(fam, tmp_path):
    extra = _with_extra_tensors(fam, tmp_path / "extra")
    with pytest.raises(MergeError, match=r"^tensor 'model.extra.weight' of the base folder is no weight of the "
                                         r"LlamaForCausalLM built from it \(a key transformers renames on loading\?\): "
                                         r"exclude it from the merge$"):
        CausalLMAdaMerging(pool_of(extra, exclude=["inv_freq"]))
    with pytest.raises(MergeError, match=r"^tensor 'model.rotary_emb.inv_freq': the model's weight has shape \(4,\), "
                                         r"the files' \(3,\)$"):
        CausalLMAdaMerging(pool_of(extra, exclude=[r"extra\."]))


def test_coefficients_are_clamped_to_zero_one_only_with_the_clamp_and_broadcast_task_wise(fam):
    """λ = −0.5, 0.25, 1.5 and 2.5 (above 2) in the two rows: each bound of [0, 1] changes one of them."""
    pool = pool_of(fam)
    values = torch.tensor([[-0.5, 0.25, 1.5, 2.5], [0.75, 2.5, -1.0, 0.5]]).repeat(1, 6)[:, :21]
    clamped = CausalLMAdaMerging(pool)
    _set_lambdas(clamped, values)
    assert torch.equal(clamped.coefficients(), values.clamp(0.0, 1.0))
    free = CausalLMAdaMerging(pool, clamp=False)
    _set_lambdas(free, values)
    assert torch.equal(free.coefficients(), values)
    task_wise = CausalLMAdaMerging(pool, granularity="task")
    _set_lambdas(task_wise, torch.tensor([[1.5], [-0.5]]))
    assert torch.equal(task_wise.coefficients(), torch.tensor([[1.0], [0.0]]).expand(2, 21))


@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "free"])
def test_the_merged_weights_use_the_clamped_coefficients(clamp, fam):
    """θ_0 + Σ_k c_k τ_k written out from the saved models, c = clamp(λ) or λ; λ per task: (1.5, −0.5) on the
    first tensors, (0.25, 2.5) on the others, so the lower bound, the upper bound and 2 all show."""
    model = CausalLMAdaMerging(pool_of(fam), clamp=clamp)
    first = set(model.layer_names[:10])
    lam = {k: ([1.5, -0.5] if k in first else [0.25, 2.5]) for k in model.layer_names}
    _set_lambdas(model, torch.tensor([[lam[k][i] for k in model.layer_names] for i in range(2)]))
    coefficient = (lambda c: [min(max(v, 0.0), 1.0) for v in c]) if clamp else list
    expected = merged_state(fam, lambda key: coefficient(lam[key]))
    merged = model.merged_parameters()
    assert list(merged) == model.layer_names
    for key in model.layer_names:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)
        assert merged[key].dtype == torch.float32
    for key, tensor in model.merged_tensors():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-6, atol=1e-6)


def test_train_without_an_argument_turns_training_on_and_keeps_the_lm_in_eval_mode(fam):
    model = CausalLMAdaMerging(pool_of(fam))
    model.eval()
    assert not model.training
    assert model.train() is model
    assert model.training and not model.lm.training and not any(m.training for m in model.lm.modules())
    assert model.train(False) is model and not model.training and not model.lm.training


def test_forward_uses_precomputed_params_when_given(fam):
    """Params of θ_0 give θ_0's logits, though λ = 0.3 would merge other weights (checked to differ)."""
    model = CausalLMAdaMerging(pool_of(fam))
    ids, mask = torch.tensor([[1, 5, 9, 22], [3, 30, 31, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    base = {k: fam["states"]["base"][k] for k in model.layer_names}
    with torch.no_grad():
        want = reference_lm(fam, fam["states"]["base"])(input_ids=ids, attention_mask=mask).logits
        got = model(ids, mask, params=base)
        merged = model(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (merged - want).abs().max() > 1e-2


def test_a_tied_weight_is_merged_once_and_both_names_merged_are_refused(tied_fam):
    """Both names in the merge: refused, naming the second to exclude. Only ``lm_head.weight`` merged: the
    merged tensor is also the input embedding (the logits equal the written-out merge's). Neither merged:
    the tied group has no merged tensor to pass on, the logits are those of θ_0's tied weight with the
    other tensors merged."""
    with pytest.raises(MergeError, match=rf"^tensors '{EMBED}' and '{HEAD}' are one tied weight: merge one of "
                                         rf"them only \(exclude '{HEAD}'\)$"):
        CausalLMAdaMerging(pool_of(tied_fam))
    model = CausalLMAdaMerging(pool_of(tied_fam, exclude=[r"^model\.embed_tokens\."]))
    assert HEAD in model.layer_names and EMBED not in model.layer_names and len(model.layer_names) == 20
    assert model._tied == [[EMBED, HEAD]]
    ids, mask = torch.tensor([[1, 5, 9, 22, 40]]), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        want = reference_lm(tied_fam, merged_state(tied_fam, lambda key: [0.3, 0.3]))(input_ids=ids).logits
        torch.testing.assert_close(model(ids, mask), want, rtol=1e-5, atol=1e-5)
    neither = CausalLMAdaMerging(pool_of(tied_fam, exclude=[r"^model\.embed_tokens\.", r"^lm_head\."]))
    assert len(neither.layer_names) == 19 and neither._tied == [[EMBED, HEAD]]
    with torch.no_grad():  # the tied weight stays θ_0's, the other tensors are merged
        state = merged_state(tied_fam, lambda key: None if key in (EMBED, HEAD) else [0.3, 0.3])
        torch.testing.assert_close(neither(ids, mask), reference_lm(tied_fam, state)(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_the_direction_arguments_reach_the_directions_method(fam):
    """TIES with keep 1.0 trims nothing: each direction is τ_k where its sign agrees with the elected sign of
    τ_math + τ_code, else 0 (written out here). The default keep (0.2) would zero most of the agreeing entries."""
    model = CausalLMAdaMerging(pool_of(fam), directions={"method": "ties", "keep": 1.0})
    s = fam["states"]
    taus = [torch.cat([(s[t][k] - s["base"][k]).reshape(-1) for k in model.layer_names]) for t in TASKS]
    elected = torch.sign(taus[0] + taus[1])
    want = torch.stack([torch.where(torch.sign(tau) == elected, tau, torch.zeros(())) for tau in taus])
    torch.testing.assert_close(model.task_vectors, want, rtol=0, atol=1e-6)
    assert (want != 0).float().mean() > 0.5
