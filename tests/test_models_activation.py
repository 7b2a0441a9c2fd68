"""A checkpoint's activation, read wherever its source records it (HF ``hidden_act``, pickled
task_vectors modules, adamerge export metadata, open_clip tags), is checked against the configured
model: a match loads, a mismatch is refused naming the file, both activations and the model to use,
and a plain state dict (which records nothing) loads."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import TINY_EMBED, TINY_TEXT, TINY_VISION, make_tiny_pool
from safetensors import safe_open
from safetensors.torch import save_file
from test_models_checkpoints import ImageEncoder, write_hf_folder
from torch import nn

from adamerge.models.activation import (
    GELU,
    QUICK_GELU,
    ActivationMismatchError,
    activation_of,
    activation_of_module,
    activation_of_tag,
)
from adamerge.models.checkpoints import load_visual_state
from adamerge.models.export import export_merged
from adamerge.models.open_clip_pool import OpenCLIPPool, load_clip, register_model_config

PLAIN = "adamerge-act-test"  # GELU
QUICK = "adamerge-act-test-quickgelu"  # QuickGELU: the name _fix suggests for PLAIN, and back
TASKS = {"act_colors": {"classnames": ["red", "green"], "templates": ["a {} thing."]},
         "act_shapes": {"classnames": ["circle", "square"], "templates": ["a {}."]}}


class QuickGELU(nn.Module):
    """A QuickGELU class whose module will not import when unpickled (as open_clip 2.0.2's
    ``open_clip.model.QuickGELU`` may not): it comes back as a stand-in, still named QuickGELU."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@pytest.fixture(scope="module", autouse=True)
def _configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("act-configs")
    for name, quick in ((PLAIN, False), (QUICK, True)):
        cfg = {"embed_dim": TINY_EMBED, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}
        (root / f"{name}.json").write_text(json.dumps({**cfg, "quick_gelu": True} if quick else cfg))
        register_model_config(root / f"{name}.json")


def _clip(quick: bool, seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=TINY_EMBED, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT, quick_gelu=quick).eval()


def _ref(clip):
    return {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}


def _hf_folder(path, hidden_act, kind="vision"):
    folder = write_hf_folder(path, _clip(hidden_act == "quick_gelu", seed=1), kind=kind)
    cfg = json.loads((folder / "config.json").read_text())
    if kind == "clip":
        cfg["vision_config"] = {**cfg["vision_config"], "hidden_act": hidden_act}
    else:
        cfg["hidden_act"] = hidden_act
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _refused(path, says, needs, model, runs, fix):
    """The pattern a refusal must match: file, what it says, both activations, the model, the fix."""
    return (rf"{path}.*{says}.*needs {needs}, but open_clip model '{model}' runs {runs}.*"
            rf"use model_name '{fix}'")


# ---- HF folders -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vision", "clip"])
def test_hf_hidden_act(tmp_path, kind):
    quick = _hf_folder(tmp_path / "quick", "quick_gelu", kind)
    plain = _hf_folder(tmp_path / "plain", "gelu", kind)
    assert activation_of(quick).name == QUICK_GELU and activation_of(plain).name == GELU
    ref = _ref(_clip(False))
    proj = ref["proj"]
    assert set(load_visual_state(quick, reference=ref, projection=proj, model_name=QUICK)) == set(ref)
    assert set(load_visual_state(plain, reference=ref, projection=proj, model_name=PLAIN)) == set(ref)
    with pytest.raises(ActivationMismatchError,
                       match=_refused("quick", "hidden_act='quick_gelu'", "QuickGELU", PLAIN, "GELU", QUICK)):
        load_visual_state(quick, reference=ref, projection=proj, model_name=PLAIN)
    with pytest.raises(ActivationMismatchError,
                       match=_refused("plain", "hidden_act='gelu'", "GELU", QUICK, "QuickGELU", PLAIN)):
        load_visual_state(plain, reference=ref, projection=proj, model_name=QUICK)


def test_hf_clip_model_pretrained_folder_is_checked(tmp_path):
    folder = _hf_folder(tmp_path / "clip-vit-tiny", "quick_gelu", kind="clip")
    with pytest.raises(ActivationMismatchError, match=r"clip-vit-tiny.*hidden_act='quick_gelu'.*'adamerge-act-test'"):
        load_clip(PLAIN, str(folder))


# ---- task_vectors pickles ---------------------------------------------------------------------------
def _pickle(path, clip):
    torch.save(ImageEncoder(clip), path)
    return path


def test_pickled_image_encoder(tmp_path):
    quick = _pickle(tmp_path / "quick_finetuned.pt", _clip(True, seed=2))
    plain = _pickle(tmp_path / "plain_finetuned.pt", _clip(False, seed=2))
    ref = _ref(_clip(False))
    loaded = load_visual_state(quick, reference=ref, allow_pickle=True, model_name=QUICK)
    torch.testing.assert_close(loaded["proj"], _clip(True, seed=2).visual.proj.detach())
    load_visual_state(plain, reference=ref, allow_pickle=True, model_name=PLAIN)
    with pytest.raises(ActivationMismatchError, match=_refused(
            "quick_finetuned.pt", r"pickled modules are open_clip\.transformer\.QuickGELU", "QuickGELU", PLAIN,
            "GELU", QUICK)):
        load_visual_state(quick, reference=ref, allow_pickle=True, model_name=PLAIN)
    with pytest.raises(ActivationMismatchError, match=r"plain_finetuned.pt.*torch\.nn\..*GELU.*needs GELU"):
        load_visual_state(plain, reference=ref, allow_pickle=True, model_name=QUICK)
    assert set(load_visual_state(quick, reference=ref, allow_pickle=True)) == set(ref)  # no model: no check


def test_pickled_activation_class_that_no_longer_imports(tmp_path):
    clip = _clip(False, seed=3)
    for block in clip.visual.transformer.resblocks:
        block.mlp.gelu = QuickGELU()
    path = _pickle(tmp_path / "zeroshot.pt", clip)
    raw = path.read_bytes()
    assert b"test_models_activation" in raw
    path.write_bytes(raw.replace(b"test_models_activation", b"src_modeling_missing_x"))  # same length
    ref = _ref(_clip(False))
    with pytest.warns(UserWarning, match=r"src_modeling_missing_x\.QuickGELU"):
        load_visual_state(path, reference=ref, allow_pickle=True, model_name=QUICK)
    with pytest.warns(UserWarning), pytest.raises(ActivationMismatchError,
                                                  match=r"src_modeling_missing_x\.QuickGELU.*needs QuickGELU"):
        load_visual_state(path, reference=ref, allow_pickle=True, model_name=PLAIN)


def test_activation_of_module():
    assert activation_of_module(_clip(True)).name == QUICK_GELU
    assert activation_of_module(_clip(False).visual).name == GELU
    assert activation_of_module(nn.Linear(2, 2)) is None


# ---- adamerge exports and plain state dicts ---------------------------------------------------------
def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_export_records_model_and_is_checked_on_reload(tmp_path):
    clip = _clip(True, seed=4)
    path = export_merged(clip, _ref(clip), tmp_path / "merged.safetensors", model_name=QUICK)
    meta = _metadata(path)
    assert meta["activation"] == QUICK_GELU and meta["open_clip_model"] == QUICK
    assert json.loads(meta["open_clip_config"])["quick_gelu"] is True
    ref = _ref(_clip(False))
    load_visual_state(path, reference=ref, model_name=QUICK)
    with pytest.raises(ActivationMismatchError, match=_refused(
            "merged.safetensors", "metadata activation='quick_gelu'", "QuickGELU", PLAIN, "GELU", QUICK)):
        load_visual_state(path, reference=ref, model_name=PLAIN)
    load_clip(QUICK, str(path))  # as pretrained
    with pytest.raises(ActivationMismatchError, match="merged.safetensors"):
        load_clip(PLAIN, str(path))
    # a GELU model without a name still records its activation
    bare = export_merged(_clip(False), _ref(_clip(False)), tmp_path / "bare.safetensors")
    assert _metadata(bare)["activation"] == GELU and "open_clip_model" not in _metadata(bare)
    with pytest.raises(ActivationMismatchError, match=r"bare.safetensors.*needs GELU.*use model_name 'adamerge-act-test'"):
        load_visual_state(bare, model_name=QUICK)


def test_config_metadata_without_activation_key_is_read(tmp_path):
    clip = _clip(False)
    path = tmp_path / "older.safetensors"
    save_file(clip.visual.state_dict(), str(path),
              metadata={"open_clip_model": QUICK, "open_clip_config": json.dumps({"quick_gelu": True})})
    assert activation_of(path).name == QUICK_GELU
    with pytest.raises(ActivationMismatchError, match=f"open_clip_model='{QUICK}' with quick_gelu=True"):
        load_visual_state(path, model_name=PLAIN)


def test_base_pool_export_records_activation(tmp_path):
    pool = make_tiny_pool()
    path = pool.export(pool.expert_state("task0"), tmp_path / "enc.safetensors")
    assert _metadata(path)["activation"] == GELU
    with pytest.raises(ActivationMismatchError, match="enc.safetensors"):
        load_visual_state(path, reference=pool.pretrained_state(), model_name=QUICK)


def test_plain_state_dict_records_nothing_and_loads(tmp_path):
    clip = _clip(True)
    st = tmp_path / "plain.safetensors"
    save_file(clip.visual.state_dict(), str(st))
    pt = tmp_path / "plain.pt"
    torch.save(clip.visual.state_dict(), pt)
    for path in (st, pt):
        assert activation_of(path) is None
        for model in (PLAIN, QUICK):
            load_visual_state(path, reference=_ref(clip), model_name=model)


# ---- open_clip pretrained tags ----------------------------------------------------------------------
def test_tags_from_open_clip_metadata():
    assert activation_of_tag("ViT-B-32", "openai").name == QUICK_GELU
    assert activation_of_tag("ViT-B-32-quickgelu", "openai").name == QUICK_GELU
    assert activation_of_tag("ViT-B-32", "laion2b_s34b_b79k").name == GELU
    assert activation_of_tag("ViT-B-32", "no-such-tag") is None


def test_openai_tag_with_plain_vit_is_refused_before_any_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before the check")

    monkeypatch.setattr(open_clip, "create_model", no_download)
    with pytest.raises(ActivationMismatchError, match=_refused(
            "open_clip pretrained tag 'openai'", "quick_gelu=True", "QuickGELU", "ViT-B-32", "GELU",
            "ViT-B-32-quickgelu")):
        load_clip("ViT-B-32", "openai")


# ---- the pool: every load path --------------------------------------------------------------------
def test_pool_checks_pretrained_and_every_expert(tmp_path):
    base = _clip(True, seed=0)
    pretrained = export_merged(base, _ref(base), tmp_path / "pretrained.safetensors", model_name=QUICK)
    experts = {"act_colors": str(_pickle(tmp_path / "colors.pt", _clip(True, seed=5))),
               "act_shapes": str(_hf_folder(tmp_path / "shapes_hf", "quick_gelu"))}
    pool = OpenCLIPPool(QUICK, str(pretrained), experts, allow_pickle=True, task_info=TASKS)
    assert [t for t, _ in pool.task_vectors()] == list(TASKS)
    out = pool.export(pool.pretrained_state(), tmp_path / "out" / "merged.safetensors")
    assert _metadata(out)["open_clip_model"] == QUICK
    # the pretrained file: refused
    with pytest.raises(ActivationMismatchError, match=r"pretrained.safetensors.*'adamerge-act-test' runs GELU"):
        OpenCLIPPool(PLAIN, str(pretrained), experts, allow_pickle=True, task_info=TASKS)
    plain_base = tmp_path / "plain_pretrained.safetensors"
    save_file(_clip(False).state_dict(), str(plain_base))
    # an HF expert: refused when the pool is built, naming the task
    with pytest.raises(ActivationMismatchError, match=r"expert for task 'act_shapes'.*shapes_hf.*hidden_act"):
        OpenCLIPPool(PLAIN, str(plain_base), experts, allow_pickle=True, task_info=TASKS)
    # a pickled expert: refused when it is read
    pool = OpenCLIPPool(PLAIN, str(plain_base), {"act_colors": experts["act_colors"]}, allow_pickle=True,
                        task_info=TASKS)
    with pytest.raises(ActivationMismatchError, match=r"colors.pt.*QuickGELU.*'adamerge-act-test-quickgelu'"):
        pool.expert_state("act_colors")


def test_a_base_merge_file_is_checked_against_the_pools_model(tmp_path):
    """Surgery / WEMoE build on a merged file: an export made for the other activation is refused."""
    from adamerge.systems.base_merge import base_merge_state

    base = _clip(True, seed=0)
    pretrained = export_merged(base, _ref(base), tmp_path / "pretrained.safetensors", model_name=QUICK)
    experts = {"act_colors": str(_pickle(tmp_path / "colors.pt", _clip(True, seed=5)))}
    pool = OpenCLIPPool(QUICK, str(pretrained), experts, allow_pickle=True, task_info=TASKS)
    plain = _clip(False, seed=1)
    gelu_export = export_merged(plain, _ref(plain), tmp_path / "gelu_run" / "merged.safetensors", model_name=PLAIN)
    with pytest.raises(ActivationMismatchError, match=r"merged.safetensors.*GELU"):
        base_merge_state(pool, str(gelu_export))
    same = pool.export(pool.pretrained_state(), tmp_path / "ok" / "merged.safetensors")
    state = base_merge_state(pool, str(same))
    assert all(torch.equal(state[k], v) for k, v in pool.pretrained_state().items())
