"""Pins for the activation a checkpoint records (adamerge/models/activation.py): every reader returns exactly
the documented :class:`Activation` (name, source and what the source says, compared whole), the refusal
message and its fix are matched whole, and :func:`export_metadata` writes exactly the documented keys.

The data are chosen so that the near misses disagree: an open_clip ``local-dir`` config with ``quick_gelu``
true (a reader that drops it, or reads another key, says GELU) and one without the key at all (a default of
True would say QuickGELU); an HF ``hidden_act`` that names no GELU (``relu``: an Activation named None must
not come back) and one that is not a string (a list cannot even be looked up); a CLIP whose two towers run
different activations (a reader that does not prefer the visual tower, or mixes both, answers GELU or
nothing); model names whose counterpart open_clip does not list (a fix naming it would send the user to a
model that does not exist); an explicit model config that contradicts open_clip's registry for the same
name (a check that looks the name up again answers the other way); export metadata of a config without
``quick_gelu`` (it must become an explicit ``false``) and with a truthy non-bool ``1`` (an explicit
``true``)."""

from __future__ import annotations

import json
import locale

import open_clip
import pytest
import torch
from conftest import TINY_EMBED, TINY_TEXT, TINY_VISION, make_tiny_clip
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

from adamerge.models.activation import (
    GELU,
    QUICK_GELU,
    Activation,
    ActivationMismatchError,
    activation_of,
    activation_of_module,
    check_activation,
    configured_activation,
    export_metadata,
)

UNLISTED = "adamerge-pin-act-unlisted"  # open_clip lists neither this name nor UNLISTED + "-quickgelu"


def _open_clip_folder(path, model_cfg, *, raw: bytes | None = None):
    """An open_clip ``local-dir`` folder: only ``open_clip_config.json`` (no HF ``config.json``)."""
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, ensure_ascii=False).encode() if raw is None else raw
    (path / "open_clip_config.json").write_bytes(text)
    return path


def _hf_config(path, cfg):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# ---- open_clip local-dir folders --------------------------------------------------------------------
def test_open_clip_config_quick_gelu_is_read_whole(tmp_path):
    """``quick_gelu: true`` says QuickGELU; the key absent says GELU (as open_clip builds it), and what the
    file says is written back as read."""
    cfg = {"embed_dim": TINY_EMBED, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}
    quick = _open_clip_folder(tmp_path / "quick", {**cfg, "quick_gelu": True})
    plain = _open_clip_folder(tmp_path / "plain", cfg)
    assert activation_of(quick) == Activation(QUICK_GELU, str(quick), "open_clip_config.json quick_gelu=True")
    assert activation_of(str(plain)) == Activation(GELU, str(plain), "open_clip_config.json quick_gelu=False")


def test_open_clip_config_without_a_model_cfg_records_nothing(tmp_path):
    """A config with no ``model_cfg`` mapping, or that is no JSON at all, records nothing: None, not GELU."""
    assert activation_of(_open_clip_folder(tmp_path / "list", [True])) is None
    assert activation_of(_open_clip_folder(tmp_path / "none", None)) is None
    assert activation_of(_open_clip_folder(tmp_path / "bad", None, raw=b"{not json")) is None
    assert activation_of(_open_clip_folder(tmp_path / "array", None, raw=b"[1, 2]")) is None
    (tmp_path / "empty").mkdir()
    assert activation_of(tmp_path / "empty") is None


def test_open_clip_config_is_read_as_utf8_under_any_locale(tmp_path):
    """JSON is UTF-8: a config naming a model with a non-ASCII character reads the same when the process
    runs in an ASCII locale (open() without an encoding would decode with the locale's codec and fail)."""
    folder = _open_clip_folder(tmp_path / "utf8", {"name": "café", "quick_gelu": True})
    assert "é".encode() in (folder / "open_clip_config.json").read_bytes()  # written as UTF-8, not escaped
    old = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        found = activation_of(folder)
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
    assert found == Activation(QUICK_GELU, str(folder), "open_clip_config.json quick_gelu=True")


def test_an_hf_config_is_read_before_an_open_clip_config(tmp_path):
    folder = _open_clip_folder(tmp_path / "both", {"quick_gelu": True})
    _hf_config(folder, {"hidden_act": "gelu"})
    assert activation_of(folder) == Activation(GELU, str(folder), "config.json hidden_act='gelu'")


# ---- HF folders -------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"])
def test_hf_tanh_approximations_count_as_gelu(tmp_path, act):
    folder = _hf_config(tmp_path / act, {"vision_config": {"hidden_act": act}})
    assert activation_of(folder) == Activation(GELU, str(folder), f"config.json hidden_act='{act}'")


def test_hf_hidden_act_that_names_no_gelu_records_nothing(tmp_path):
    """``relu``, a missing key and a non-string value (a list: unhashable, so it must not be looked up)
    record nothing."""
    for name, cfg in [("relu", {"hidden_act": "relu"}), ("absent", {"hidden_size": 32}),
                      ("list", {"hidden_act": ["quick_gelu"]}), ("nested", {"vision_config": {"hidden_act": {}}})]:
        assert activation_of(_hf_config(tmp_path / name, cfg)) is None, name


# ---- adamerge exports (.safetensors metadata) ------------------------------------------------------
def _safetensors(path, metadata):
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


def test_metadata_activation_is_read_whole(tmp_path):
    path = _safetensors(tmp_path / "act.safetensors", {"activation": GELU, "open_clip_config": '{"quick_gelu": true}'})
    assert activation_of(path) == Activation(GELU, str(path), "safetensors metadata activation='gelu'")


def test_metadata_open_clip_config_is_read_whole(tmp_path):
    """Without a known ``activation`` (absent, or ``relu``), ``open_clip_config``'s ``quick_gelu`` decides;
    without the key it is GELU, and a missing ``open_clip_model`` is shown as '?'."""
    quick = _safetensors(tmp_path / "quick.safetensors",
                         {"activation": "relu", "open_clip_model": "m1", "open_clip_config": '{"quick_gelu": true}'})
    assert activation_of(quick) == Activation(
        QUICK_GELU, str(quick), "safetensors metadata open_clip_model='m1' with quick_gelu=True")
    plain = _safetensors(tmp_path / "plain.safetensors", {"open_clip_config": '{"embed_dim": 16}'})
    assert activation_of(plain) == Activation(
        GELU, str(plain), "safetensors metadata open_clip_model='?' with quick_gelu=False")


def test_metadata_without_a_readable_config_records_nothing(tmp_path):
    for name, meta in [("none", None), ("other", {"format": "pt"}), ("bad", {"open_clip_config": "{not json"}),
                       ("list", {"open_clip_config": "[true]"})]:
        assert activation_of(_safetensors(tmp_path / f"{name}.safetensors", meta)) is None, name


def test_only_a_safetensors_suffix_is_read_as_safetensors(tmp_path):
    """A safetensors file under another suffix is not read as one (the checkpoint reader does not load it
    as safetensors either), and a missing ``.safetensors`` path records nothing."""
    meta = {"activation": QUICK_GELU}
    assert activation_of(_safetensors(tmp_path / "weights.bin", meta)) is None
    assert activation_of(tmp_path / "missing.safetensors") is None


# ---- pickled modules --------------------------------------------------------------------------------
def _mixed(visual_quick: bool) -> open_clip.CLIP:
    """A tiny CLIP whose visual tower runs one activation and whose text tower runs the other."""
    clip = make_tiny_clip()
    tower = clip.visual.transformer if visual_quick else clip.transformer
    for block in tower.resblocks:
        block.mlp.gelu = QuickGELU()
    return clip


def test_the_visual_tower_decides_over_the_text_tower():
    assert activation_of_module(_mixed(True)) == Activation(
        QUICK_GELU, "module", "its pickled modules are open_clip.transformer.QuickGELU")
    assert activation_of_module(_mixed(False), "enc.pt") == Activation(
        GELU, "enc.pt", "its pickled modules are torch.nn.modules.activation.GELU")
    # the text tower alone (no visual tower) still records its own
    assert activation_of_module(_mixed(False).transformer).name == QUICK_GELU


def test_both_activations_in_the_visual_tower_record_nothing():
    clip = make_tiny_clip()
    clip.visual.transformer.resblocks[0].mlp.gelu = QuickGELU()  # block 1 keeps nn.GELU
    assert activation_of_module(clip) is None
    assert activation_of_module(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) is None


# ---- the check and its fix --------------------------------------------------------------------------
def _refusal(model_name, cfg, needed):
    with pytest.raises(ActivationMismatchError) as err:
        check_activation(model_name, cfg, Activation(needed, "ck.safetensors", "it says so"))
    return str(err.value)


def test_refusal_message_and_fix_are_whole():
    assert _refusal("ViT-B-32", None, QUICK_GELU) == (
        "ck.safetensors: it says so, so it needs QuickGELU, but open_clip model 'ViT-B-32' runs GELU "
        "(quick_gelu=False); use model_name 'ViT-B-32-quickgelu'")
    assert _refusal("ViT-B-32-quickgelu", None, GELU) == (
        "ck.safetensors: it says so, so it needs GELU, but open_clip model 'ViT-B-32-quickgelu' runs QuickGELU "
        "(quick_gelu=True); use model_name 'ViT-B-32'")


def test_fix_without_a_listed_counterpart_names_the_config_change():
    """Neither UNLISTED nor UNLISTED-quickgelu is an open_clip model: the fix is a config change, never a name."""
    assert _refusal(UNLISTED, {"quick_gelu": False}, QUICK_GELU) == (
        f"ck.safetensors: it says so, so it needs QuickGELU, but open_clip model '{UNLISTED}' runs GELU "
        "(quick_gelu=False); use an open_clip model config with \"quick_gelu\": true (like open_clip's "
        "'-quickgelu' models)")
    assert _refusal(f"{UNLISTED}-quickgelu", {"quick_gelu": True}, GELU) == (
        f"ck.safetensors: it says so, so it needs GELU, but open_clip model '{UNLISTED}-quickgelu' runs QuickGELU "
        "(quick_gelu=True); use an open_clip model config without \"quick_gelu\": true")
    # a listed QuickGELU name without the suffix: it is no fix for itself
    assert _refusal("ViT-B-32", {"quick_gelu": True}, GELU).endswith(
        "runs QuickGELU (quick_gelu=True); use an open_clip model config without \"quick_gelu\": true")


def test_an_explicit_model_config_is_what_is_checked():
    """ViT-B-32 is GELU in open_clip's registry; a config given for it with quick_gelu true is what counts."""
    check_activation("ViT-B-32", {"quick_gelu": True}, Activation(QUICK_GELU, "f", "s"))
    check_activation("ViT-B-32", None, Activation(GELU, "f", "s"))
    check_activation("ViT-B-32", None, None)  # nothing recorded: nothing checked
    check_activation(UNLISTED, None, None)  # not even the model is looked up


def test_configured_activation():
    assert configured_activation("ViT-B-32") == GELU
    assert configured_activation("ViT-B-32-quickgelu") == QUICK_GELU
    assert configured_activation("ViT-B-32", {"quick_gelu": 1}) == QUICK_GELU
    assert configured_activation("ViT-B-32-quickgelu", {"embed_dim": 512}) == GELU
    with pytest.raises(ValueError, match=rf"^unknown open_clip model '{UNLISTED}'; register a config JSON with "
                                         r"model_config=$"):
        configured_activation(UNLISTED)


# ---- export metadata --------------------------------------------------------------------------------
def test_export_metadata_keys_are_exactly_the_documented_ones():
    clip = make_tiny_clip()  # nn.GELU throughout
    assert export_metadata(clip) == {"activation": GELU}
    assert export_metadata(nn.Linear(2, 2)) == {}
    cfg = {"embed_dim": TINY_EMBED, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}
    meta = export_metadata(clip, "tiny", cfg)
    assert set(meta) == {"activation", "open_clip_model", "open_clip_config"}
    assert meta["activation"] == GELU and meta["open_clip_model"] == "tiny"
    assert json.loads(meta["open_clip_config"]) == {**cfg, "quick_gelu": False}  # made explicit
    assert json.loads(export_metadata(clip, "tiny", {"quick_gelu": 1})["open_clip_config"]) == {"quick_gelu": True}
    assert cfg == {"embed_dim": TINY_EMBED, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}  # not changed


def test_export_metadata_looks_a_named_model_up():
    meta = export_metadata(nn.Linear(2, 2), "ViT-B-32-quickgelu")
    assert json.loads(meta["open_clip_config"]) == open_clip.get_model_config("ViT-B-32-quickgelu")
    assert json.loads(meta["open_clip_config"])["quick_gelu"] is True
    assert export_metadata(nn.Linear(2, 2), UNLISTED) == {"open_clip_model": UNLISTED}
