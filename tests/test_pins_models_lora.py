"""Pins of adamerge.models.lora (issue #17): a PEFT LoRA adapter folder read as an expert, W_0 + s·B·A per tensor.

Adapters are written here by hand (safetensors + ``adapter_config.json`` in PEFT's layout, no peft import),
and every expected weight is recomputed here as ``W_0 + s · B @ A`` (transposed for an embedding or with
``fan_in_fan_out``) from the tensors that were saved, with s written out as a number.

The data are chosen so that the plausible wrong versions disagree:
- out ≠ in and V ≠ d everywhere (6×4 linears, a 10×4 embedding, a 4×6 Conv1D weight): a delta that is
  transposed when it should not be (or not when it should) has another shape and is refused;
- r=4, α=8 with ``rank_pattern`` giving one module rank 2 and ``alpha_pattern`` another α=3: each module
  has its own scale (4, 0.75, 2), so a pattern ignored, r and α swapped, α·r, α·√r or α/r for rsLoRA all
  change a weight; an ``alpha_pattern`` key ``layers.1.q`` must not match ``layers.11.q``;
- a config with neither ``r`` nor ``lora_alpha`` nor ``peft_type`` (r from A's rows, α = r, s = 1);
- row blocks read from the middle of a tensor (rows 1:4, 8:12), never from 0, so rows ignored or taken from
  the wrong factor show;
- the adapter folder also holds another ``.safetensors`` file, so the adapter weights must be found by name;
- saved full tensors (an embedding ``base_layer`` with 12 rows against the base's 10, a float32 norm over a
  bfloat16 base): shape is the adapter's, dtype the base's, values the saved ones plus the delta;
- the config is read under the C locale with a non-ASCII ``alpha_pattern`` key: it must be read as UTF-8.
Errors are compared whole (label, path, tensor and module names).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from adamerge.models.lora import ADAPTER_CONFIG, LoraExpert, _pattern_value, is_adapter_folder
from adamerge.models.safetensors_folder import FolderError, SafetensorsFolder

P = "base_model.model."
LABEL = "expert 'chat'"


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def base(tmp_path):
    g = _g(0)
    tensors = {"model.embed.weight": torch.randn(10, 4, generator=g),
               "model.layers.0.q.weight": torch.randn(6, 4, generator=g),
               "model.layers.1.q.weight": torch.randn(6, 4, generator=g),
               "model.layers.11.q.weight": torch.randn(6, 4, generator=g),
               "model.layers.0.v.weight": torch.randn(6, 4, generator=g),
               "model.c_attn.weight": torch.randn(4, 6, generator=g),
               "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16)}
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return SafetensorsFolder(folder, "base model"), tensors


def _adapter(folder, tensors: dict, config: dict | str):
    """An adapter folder: tensors (names without PEFT's prefix), its config, and an unrelated .safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({P + k: v.clone() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    save_file({"step": torch.zeros(1)}, str(folder / "optimizer.safetensors"))
    text = config if isinstance(config, str) else json.dumps(config, ensure_ascii=False)
    (folder / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
    return folder


def _ab(r: int, out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _g(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


# the factors of the main adapter: module → (A, B, scale as a number)
A0, B0 = _ab(2, 6, 4, 1)      # layers.0.q: rank 2 from rank_pattern, α=8 → 4
A1, B1 = _ab(4, 6, 4, 2)      # layers.1.q: rank 4, α=3 from alpha_pattern → 0.75
A11, B11 = _ab(4, 6, 4, 3)    # layers.11.q: rank 4, α=8 → 2 (the pattern 'layers.1.q' must not match)
AV, BV = _ab(4, 6, 4, 4)      # layers.0.v → 2
AE, BE = _ab(4, 4, 12, 5)     # embedding: A [r, V=12], B [d=4, r] → 2, delta (B A)ᵀ [12, 4]
EMBED_SAVED = torch.randn(12, 4, generator=_g(6))   # resized vocabulary: 12 rows over the base's 10
NORM_SAVED = torch.randn(4, generator=_g(7))        # a module saved whole (modules_to_save)
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"layers.0.q": 2},
          "alpha_pattern": {"layers.1.q": 3, "café": 5}, "use_dora": False, "layer_replication": None}


@pytest.fixture
def chat(tmp_path, base):
    tensors = {"model.layers.0.q.lora_A.weight": A0, "model.layers.0.q.lora_B.weight": B0,
               "model.layers.1.q.lora_A.weight": A1, "model.layers.1.q.lora_B.weight": B1,
               "model.layers.11.q.lora_A.weight": A11, "model.layers.11.q.lora_B.weight": B11,
               "model.layers.0.v.lora_A.weight": AV, "model.layers.0.v.lora_B.weight": BV,
               "model.embed.lora_embedding_A": AE, "model.embed.lora_embedding_B": BE,
               "model.embed.base_layer.weight": EMBED_SAVED, "model.norm.weight": NORM_SAVED}
    folder = _adapter(tmp_path / "chat", tensors, CONFIG)
    return LoraExpert(folder, base[0], LABEL), base[1]


def _want(base: dict) -> dict:
    return {"model.layers.0.q.weight": base["model.layers.0.q.weight"] + 4.0 * B0 @ A0,
            "model.layers.1.q.weight": base["model.layers.1.q.weight"] + 0.75 * B1 @ A1,
            "model.layers.11.q.weight": base["model.layers.11.q.weight"] + 2.0 * B11 @ A11,
            "model.layers.0.v.weight": base["model.layers.0.v.weight"] + 2.0 * BV @ AV,
            "model.embed.weight": EMBED_SAVED + 2.0 * (BE @ AE).t(),
            "model.norm.weight": NORM_SAVED,
            "model.c_attn.weight": base["model.c_attn.weight"]}


def test_is_adapter_folder_looks_for_the_adapter_config(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ADAPTER_CONFIG).write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "c" / ADAPTER_CONFIG).mkdir(parents=True)  # a folder by that name is no config
    assert [is_adapter_folder(tmp_path / n) for n in "abc"] == [True, False, False]
    assert is_adapter_folder(str(tmp_path / "a"))


def test_pattern_value_is_the_first_pattern_matching_the_end_of_the_dotted_name():
    pats = {"q": 1, "layers.0.q": 2, "v|k": 3}
    assert _pattern_value(pats, "model.layers.0.q", 9) == 1  # first in order wins
    assert _pattern_value({"layers.0.q": 2, "q": 1}, "model.layers.0.q", 9) == 2
    assert _pattern_value(pats, "model.layers.0.k", 9) == 3
    assert _pattern_value(pats, "model.layers.0.qq", 9) == 9  # a whole name part, not a suffix of one
    assert _pattern_value(pats, "model.q.out", 9) == 9        # the end of the name only
    assert _pattern_value(pats, "q", 9) == 1
    assert _pattern_value({}, "q", None) is None


def test_weights_are_base_plus_scaled_ba_per_module(chat):
    expert, base = chat
    want = _want(base)
    assert expert.label == LABEL and expert.config == CONFIG
    assert sorted(expert.keys()) == sorted(base) and "model.c_attn.weight" in expert and "lm_head.weight" not in expert
    assert expert.adapted() == sorted(set(want) - {"model.c_attn.weight"})
    for key, w in want.items():
        got = expert.get(key)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, w, rtol=0, atol=1e-5, msg=key)
    assert expert.delta("model.norm.weight") is None and expert.delta("model.c_attn.weight") is None
    torch.testing.assert_close(expert.delta("model.layers.0.q.weight"), 4.0 * B0 @ A0, rtol=0, atol=1e-5)
    torch.testing.assert_close(expert.delta("model.embed.weight"), 2.0 * (BE @ AE).t(), rtol=0, atol=1e-5)
    # the base's bfloat16 norm, unadapted elsewhere: the stored values in float32
    assert torch.equal(expert.get("model.c_attn.weight"), base["model.c_attn.weight"])


def test_shapes_are_the_saved_tensors_and_dtypes_the_bases(chat):
    expert, _ = chat
    assert expert.shape("model.embed.weight") == (12, 4)
    assert expert.shape("model.layers.0.q.weight") == (6, 4) and expert.shape("model.c_attn.weight") == (4, 6)
    assert expert.dtype("model.norm.weight") == torch.bfloat16 and expert.dtype("model.embed.weight") == torch.float32
    assert expert.side_files() == []
    assert repr(expert).endswith("5 LoRA weights, 2 full)")


@pytest.mark.parametrize("rows", [slice(1, 4), slice(3, 6)])
def test_row_blocks_are_those_rows_of_the_weight(chat, rows):
    expert, base = chat
    want = _want(base)
    for key in ("model.layers.0.q.weight", "model.layers.1.q.weight", "model.c_attn.weight"):
        torch.testing.assert_close(expert.get(key, rows), want[key][rows], rtol=0, atol=1e-5, msg=key)
    for block in (rows, slice(8, 12)):  # the embedding's rows are A's columns, on the saved 12-row table
        torch.testing.assert_close(expert.get("model.embed.weight", block), want["model.embed.weight"][block],
                                   rtol=0, atol=1e-5)
    torch.testing.assert_close(expert.delta("model.layers.0.v.weight", rows), (2.0 * BV @ AV)[rows], rtol=0, atol=1e-5)


def test_fan_in_fan_out_transposes_the_delta(tmp_path, base):
    a, b = _ab(4, 6, 4, 8)  # Conv1D weight [in=4, out=6]: delta (B A)ᵀ
    folder = _adapter(tmp_path / "gpt2", {"model.c_attn.lora_A.weight": a, "model.c_attn.lora_B.weight": b},
                      {"r": 4, "lora_alpha": 2, "fan_in_fan_out": True})
    expert = LoraExpert(folder, base[0], LABEL)
    want = base[1]["model.c_attn.weight"] + 0.5 * (b @ a).t()
    torch.testing.assert_close(expert.get("model.c_attn.weight"), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(expert.get("model.c_attn.weight", slice(1, 3)), want[1:3], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("config", "scale"), [
    ({}, 1.0),                                             # r from A's rows, α = r
    ({"r": 4, "lora_alpha": 6}, 1.5),
    ({"r": 4, "lora_alpha": 6, "use_rslora": True}, 3.0),  # α / √r
    ({"r": 4, "use_rslora": True}, 2.0),                   # α defaults to r: r / √r
    ({"r": 4, "lora_alpha": 6, "use_rslora": False, "peft_type": "LORA"}, 1.5),
])
def test_the_scale_from_the_config(tmp_path, base, config, scale):
    a, b = _ab(4, 6, 4, 9)
    folder = _adapter(tmp_path / "s", {"model.layers.0.v.lora_A.weight": a, "model.layers.0.v.lora_B.weight": b},
                      config)
    expert = LoraExpert(folder, base[0], LABEL)
    torch.testing.assert_close(expert.get("model.layers.0.v.weight"), base[1]["model.layers.0.v.weight"] + scale * b @ a,
                               rtol=0, atol=1e-5)


def test_rslora_with_rank_and_alpha_patterns(tmp_path, base):
    a, b = _ab(2, 6, 4, 10)
    cfg = {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v": 2}, "alpha_pattern": {"v": 6}}
    folder = _adapter(tmp_path / "p", {"model.layers.0.v.lora_A.weight": a, "model.layers.0.v.lora_B.weight": b}, cfg)
    got = LoraExpert(folder, base[0], LABEL).delta("model.layers.0.v.weight")
    torch.testing.assert_close(got, (6 / math.sqrt(2)) * b @ a, rtol=0, atol=1e-5)


def test_the_config_is_read_as_utf8_whatever_the_locale(tmp_path, base, c_locale):
    a, b = _ab(4, 6, 4, 11)
    folder = _adapter(tmp_path / "u", {"model.layers.0.v.lora_A.weight": a, "model.layers.0.v.lora_B.weight": b},
                      {"r": 4, "lora_alpha": 4, "alpha_pattern": {"café": 1}})
    assert LoraExpert(folder, base[0], LABEL).config["alpha_pattern"] == {"café": 1}


def _err(folder, base, match):
    with pytest.raises(FolderError, match="^" + re.escape(match) + "$"):
        LoraExpert(folder, base[0], LABEL)


def test_the_adapter_weights_file_is_required_by_name(tmp_path, base):
    folder = _adapter(tmp_path / "x", {}, {})
    (folder / "adapter_model.safetensors").unlink()
    _err(folder, base, f"{LABEL}: {folder} has no adapter_model.safetensors")


JSON_ERROR = "Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"


@pytest.mark.parametrize(("text", "tail"), [("{not json", JSON_ERROR), ('{"peft_type": "IA3"}', None)])
def test_unreadable_or_non_lora_configs_are_refused(tmp_path, base, text, tail):
    folder = _adapter(tmp_path / "x", {}, text)
    path = folder / ADAPTER_CONFIG
    if tail:
        _err(folder, base, f"{LABEL}: {path} is not readable JSON ({tail}")
    else:
        _err(folder, base, f"{LABEL}: {path}: peft_type 'IA3' is not supported (LoRA adapters only)")


@pytest.mark.parametrize(("option", "value", "what"), [
    ("use_dora", True, "DoRA"), ("lora_bias", True, "LoRA biases"), ("layer_replication", [[0, 1]], "replicated layers"),
    ("target_parameters", ["w"], "LoRA on parameters"), ("trainable_token_indices", [3], "trainable token indices"),
    ("use_qalora", True, "QA-LoRA"), ("alora_invocation_tokens", [1], "aLoRA")])
def test_variants_that_are_not_w_plus_sba_are_refused_by_option(tmp_path, base, option, value, what):
    folder = _adapter(tmp_path / "x", {}, {"r": 4, option: value})
    _err(folder, base, f"{LABEL}: {folder / ADAPTER_CONFIG}: {option}={value!r} ({what}) is not supported: "
                       "its weights are not W + s·B·A")


def test_tensors_that_are_not_lora_a_b_or_adapt_nothing_are_refused(tmp_path, base):
    a, b = _ab(2, 6, 4, 12)
    name = P + "model.layers.0.q.lora_magnitude_vector.weight"
    folder = _adapter(tmp_path / "m", {"model.layers.0.q.lora_magnitude_vector.weight": torch.ones(6)}, {})
    _err(folder, base, f"{LABEL}: adapter tensor {name!r} is not a LoRA A/B weight of a linear or embedding layer "
                       "(only those are supported)")
    folder = _adapter(tmp_path / "o", {"model.layers.7.q.lora_A.weight": a, "model.layers.7.q.lora_B.weight": b}, {})
    _err(folder, base, f"{LABEL}: adapter tensor '{P}model.layers.7.q.lora_A.weight' adapts 'model.layers.7.q.weight', "
                       f"which the base model {base[0].source} does not have (an adapter of another model?)")
    folder = _adapter(tmp_path / "h", {"head.base_layer.weight": torch.ones(2)}, {})
    _err(folder, base, f"{LABEL}: adapter tensor '{P}head.base_layer.weight' adapts 'head.weight', which the base "
                       f"model {base[0].source} does not have (an adapter of another model?)")


@pytest.mark.parametrize("part", ["lora_A", "lora_B"])
def test_a_module_with_one_factor_is_refused(tmp_path, base, part):
    a, b = _ab(2, 6, 4, 13)
    folder = _adapter(tmp_path / part, {f"model.layers.0.q.{part}.weight": a if part == "lora_A" else b,
                                        "model.layers.0.v.lora_A.weight": a, "model.layers.0.v.lora_B.weight": b}, {})
    _err(folder, base, f"{LABEL}: module 'model.layers.0.q' has only one of its LoRA A/B weights")


def test_a_rank_other_than_the_config_s_is_refused(tmp_path, base):
    a, b = _ab(2, 6, 4, 14)
    tensors = {"model.layers.0.q.lora_A.weight": a, "model.layers.0.q.lora_B.weight": b}
    _err(_adapter(tmp_path / "r", tensors, {"r": 3}), base,
         f"{LABEL}: model.layers.0.q: lora_A has rank 2 but the adapter config says r=3")
    _err(_adapter(tmp_path / "p", tensors, {"r": 2, "rank_pattern": {"layers.0.q": 4}}), base,
         f"{LABEL}: model.layers.0.q: lora_A has rank 2 but the adapter config says r=4")


def test_a_delta_of_another_shape_is_refused_when_read(tmp_path, base):
    a, b = _ab(2, 5, 4, 15)  # B has 5 rows, the weight 6
    folder = _adapter(tmp_path / "d", {"model.layers.0.q.lora_A.weight": a, "model.layers.0.q.lora_B.weight": b}, {})
    expert = LoraExpert(folder, base[0], LABEL)
    with pytest.raises(FolderError, match=re.escape(f"{LABEL}: the LoRA delta of 'model.layers.0.q.weight' has shape "
                                                    "(5, 4) but the weight (6, 4)") + "$"):
        expert.get("model.layers.0.q.weight")


def test_the_default_label_is_adapter(tmp_path, base):
    folder = _adapter(tmp_path / "x", {}, {"r": 4, "use_dora": True})
    with pytest.raises(FolderError, match=re.escape(f"adapter: {folder / ADAPTER_CONFIG}: use_dora=True (DoRA)")):
        LoraExpert(folder, base[0])
    assert LoraExpert(_adapter(tmp_path / "y", {}, {}), base[0]).label == "adapter"
