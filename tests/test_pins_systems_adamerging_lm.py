"""Pins for AdaMerging of a causal LM as a LightningModule (adamerge/systems/adamerging_lm.py): the constructor's
checks (messages matched whole), defaults and the arguments it passes on; set-up binding the base's tokenizer;
the method identity; the logits of a packed prompt batch (cut to the longest prompt, on a given or frozen
merge); token ids outside the vocabulary; the evaluation step (what it logs, how, and which accuracy it
updates); and the export of the merged LM (tensors, dtype, shards, model card, manifest, no progress bar).

The data are chosen so that the near misses disagree:

* prompt batches hold B = 3 prompts of 5, 3 and 2 tokens padded to T = 7 (B ≠ the longest prompt ≠ T, so
  a length read from the batch axis, one column too many or too few, or no cut at all gives another shape),
  and logits are compared at every position, padding included (a forward without the mask differs there);
* the merge under test is λ = 0.3 frozen, then λ moved to 0.8: logits of "the merge now" differ from the
  frozen or given one;
* one prompt has a padding position inside it (masked, yet seen by the later positions if the mask were not
  passed): with right padding alone the mask could be dropped without changing the loss or the entropy;
* the token-id checks use −3 alone (only the lower bound fails), −2 with 64 (the message names 64, the
  upper one), 64 alone, and 0 and 63 (the legal extremes);
* the evaluation runs on the data module's task order (``code`` first), so dataloader 0 is not the
  system's first task; validation and test steps run on the default dataloader and test also on the
  second, so swapping the val / test accuracies or the default dataloader leaves another update count;
* the export uses tasks in the order (code, math), λ drawn per tensor in (0, 1), init_lam 0.25 (not a
  default), float16 and 20 KB shards (so the defaults, float32 and one shard, differ).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open
from test_llm_adamerging import TASKS, build_family, merged_state, pool_of, prompts_of, reference_lm
from torch import nn

from adamerge.components.causal_lm import CausalLMAdaMerging
from adamerge.data.prompts import PromptDataModule
from adamerge.files import read_manifest
from adamerge.models.hf_causal_lm import CausalLMPool
from adamerge.systems.adamerging_lm import AdaMergingLM


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    return build_family(tmp_path_factory.mktemp("llama_pins_system"))


def _batch(*rows: list[int], width: int = 7) -> torch.Tensor:
    """A packed right-padded batch [B, 2, width] (padding id 3) of the given prompts."""
    ids = torch.full((len(rows), width), 3, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return torch.stack([ids, mask], dim=1)


BATCH = _batch([1, 5, 9, 22, 40], [1, 30, 31], [1, 12])  # longest 5 of 7 columns, B = 3


def _reference_logits(fam: dict, batch: torch.Tensor, lam: float, length: int) -> torch.Tensor:
    ref = reference_lm(fam, merged_state(fam, lambda key: [lam, lam]))
    with torch.no_grad():
        return ref(input_ids=batch[:, 0, :length], attention_mask=batch[:, 1, :length]).logits


def _entropy(logits: torch.Tensor, mask: torch.Tensor, positions: str) -> torch.Tensor:
    """Mean over prompts of each prompt's mean (or last) −Σ p log p over its own positions, float64."""
    p = torch.softmax(logits.double(), dim=-1)
    h = -(p * torch.log(p)).sum(-1)
    per = [h[i][mask[i].bool()] for i in range(len(h))]
    return torch.stack([x.mean() if positions == "all" else x[-1] for x in per]).mean()


# ---- the constructor ---------------------------------------------------------------------------------------
def test_the_constructor_refuses_bad_arguments_with_whole_messages(family):
    with pytest.raises(ValueError, match=r"^positions must be 'all' or 'last', got 'every'$"):
        AdaMergingLM(pool_of(family), positions="every")
    with pytest.raises(ValueError, match=r"^export_dtype must be one of float32, float16, bfloat16 or unset, "
                                         r"got 'float64'$"):
        AdaMergingLM(pool_of(family), export_dtype="float64")
    with pytest.raises(TypeError, match=r"^model must build a CausalLMAdaMerging, got Linear$"):
        AdaMergingLM(pool_of(family), model=lambda pool, tasks: nn.Linear(2, 2))


def test_the_defaults_and_the_arguments_passed_on(family):
    hf = pool_of(family)
    system = AdaMergingLM(hf)
    assert isinstance(system.pool, CausalLMPool) and system.pool.hf is hf
    assert (system.positions, system.export_dtype, system.max_shard_size) == ("all", None, "5GB")
    assert system.export_dir is None and system.lr_scheduler is None and system.tasks == list(TASKS)
    pool = CausalLMPool(pool_of(family))
    for dtype in ("float32", "float16", "bfloat16"):
        system = AdaMergingLM(pool, tasks=["code"], positions="last", export_dtype=dtype, max_shard_size="20KB",
                              export_dir="somewhere")
        assert system.pool is pool and system.tasks == ["code"] and system.model.task_names == ["code"]
        assert (system.positions, system.export_dtype, system.max_shard_size) == ("last", dtype, "20KB")
        assert system.export_dir == "somewhere" and system.model.lambdas.shape == (1, 21)


def test_the_optimizer_and_schedule_given_are_the_ones_configured(family):
    system = AdaMergingLM(pool_of(family), optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                          lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3))
    config = system.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5
    assert optimizer.param_groups[0]["params"] == [system.model.lambdas]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 3
    default = AdaMergingLM(pool_of(family)).configure_optimizers()
    assert isinstance(default, torch.optim.Adam) and default.param_groups[0]["lr"] == 1e-3


def test_set_up_binds_the_base_models_tokenizer_to_the_prompts_and_takes_the_datas_task_order(family):
    system = AdaMergingLM(pool_of(family))
    system.setup("fit")  # no trainer: nothing to bind, no error
    system._trainer = SimpleNamespace(strategy=SimpleNamespace(checkpoint_io=None))
    system.setup("fit")  # a trainer stand-in without a datamodule attribute: as the base class, no error
    dm = PromptDataModule(prompts_of(family), tasks=["code", "math"])
    assert dm.source.tokenizer_path is None
    system._trainer = SimpleNamespace(datamodule=dm, strategy=SimpleNamespace(checkpoint_io=None))
    system.setup("validate")
    assert dm.source.tokenizer_path == str(family["root"] / "base")
    assert system._eval_tasks == ["code", "math"]


def test_the_method_identity_is_the_components_and_the_loss_positions(family):
    system = AdaMergingLM(pool_of(family), positions="last")
    assert system.method_identity() == {
        "component": "adamerge.components.causal_lm.CausalLMAdaMerging", "granularity": "layer", "clamp": True,
        "directions": {"method": "task_arithmetic"}, "layers": 21, "positions": "last"}


# ---- logits ------------------------------------------------------------------------------------------------
def test_the_logits_are_cut_to_the_longest_prompt_and_use_the_given_or_frozen_merge(family):
    system = AdaMergingLM(pool_of(family))
    at_03 = _reference_logits(family, BATCH, 0.3, 5)
    with torch.no_grad():
        got = system.lm_logits("math", BATCH)
        assert got.shape == (3, 5, 64)
        torch.testing.assert_close(got, at_03, rtol=1e-5, atol=1e-5)
        params = {k: v.detach() for k, v in system.model.merged_parameters().items()}
        system.on_validation_epoch_start()  # the merge frozen for the epoch: λ = 0.3
        system.model.lambdas.fill_(0.8)
        now = system.lm_logits("math", BATCH)
        assert (now - at_03).abs().max() > 1e-2  # another merge: the comparisons below can fail
        torch.testing.assert_close(now, _reference_logits(family, BATCH, 0.8, 5), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(system.lm_logits("math", BATCH, params), at_03, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(system.task_logits("math", BATCH), at_03, rtol=1e-5, atol=1e-5)


def test_prompt_batches_are_cut_after_their_last_real_column(family):
    system = AdaMergingLM(pool_of(family))
    ids, mask = system._tokens("math", BATCH)
    assert torch.equal(ids, BATCH[:, 0, :5]) and torch.equal(mask, BATCH[:, 1, :5])
    ids, mask = system._tokens("math", _batch([1, 2], [1, 2, 3, 4, 5, 6, 7]))  # a full-width prompt: no cut
    assert ids.shape == mask.shape == (2, 7)
    ids, mask = system._tokens("math", _batch([], [], [], width=4))  # all padding: one column kept
    assert ids.shape == mask.shape == (3, 1) and not mask.any()
    ids, mask = system._tokens("math", torch.zeros(0, 2, 4, dtype=torch.long))  # no prompts: no id to check
    assert ids.shape == mask.shape == (0, 1)


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_task_and_the_id(family):
    system = AdaMergingLM(pool_of(family))

    def message(task: str, bad: int) -> str:
        return "^" + re.escape(f"task {task!r}: token id {bad} is outside the model's vocabulary of 64: were the "
                               "prompts tokenized for another model?") + "$"

    with pytest.raises(ValueError, match=message("code", -3)):
        system.lm_logits("code", _batch([1, -3, 7]))
    with pytest.raises(ValueError, match=message("math", 64)):
        system.lm_logits("math", _batch([1, -2, 7], [64, 5]))
    with pytest.raises(ValueError, match=message("math", 64)):
        system.task_logits("math", _batch([1, 64, 7]))
    with pytest.raises(ValueError, match=message("code", 64)):
        system.adaptation_losses({"math": BATCH, "code": _batch([1, 64])})
    with pytest.raises(ValueError, match=message("code", 64)):
        system.validation_step(_batch([1, 64]), 0, 1)
    with torch.no_grad():
        assert system.lm_logits("code", _batch([0, 63, 0])).shape == (1, 3, 64)  # 0 and V − 1 are tokens


# ---- evaluation --------------------------------------------------------------------------------------------
def _recording(system: AdaMergingLM) -> list:
    calls = []
    system.log = lambda name, value, **kwargs: calls.append((name, value, kwargs))
    return calls


def _accuracy(logits: torch.Tensor, batch: torch.Tensor, length: int) -> float:
    ids, mask = batch[:, 0, :length], batch[:, 1, :length]
    pairs = (mask[:, :-1] * mask[:, 1:]).bool()
    return float((logits[:, :-1].argmax(-1) == ids[:, 1:])[pairs].float().mean())


@pytest.mark.parametrize("positions", ["all", "last"])
def test_an_evaluation_step_logs_the_entropy_and_updates_that_tasks_accuracy(family, positions):
    system = AdaMergingLM(pool_of(family), positions=positions)
    system._eval_tasks = ["code", "math"]  # the data module's order (set by setup)
    calls = _recording(system)
    with torch.no_grad():
        system.on_validation_epoch_start()
        system.model.lambdas.fill_(0.8)  # the frozen merge (0.3) is evaluated
        system.validation_step(BATCH, 0)  # dataloader 0 by default: code
        system.test_step(BATCH, 0)  # code
        system.test_step(BATCH, 0, 1)  # math
    ref = _reference_logits(family, BATCH, 0.3, 5)
    want = _entropy(ref, BATCH[:, 1, :5], positions)
    kwargs = {"batch_size": 3, "add_dataloader_idx": False, "sync_dist": True}
    assert [(name, kw) for name, _, kw in calls] == [
        ("val/entropy/code", kwargs), ("test/entropy/code", kwargs), ("test/entropy/math", kwargs)]
    for _, value, _ in calls:
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)
    accuracy = _accuracy(ref, BATCH, 5)
    code, math = system.tasks.index("code"), system.tasks.index("math")
    for metric in (system.val_acc[code], system.test_acc[code], system.test_acc[math]):
        assert metric.update_count == 1 and metric.compute().item() == pytest.approx(accuracy, abs=1e-6)
    assert system.val_acc[math].update_count == 0  # no math batch was validated


def test_the_loss_and_the_evaluation_pass_the_attention_mask_for_padding_inside_a_prompt(family):
    """With right padding alone no prompt position sees a padding one, so the mask would not matter; a padding
    position inside a prompt (column 2 of the first prompt) is seen by the positions after it unless masked."""
    system = AdaMergingLM(pool_of(family))
    inner = _batch([1, 12, 3, 13, 20], [1, 30, 31], width=6)
    inner[0, 1, 2] = 0
    ref = _reference_logits(family, inner, 0.3, 5)
    want = _entropy(ref, inner[:, 1, :5], "all")
    with torch.no_grad():
        unmasked = reference_lm(family, merged_state(family, lambda key: [0.3, 0.3]))(input_ids=inner[:, 0, :5]).logits
        assert abs(_entropy(unmasked, inner[:, 1, :5], "all") - want) > 1e-4  # the mask changes the loss here
        losses = system.adaptation_losses({"math": inner, "code": BATCH})
        torch.testing.assert_close(losses["math"].double(), want, rtol=1e-5, atol=1e-6)
        calls = _recording(system)
        system.on_validation_epoch_start()
        system.validation_step(inner, 0)
    torch.testing.assert_close(calls[0][1].double(), want, rtol=1e-5, atol=1e-6)


def test_an_evaluation_batch_without_next_tokens_updates_no_accuracy_and_a_missing_dataloader_is_refused(family):
    system = AdaMergingLM(pool_of(family))
    calls = _recording(system)
    with torch.no_grad():
        system.on_validation_epoch_start()
        system.validation_step(_batch([5], [9], width=3), 0, 1)  # one token per prompt: no (token, next) pair
    assert [name for name, _, _ in calls] == ["val/entropy/code"]
    assert system.val_acc[1].update_count == 0
    with pytest.raises(IndexError, match=r"^dataloader 2 has no task \(tasks: \['math', 'code'\]\)$"):
        system.validation_step(BATCH, 0, 2)


# ---- export ------------------------------------------------------------------------------------------------
def _model_folder(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    tensors, shards = {}, sorted(folder.glob("*.safetensors"))
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, len(shards)


def test_export_writes_the_merged_lm_in_the_asked_dtype_and_shards_with_its_card_and_manifest(family, tmp_path,
                                                                                               capsys):
    system = AdaMergingLM(pool_of(family), tasks=["code", "math"], positions="last", export_dtype="float16",
                          max_shard_size="20KB", model=lambda p, t: CausalLMAdaMerging(p, t, init_lam=0.25))
    with torch.no_grad():
        system.model.lambdas.copy_(torch.rand(system.model.lambdas.shape, generator=torch.Generator().manual_seed(4)))
    lam = system.model.lambdas.detach()
    layers = system.model.layer_names
    system._trainer = SimpleNamespace(global_step=7)
    capsys.readouterr()
    system.export(tmp_path / "export")
    assert "adamerge export" not in capsys.readouterr().err  # no progress bar
    out = tmp_path / "export" / "model"
    assert (tmp_path / "export" / "learned.safetensors").exists() and (tmp_path / "export" / "coefficients.json").exists()
    tensors, shards = _model_folder(out)
    assert shards > 1  # 20 KB shards, not one 5 GB file
    expected = merged_state(family, lambda key: [lam[1, layers.index(key)], lam[0, layers.index(key)]])
    assert set(tensors) == set(expected)
    for key, value in tensors.items():
        assert value.dtype == torch.float16, key
        torch.testing.assert_close(value.float(), expected[key], rtol=2e-3, atol=1e-3)
    args = ('{"clamp": true, "coefficients": "coefficients.json", "directions": {"method": "task_arithmetic"}, '
            '"granularity": "layer", "init_lam": 0.25, "layers": 21, "positions": "last"}')
    card = (out / "README.md").read_text()
    assert f"- method: `adamerging` (test-time, next-token entropy), arguments: `{args}`" in card
    assert "- adamerging\n" in card and "# Merged with adamerge: `adamerging`" in card
    assert card.index("| code |") < card.index("| math |")
    manifest = read_manifest(out)
    assert {k: manifest[k] for k in ("method", "run_id", "tasks", "step")} == {
        "method": "AdaMerging (layer-wise)", "run_id": system.run_id, "tasks": ["code", "math"], "step": 7}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_export_by_default_keeps_the_base_dtype_in_one_shard(family, tmp_path):
    system = AdaMergingLM(pool_of(family))
    system._trainer = SimpleNamespace(global_step=0)
    system.export(tmp_path / "export")
    tensors, shards = _model_folder(tmp_path / "export" / "model")
    assert shards == 1
    expected = merged_state(family, lambda key: [0.3, 0.3])
    assert set(tensors) == set(expected)
    for key, value in tensors.items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
