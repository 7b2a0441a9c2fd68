"""Pins for the causal LM's pool (adamerge/models/hf_causal_lm.py): where the vocabulary size is read from and
what is refused (messages matched whole), the pool's fixed attributes (name from the base folder, logit scale
1, an empty ``[V, 0]`` head per task), task checks, θ_0 / θ_task / τ_task against the in-memory models the
folders were saved from, the cached fingerprints, the LM it loads (float32, eval, frozen), the LM with a
merged state loaded, and ``export`` (tensors, model card, manifest, no progress bar).

The data are chosen so that the near misses disagree:

* the config cases give the vocabulary at the top level and in ``text_config`` with different sizes (64, 50),
  so reading only one of them, or preferring the nested one, returns another number; the bounds are probed
  at 2 (the smallest accepted) and 1, and a string and a float stand in for "not an int";
* the folder names ``base `` (trailing space) and ``baseX`` change if the name is stripped of whitespace or
  of other characters than ``/``;
* ``code`` is the second task, so a call that ignores its task list returns ``math`` first or both tasks;
* the half-precision base is saved in bfloat16, so a load without ``dtype=float32`` gives bfloat16 weights
  (transformers' default loads the stored dtype);
* the exported state is θ_0 + 0.5 τ_math − 0.25 τ_code (neither θ_0 nor an expert), and the missing or
  unknown keys come two at a time, so a message naming the second one or none is caught.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open
from test_llm_adamerging import TASKS, TINY, build_family, pool_of
from transformers import LlamaConfig, LlamaForCausalLM

from adamerge.files import file_fingerprint, read_manifest
from adamerge.merging.task_vectors import MergeError
from adamerge.models.hf_causal_lm import CausalLMPool, _vocab_size
from adamerge.models.hf_pool import HFPool


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    return build_family(tmp_path_factory.mktemp("llama_pins_pool"))


def _no_vocab(source: str) -> str:
    return f"^{re.escape(f'base model {source}: config.json gives no vocab_size (needed for a causal LM)')}$"


def _folder_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every tensor of a written model folder, and the ``adamerge_method`` metadata of its shards."""
    tensors, methods = {}, set()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            methods.add((f.metadata() or {}).get("adamerge_method"))
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, methods


# ---- the vocabulary size -----------------------------------------------------------------------------------
def test_the_vocabulary_size_is_the_top_level_one_else_the_text_configs():
    assert _vocab_size({"vocab_size": 64}, "org/lm") == 64
    assert _vocab_size({"vocab_size": 64, "text_config": {"vocab_size": 50}}, "org/lm") == 64
    assert _vocab_size({"text_config": {"vocab_size": 50}}, "org/lm") == 50
    assert _vocab_size({"vocab_size": None, "text_config": {"vocab_size": 50}}, "org/lm") == 50
    assert _vocab_size({"vocab_size": 2}, "org/lm") == 2  # the smallest vocabulary accepted


@pytest.mark.parametrize("config", [None, {}, {"vocab_size": 1}, {"vocab_size": 0}, {"vocab_size": "64"},
                                    {"vocab_size": 64.0}, {"text_config": None}, {"text_config": {"vocab_size": 1}},
                                    {"text_config": {"hidden_size": 8}}])
def test_a_config_without_a_usable_vocabulary_size_is_refused_naming_the_model(config):
    with pytest.raises(MergeError, match=_no_vocab("org/lm")):
        _vocab_size(config, "org/lm")


def test_a_base_folder_whose_config_lacks_the_vocabulary_size_is_refused_naming_the_folder(family, tmp_path):
    base = tmp_path / "novocab"
    shutil.copytree(family["root"] / "base", base)
    config = json.loads((base / "config.json").read_text())
    del config["vocab_size"]
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=_no_vocab(str(base))):
        CausalLMPool(HFPool(str(base), {"math": family["root"] / "math"}))


# ---- construction ------------------------------------------------------------------------------------------
def test_anything_but_an_hf_pool_is_refused_by_its_type():
    with pytest.raises(TypeError, match=r"^hf must be an HFPool, got dict$"):
        CausalLMPool({"base": "x"})


def test_experts_with_another_vocabulary_are_refused_with_the_whole_message(family, tmp_path):
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": 66})).save_pretrained(str(tmp_path / "big"))
    hf = HFPool(family["root"] / "base", {"math": family["root"] / "math", "big": tmp_path / "big"},
                vocab_source="base")
    message = ("tensor 'model.embed_tokens.weight': the experts' vocabularies differ; test-time merging of a causal "
               "LM needs every expert to have the base's vocabulary")
    with pytest.raises(MergeError, match=f"^{re.escape(message)}$"):
        CausalLMPool(hf)


def test_the_pools_fixed_attributes_and_empty_heads(family):
    pool = CausalLMPool(pool_of(family))
    assert pool.name == "base" and pool.benchmark_id == "base"
    assert pool.logit_scale == 1.0 and isinstance(pool.logit_scale, float)
    assert pool.vocab_size == 64 and pool.tasks == list(TASKS)
    assert set(pool.heads) == set(TASKS)
    for task in TASKS:
        head = pool.head(task)
        assert head.shape == (64, 0) and head.dtype == torch.float32
    named = CausalLMPool(pool_of(family), name="tiny-lm")
    assert named.name == "tiny-lm" and named.benchmark_id == "tiny-lm"


@pytest.mark.parametrize("folder", ["base ", "baseX"])
def test_the_default_name_is_the_base_folders_name_unchanged(family, tmp_path, folder):
    """Only a trailing ``/`` is dropped: a trailing space or ``X`` is part of the folder's name."""
    shutil.copytree(family["root"] / "base", tmp_path / folder)
    pool = CausalLMPool(HFPool(str(tmp_path / folder), {"math": family["root"] / "math"}))
    assert pool.name == folder and pool.benchmark_id == folder
    slash = CausalLMPool(HFPool(str(tmp_path / folder) + "/", {"math": family["root"] / "math"}))
    assert slash.name == folder


# ---- tasks and tensors -------------------------------------------------------------------------------------
def test_tasks_are_checked_against_the_pools_experts(family):
    pool = CausalLMPool(pool_of(family))
    assert pool.check_tasks(["code"]) == ["code"]
    unknown = r"^task 'nope' has no expert in the pool \(pool tasks: \['math', 'code'\]\)$"
    for call in (lambda: pool.check_tasks(["nope"]), lambda: pool.head("nope"), lambda: pool.expert_state("nope")):
        with pytest.raises(MergeError, match=unknown):
            call()


def test_the_states_and_task_vectors_are_the_saved_models_float32(family):
    pool, states = CausalLMPool(pool_of(family)), family["states"]
    keys = pool.merge_keys()
    assert keys == pool.hf.merge_keys() and set(keys) == set(states["base"])
    theta0 = pool.pretrained_state()
    expert = pool.expert_state("code")
    tau = pool.task_vector("code")
    assert list(theta0) == list(expert) == list(tau) == keys
    for key in keys:
        assert theta0[key].dtype == expert[key].dtype == tau[key].dtype == torch.float32
        assert torch.equal(theta0[key], states["base"][key])
        assert torch.equal(expert[key], states["code"][key])
        torch.testing.assert_close(tau[key], states["code"][key] - states["base"][key], rtol=0, atol=1e-7)
    streamed = list(pool.task_vectors(["code"]))
    assert [t for t, _ in streamed] == ["code"]
    assert all(torch.equal(streamed[0][1][k], tau[k]) for k in keys)
    assert [t for t, _ in pool.task_vectors()] == list(TASKS)


def test_the_fingerprints_are_the_folders_and_are_computed_once(family):
    pool = CausalLMPool(pool_of(family))
    root = family["root"]
    want = {"pretrained": file_fingerprint(root / "base"), "experts": {t: file_fingerprint(root / t) for t in TASKS}}
    first = pool.fingerprints()
    assert first == want and len(set(want["experts"].values()) | {want["pretrained"]}) == 3
    assert pool.fingerprints() is first  # cached: the folders are read once


# ---- the LM ------------------------------------------------------------------------------------------------
def test_the_lm_is_loaded_in_float32_in_eval_mode_and_frozen_whatever_the_stored_dtype(tmp_path):
    torch.manual_seed(5)
    half = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16)
    half.save_pretrained(str(tmp_path / "half"))
    stored = {k: v.clone() for k, v in half.state_dict().items()}
    pool = CausalLMPool(HFPool(tmp_path / "half", {"a": tmp_path / "half"}))
    model = pool.load_model()
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert not any(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and not p.requires_grad, name
        assert torch.equal(p, stored[name].float()), name


def test_build_encoder_loads_the_given_tensors_over_theta0(family):
    pool, states = CausalLMPool(pool_of(family)), family["states"]
    plain = pool.build_encoder().state_dict()
    assert all(torch.equal(plain[k], v) for k, v in states["base"].items())
    changed = {"model.norm.weight": states["base"]["model.norm.weight"] + 1.0}
    model = pool.build_encoder(changed)
    got = model.state_dict()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(got["model.norm.weight"], changed["model.norm.weight"])
    assert all(torch.equal(got[k], v) for k, v in states["base"].items() if k != "model.norm.weight")


def test_build_encoder_refuses_a_tensor_the_pool_does_not_merge_naming_the_first(family):
    pool = CausalLMPool(pool_of(family, exclude=[r"norm\.weight$"]))
    s = family["states"]["base"]
    state = {"lm_head.weight": s["lm_head.weight"], "model.norm.weight": s["model.norm.weight"],
             "model.layers.0.input_layernorm.weight": s["model.layers.0.input_layernorm.weight"]}
    message = r"^merged state dict has tensor 'model\.norm\.weight' that is not merged in this pool$"
    with pytest.raises(MergeError, match=message):
        pool.build_encoder(state)


# ---- export ------------------------------------------------------------------------------------------------
def test_export_writes_the_given_tensors_a_card_and_a_manifest_without_a_progress_bar(family, tmp_path, capsys):
    pool, states = CausalLMPool(pool_of(family)), family["states"]
    b, m, c = states["base"], states["math"], states["code"]
    merged = {k: b[k] + 0.5 * (m[k] - b[k]) - 0.25 * (c[k] - b[k]) for k in pool.merge_keys()}
    capsys.readouterr()
    out = pool.export(merged, tmp_path / "out")
    assert "adamerge export" not in capsys.readouterr().err  # no progress bar
    assert out == tmp_path / "out"
    tensors, methods = _folder_tensors(out)
    assert set(tensors) == set(merged) and methods == {"adamerging"}
    assert all(torch.equal(tensors[k], merged[k]) for k in merged)
    card = (out / "README.md").read_text()
    assert "tags:\n- merge\n- adamerge\n- adamerging\n" in card
    assert "# Merged with adamerge: `adamerging`" in card
    assert "- method: `adamerging` (test-time), arguments: `{}`" in card
    for task in TASKS:
        assert f"| {task} | `{family['root'] / task}` | full fine-tune |" in card
    assert read_manifest(out)["method"] == "adamerging"
    assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())["vocab_size"] == 64


def test_export_refuses_a_state_missing_tensors_naming_the_first_in_merge_order(family, tmp_path):
    pool = CausalLMPool(pool_of(family))
    keys = pool.merge_keys()
    state = {k: v for k, v in pool.pretrained_state().items() if k not in (keys[2], keys[5])}
    with pytest.raises(MergeError, match=f"^{re.escape(f'merged state dict is missing tensor {keys[2]!r}')}$"):
        pool.export(state, tmp_path / "out")
    assert not (tmp_path / "out").exists()
