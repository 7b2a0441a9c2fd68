"""Checkpoint formats: every supported layout round-trips a tiny open_clip visual tower exactly;
bad files raise CheckpointError naming the file (and key), and saving is atomic."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny_clip
from safetensors.torch import save_file
from torch import nn

from adamerge.merging.task_vectors import MergeError
from adamerge.models import checkpoints as ck
from adamerge.models.checkpoints import (
    CheckpointError,
    PickledCheckpointError,
    load_visual_state,
    read_state_dict,
    save_state_dict,
)


class ImageEncoder(nn.Module):
    """Stand-in for task_vectors' src.modeling.ImageEncoder: the CLIP under ``.model``, text tower
    partly deleted (task_vectors drops ``transformer`` but keeps the embeddings), extra attributes."""

    def __init__(self, clip):
        super().__init__()
        self.model = clip
        del self.model.transformer
        self.train_preprocess = None

    def forward(self, images):
        return self.model.encode_image(images)


def _images(n=3, seed=7):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _visual_sd(clip):
    return {k: v.clone() for k, v in clip.visual.state_dict().items()}


def _assert_same_outputs(state, source_clip):
    """Load ``state`` into a differently-initialised tiny visual tower: outputs must equal the source's."""
    target = make_tiny_clip(seed=123).visual
    assert not torch.allclose(target(_images()), source_clip.visual(_images()))
    target.load_state_dict(state, strict=True)
    torch.testing.assert_close(target(_images()), source_clip.visual(_images()), rtol=0, atol=0)


def hf_resblock(sd: dict, r: str, h: str, out: dict) -> None:
    """One open_clip residual block (keys under ``r``) → HF CLIP encoder-layer keys under ``h``, into ``out``."""
    for kind in ("weight", "bias"):
        q, k, v = sd[r + f"attn.in_proj_{kind}"].chunk(3)
        out[h + f"self_attn.q_proj.{kind}"] = q.clone()
        out[h + f"self_attn.k_proj.{kind}"] = k.clone()
        out[h + f"self_attn.v_proj.{kind}"] = v.clone()
        out[h + f"self_attn.out_proj.{kind}"] = sd[r + f"attn.out_proj.{kind}"]
        out[h + f"layer_norm1.{kind}"] = sd[r + f"ln_1.{kind}"]
        out[h + f"layer_norm2.{kind}"] = sd[r + f"ln_2.{kind}"]
        out[h + f"mlp.fc1.{kind}"] = sd[r + f"mlp.c_fc.{kind}"]
        out[h + f"mlp.fc2.{kind}"] = sd[r + f"mlp.c_proj.{kind}"]


def to_hf(visual: dict, projection: bool = True) -> dict:
    """open_clip visual keys → HF CLIPVisionModel keys (the inverse mapping, written independently)."""
    out = {
        "vision_model.embeddings.class_embedding": visual["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": visual["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": visual["positional_embedding"],
        "vision_model.embeddings.position_ids": torch.arange(visual["positional_embedding"].shape[0])[None],
        "vision_model.pre_layrnorm.weight": visual["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": visual["ln_pre.bias"],
        "vision_model.post_layernorm.weight": visual["ln_post.weight"],
        "vision_model.post_layernorm.bias": visual["ln_post.bias"],
    }
    n_layers = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
    for i in range(n_layers):
        hf_resblock(visual, f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.", out)
    if projection:
        out["visual_projection.weight"] = visual["proj"].t().contiguous()
    return out


HF_VISION_CONFIG = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": 16, "patch_size": 8, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 16,
}


def write_hf_folder(folder, clip, kind="vision", fmt="safetensors"):
    folder.mkdir()
    visual = _visual_sd(clip)
    if kind in ("vision", "vision_bare"):
        state = to_hf(visual, projection=False)
        if kind == "vision_bare":  # transformers >= 5 drops the vision_model. prefix
            state = {k.removeprefix("vision_model."): v for k, v in state.items()}
        cfg = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **HF_VISION_CONFIG}
    else:
        state = to_hf(visual, projection=True)
        state["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 32)
        state["text_projection.weight"] = torch.randn(16, 32)
        state["logit_scale"] = torch.tensor(4.6)
        cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": HF_VISION_CONFIG}
    (folder / "config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    elif fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:  # two shards + index, as HF writes big models
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: state[k] for k in ks}, str(folder / name))
        index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
@pytest.mark.parametrize("layout", ["visual", "full_clip", "ddp_wrapped"])
def test_state_dict_files_round_trip(tmp_path, suffix, layout):
    clip = make_tiny_clip(seed=1)
    if layout == "visual":
        state = clip.visual.state_dict()
    elif layout == "full_clip":
        state = clip.state_dict()
    else:
        state = {f"module.{k}": v for k, v in clip.state_dict().items()}
    path = save_state_dict(state, tmp_path / f"ckpt{suffix}")
    if layout == "ddp_wrapped" and suffix != ".safetensors":
        torch.save({"state_dict": state}, path)  # Lightning-style wrapper
    loaded = load_visual_state(path, reference=_visual_sd(make_tiny_clip(seed=5)))
    assert set(loaded) == set(clip.visual.state_dict())
    _assert_same_outputs(loaded, clip)


def test_pickled_image_encoder_refused_then_loaded_with_opt_in(tmp_path):
    clip = make_tiny_clip(seed=2)
    expected = _visual_sd(clip)
    path = tmp_path / "finetuned.pt"
    torch.save(ImageEncoder(make_tiny_clip(seed=2)), path)
    with pytest.raises(PickledCheckpointError) as e:
        load_visual_state(path)
    assert str(path) in str(e.value) and "allow_pickle=True" in str(e.value)
    loaded = load_visual_state(path, reference=expected, allow_pickle=True)
    assert set(loaded) == set(expected)  # text-tower leftovers (token_embedding, ln_final ...) dropped
    _assert_same_outputs(loaded, clip)


def test_pickled_classes_that_are_not_importable_load_through_stand_ins(tmp_path):
    """task_vectors files pickle ``src.modeling.ImageEncoder``: without that repository on the path
    the tensors still load (with a warning naming the class)."""
    clip = make_tiny_clip(seed=5)
    path = tmp_path / "zeroshot.pt"
    torch.save(ImageEncoder(make_tiny_clip(seed=5)), path)
    raw = path.read_bytes()
    assert raw.count(b"test_models_checkpoints") >= 1
    # same length, so the zip's offsets stay valid: the module name now points nowhere
    path.write_bytes(raw.replace(b"test_models_checkpoints", b"src_modeling_missing_xx"))
    with pytest.warns(UserWarning, match=r"src_modeling_missing_xx\.ImageEncoder"):
        loaded = load_visual_state(path, reference=_visual_sd(clip), allow_pickle=True)
    _assert_same_outputs(loaded, clip)


@pytest.mark.parametrize("kind", ["vision", "vision_bare"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_hf_clip_vision_folder_with_pretrained_projection(tmp_path, fmt, kind):
    clip = make_tiny_clip(seed=3)
    folder = write_hf_folder(tmp_path / "hf", clip, kind=kind, fmt=fmt)
    with pytest.raises(CheckpointError, match="visual_projection.*projection="):
        load_visual_state(folder)
    loaded = load_visual_state(folder, reference=_visual_sd(clip), projection=clip.visual.proj.detach())
    _assert_same_outputs(loaded, clip)


def test_hf_clip_model_folder_carries_its_projection_and_drops_text(tmp_path):
    clip = make_tiny_clip(seed=4)
    folder = write_hf_folder(tmp_path / "hf", clip, kind="clip")
    loaded = load_visual_state(folder, reference=_visual_sd(make_tiny_clip(seed=9)))
    _assert_same_outputs(loaded, clip)


def test_open_clip_local_dir_folder(tmp_path):
    clip = make_tiny_clip(seed=6)
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    save_file(clip.state_dict(), str(folder / "open_clip_model.safetensors"))
    _assert_same_outputs(load_visual_state(folder), clip)


def test_hf_conversion_matches_transformers_when_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    clip = make_tiny_clip(seed=3)
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**HF_VISION_CONFIG)).eval()
    missing, unexpected = hf.load_state_dict(to_hf(_visual_sd(clip)), strict=False)
    # position_ids: a persistent buffer in older transformers, non-persistent in newer ones
    assert not [k for k in missing + unexpected if "position_ids" not in k]
    folder = tmp_path / "hf"
    folder.mkdir()
    hf.save_pretrained(folder)
    loaded = load_visual_state(folder, reference=_visual_sd(clip))
    with torch.no_grad():
        ref = hf(pixel_values=_images()).image_embeds
    target = make_tiny_clip(seed=11).visual
    target.load_state_dict(loaded)
    torch.testing.assert_close(target(_images()), ref, rtol=1e-4, atol=1e-5)
    # a plain CLIPVisionModel folder (no projection) written by transformers itself
    plain = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_VISION_CONFIG))
    plain_keys = set(plain.state_dict())
    vision = {k: v for k, v in hf.state_dict().items() if not k.startswith("visual_projection")}
    if not set(vision) & plain_keys:  # transformers >= 5: no vision_model. prefix
        vision = {k.removeprefix("vision_model."): v for k, v in vision.items()}
    missing, unexpected = plain.load_state_dict(vision, strict=False)
    assert not [k for k in missing + unexpected if "position_ids" not in k]
    plain.save_pretrained(tmp_path / "plain")
    again = load_visual_state(tmp_path / "plain", reference=_visual_sd(clip), projection=clip.visual.proj.detach())
    for k, v in loaded.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0)


# ---- bad input -------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.safetensors"):
        load_visual_state(tmp_path / "nope.safetensors")


def test_truncated_torch_zip(tmp_path):
    path = tmp_path / "expert.pt"
    torch.save(make_tiny_clip().visual.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"expert\.pt.*corrupt or truncated"):
        load_visual_state(path)


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_garbage_torch_file(tmp_path, allow_pickle):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x00not a checkpoint" * 20)
    with pytest.raises(CheckpointError, match=r"garbage\.bin"):
        load_visual_state(path, allow_pickle=allow_pickle)


@pytest.mark.parametrize("damage", ["garbage_header", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    path = tmp_path / "expert.safetensors"
    save_file(make_tiny_clip().visual.state_dict(), str(path))
    raw = path.read_bytes()
    path.write_bytes(b"\xff" * 8 + raw[8:] if damage == "garbage_header" else raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match=r"expert\.safetensors.*safetensors"):
        load_visual_state(path)


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_name_the_key(tmp_path, value, kind):
    state = _visual_sd(make_tiny_clip())
    state["transformer.resblocks.1.mlp.c_fc.weight"][3, 2] = value
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*resblocks\.1\.mlp\.c_fc\.weight.*{kind}"):
        load_visual_state(path)


def test_other_architecture_names_key_and_shapes(tmp_path):
    import open_clip
    from conftest import TINY_TEXT, TINY_VISION

    wide = open_clip.CLIP(embed_dim=16, vision_cfg={**TINY_VISION, "width": 48}, text_cfg=TINY_TEXT)
    path = save_state_dict(wide.visual.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"wide\.safetensors.*'class_embedding'.*\(32,\).*\(48,\)"):
        load_visual_state(path, reference=_visual_sd(make_tiny_clip()))


def test_missing_key_is_named(tmp_path):
    state = _visual_sd(make_tiny_clip())
    del state["ln_post.bias"]
    path = save_state_dict(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial\.pt.*missing key 'ln_post.bias'"):
        load_visual_state(path, reference=_visual_sd(make_tiny_clip()))


def test_unknown_suffix_and_non_tensor_entries(tmp_path):
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint suffix"):
        read_state_dict(odd)
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"meta\.pt.*'epoch'"):
        read_state_dict(path)


# ---- saving ----------------------------------------------------------------------------------------
def test_save_refuses_nan_and_writes_nothing(tmp_path):
    state = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(CheckpointError, match="'w'.*NaN"):
        save_state_dict(state, tmp_path / "out.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_failure_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "merged.safetensors"
    save_state_dict({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"w": torch.zeros(3)}, target)
    assert os.listdir(tmp_path) == ["merged.safetensors"]
    assert target.read_bytes() == before


def test_saved_file_gets_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = save_state_dict({"w": torch.ones(2)}, tmp_path / "perm.pt")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_does_not_mutate_and_handles_shared_storage(tmp_path):
    base = torch.arange(6.0)
    state = {"a": base[:3], "b": base[3:], "c": base.view(2, 3)}
    path = save_state_dict(state, tmp_path / "shared.safetensors")
    back = read_state_dict(path)
    for k, v in state.items():
        torch.testing.assert_close(back[k], v)
    torch.testing.assert_close(base, torch.arange(6.0))


def test_fast_finite_check_is_exact():
    from adamerge.models.checkpoints import check_finite

    check_finite({"big": torch.full((4, 4), 3e38), "half": torch.full((8,), 6e4, dtype=torch.float16)})
    check_finite({"ids": torch.arange(3)})  # integer tensors are skipped
    with pytest.raises(MergeError, match="'b'.*NaN"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([0.0, float("nan")], dtype=torch.bfloat16)})
    with pytest.raises(MergeError, match="'c'.*Inf"):
        check_finite({"c": torch.tensor([float("inf"), -float("inf")])})


def test_checkpoint_and_merge_errors_share_a_neutral_base_only():
    from adamerge.errors import AdaMergeError

    assert issubclass(CheckpointError, AdaMergeError) and issubclass(MergeError, AdaMergeError)
    assert not issubclass(CheckpointError, MergeError) and not issubclass(MergeError, CheckpointError)
    assert issubclass(AdaMergeError, ValueError)  # callers catching ValueError keep working


def test_is_path_tells_files_from_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai").mkdir()
    assert ck.is_path(tmp_path / "missing") and ck.is_path("a/b") and ck.is_path("last.ckpt")
    assert ck.is_path("m.safetensors") and ck.is_path("m.pth") and ck.is_path("openai")  # an existing folder
    assert not ck.is_path("laion2b_s34b_b79k") and not ck.is_path("task_arithmetic") and not ck.is_path(None)


def test_a_module_prefix_is_stripped_only_when_every_key_has_it(tmp_path):
    # a DDP dict prefixes every key; a dict where only some keys carry "module." is not one, and stripping
    # those (any() instead of all()) would load a mixed-up checkpoint without a word
    clip = make_tiny_clip(seed=1)
    items = list(clip.visual.state_dict().items())
    mixed = {(f"module.{k}" if i % 2 else k): v for i, (k, v) in enumerate(items)}
    path = save_state_dict(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match="is missing key"):
        load_visual_state(path, reference=_visual_sd(make_tiny_clip(seed=5)))
