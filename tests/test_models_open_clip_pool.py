"""OpenCLIPPool over a tiny open_clip model registered from a config JSON: experts streamed from every
file format, heads from the registry, bad input refused, and the merged export loaded back by
``open_clip.create_model(name, pretrained=PATH)``."""

from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
from conftest import TINY_EMBED, TINY_TEXT, TINY_VISION, make_tiny_clip, make_tiny_pool
from open_clip import SimpleTokenizer
from safetensors.torch import save_file
from test_models_checkpoints import ImageEncoder, write_hf_folder

from adamerge.data.registry import UnknownTaskError, get_task, register_task
from adamerge.merging.task_vectors import MergeError
from adamerge.models.checkpoints import CheckpointError, PickledCheckpointError, read_state_dict
from adamerge.models.export import export_merged
from adamerge.models.heads import build_zero_shot_head
from adamerge.models.open_clip_pool import OpenCLIPPool, load_clip
from adamerge.models.pool import ModelPool

NAME = "adamerge-tiny-test"
TASKS = {
    "tiny_colors": (["red", "green", "blue"], ["a {} thing.", "a photo of something {}."]),
    "tiny_shapes": (["circle", "square", "triangle", "star"], ["a {}."]),
    "tiny_digits": (["zero", "one"], ["the number {}."]),
}
for _t, (_c, _tpl) in TASKS.items():
    register_task(_t, _c, _tpl)


def _images(seed=0):
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _no_grad():
    """Frozen and trainable modules take different MultiheadAttention paths (fast path without
    grad): compare outputs with grad off everywhere so both take the same one."""
    with torch.no_grad():
        yield


@pytest.fixture
def setup(tmp_path):
    """A registered tiny config, the pretrained CLIP as a .safetensors file, and three expert files."""
    cfg = tmp_path / f"{NAME}.json"
    cfg.write_text(json.dumps({"embed_dim": TINY_EMBED, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}))
    base = make_tiny_clip(seed=0)
    pretrained = tmp_path / "pretrained.safetensors"
    save_file(base.state_dict(), str(pretrained))
    experts = {
        "tiny_colors": make_tiny_clip(seed=1),
        "tiny_shapes": make_tiny_clip(seed=2),
        "tiny_digits": make_tiny_clip(seed=3),
    }
    files = {
        "tiny_colors": tmp_path / "colors.safetensors",
        "tiny_shapes": tmp_path / "shapes_full_clip.pt",
        "tiny_digits": write_hf_folder(tmp_path / "digits_hf", experts["tiny_digits"], kind="clip"),
    }
    save_file(experts["tiny_colors"].visual.state_dict(), str(files["tiny_colors"]))
    torch.save(experts["tiny_shapes"].state_dict(), files["tiny_shapes"])
    return {"cfg": str(cfg), "base": base, "pretrained": str(pretrained), "experts": experts,
            "files": {t: str(p) for t, p in files.items()}, "tmp": tmp_path}


def _pool(s, **kw):
    args = {"model_name": NAME, "pretrained": s["pretrained"], "experts": s["files"], "model_config": s["cfg"],
            "task_info": get_task}
    return OpenCLIPPool(**{**args, **kw})


def test_pool_from_files(setup):
    s = setup
    pool = _pool(s)
    assert pool.tasks == list(TASKS)
    torch.testing.assert_close(pool.encoder(_images()), s["base"].visual(_images()), rtol=0, atol=0)
    assert pool.logit_scale == pytest.approx(float(s["base"].logit_scale.detach().exp()))
    tok = SimpleTokenizer(context_length=TINY_TEXT["context_length"])
    for task, (classes, templates) in TASKS.items():
        torch.testing.assert_close(pool.head(task), build_zero_shot_head(s["base"], tok, classes, templates))
        expert = s["experts"][task].visual.state_dict()
        got = pool.expert_state(task)
        for k in expert:
            torch.testing.assert_close(got[k], expert[k], rtol=0, atol=0)
        enc = pool.build_encoder(got)
        torch.testing.assert_close(enc(_images()), s["experts"][task].visual(_images()), rtol=0, atol=0)


def test_experts_are_loaded_lazily_one_at_a_time(setup, monkeypatch):
    import adamerge.models.open_clip_pool as ocp

    calls = []
    real = ocp.load_visual_state
    monkeypatch.setattr(ocp, "load_visual_state", lambda path, **kw: calls.append(path) or real(path, **kw))
    pool = _pool(setup)
    assert calls == []
    stream = pool.task_vectors()
    next(stream)
    assert len(calls) == 1
    list(stream)
    assert len(calls) == 3


def test_corrupt_expert_fails_when_read_naming_the_file(setup):
    pool = _pool(setup)
    path = setup["files"]["tiny_colors"]
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="colors.safetensors"):
        pool.expert_state("tiny_colors")


def test_pickled_expert_needs_opt_in(setup):
    s = setup
    path = s["tmp"] / "finetuned.pt"
    torch.save(ImageEncoder(make_tiny_clip(seed=4)), path)
    files = {**s["files"], "tiny_colors": str(path)}
    with pytest.raises(PickledCheckpointError, match="allow_pickle=True"):
        _pool(s, experts=files).expert_state("tiny_colors")
    got = _pool(s, experts=files, allow_pickle=True).expert_state("tiny_colors")
    torch.testing.assert_close(got["proj"], make_tiny_clip(seed=4).visual.proj.detach())


def test_hf_vision_folder_uses_pretrained_projection(setup):
    """(A hidden_act the model does not run is refused: tests/test_models_activation.py.)"""
    s = setup
    folder = write_hf_folder(s["tmp"] / "vision_only", s["experts"]["tiny_digits"], kind="vision")
    pool = _pool(s, experts={**s["files"], "tiny_digits": str(folder)})
    got = pool.expert_state("tiny_digits")
    torch.testing.assert_close(got["proj"], s["base"].visual.proj.detach())
    torch.testing.assert_close(got["conv1.weight"], s["experts"]["tiny_digits"].visual.conv1.weight.detach())


def test_local_dir_pretrained(setup):
    s = setup
    folder = s["tmp"] / "local"
    folder.mkdir()
    cfg = {"embed_dim": TINY_EMBED, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(s["base"].state_dict(), str(folder / "open_clip_model.safetensors"))
    pool = OpenCLIPPool(model_name=NAME, pretrained=f"local-dir:{folder}", experts=s["files"], task_info=get_task)
    torch.testing.assert_close(pool.encoder(_images()), s["base"].visual(_images()), rtol=0, atol=0)


def test_tasks_selects_and_orders_experts(setup):
    pool = _pool(setup, tasks=["tiny_digits", "tiny_colors"])
    assert pool.tasks == ["tiny_digits", "tiny_colors"]


def test_class_names_and_templates_are_passed_in_not_looked_up(setup):
    """task_info (a mapping or a lookup function) gives heads for tasks no registry knows."""
    from types import SimpleNamespace

    s = setup
    infos = {"plain_colors": SimpleNamespace(classnames=("cyan", "magenta"), templates=("{} ink.",)),
             "plain_shapes": SimpleNamespace(classnames=("cube", "cone", "ring"), templates=("a {}.", "one {}."))}
    experts = {"plain_colors": s["files"]["tiny_colors"], "plain_shapes": s["files"]["tiny_shapes"]}
    tok = SimpleTokenizer(context_length=TINY_TEXT["context_length"])
    as_yaml = {t: {"classnames": list(i.classnames), "templates": list(i.templates)} for t, i in infos.items()}
    for task_info in (infos, infos.__getitem__, as_yaml):
        pool = _pool(s, experts=experts, task_info=task_info)
        assert pool.tasks == ["plain_colors", "plain_shapes"]
        for task, info in infos.items():
            torch.testing.assert_close(pool.head(task), build_zero_shot_head(s["base"], tok, info.classnames,
                                                                             info.templates))
    with pytest.raises(ValueError, match="no class names for task 'tiny_colors'.*plain_colors, plain_shapes"):
        _pool(s, task_info=infos)
    with pytest.raises(TypeError, match="task_info must map task names"):
        _pool(s, task_info=3)


# ---- bad input -------------------------------------------------------------------------------------
def test_unknown_task_is_named_and_nothing_cached(setup):
    s = setup
    cache = s["tmp"] / "cache"
    with pytest.raises(UnknownTaskError, match="'tiny_nope'"):
        _pool(s, experts={**s["files"], "tiny_nope": s["files"]["tiny_colors"]}, cache_dir=str(cache))
    assert not cache.exists()


def test_task_without_expert_and_empty_experts(setup):
    with pytest.raises(ValueError, match="'mnist' has no expert"):
        _pool(setup, tasks=["tiny_colors", "mnist"])
    with pytest.raises(ValueError, match="empty expert list"):
        _pool(setup, experts={})


def test_unknown_model_name(setup):
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        _pool(setup, model_name="ViT-Nope", model_config=None)


def test_missing_expert_file_names_task_and_file(setup):
    with pytest.raises(CheckpointError, match="'tiny_shapes'.*missing.pt"):
        _pool(setup, experts={**setup["files"], "tiny_shapes": str(setup["tmp"] / "missing.pt")})


def test_wrong_architecture_expert_names_key_and_shapes(setup):
    s = setup
    wide = open_clip.CLIP(embed_dim=16, vision_cfg={**TINY_VISION, "width": 48}, text_cfg=TINY_TEXT)
    path = s["tmp"] / "wide.safetensors"
    save_file(wide.visual.state_dict(), str(path))
    pool = _pool(s, experts={**s["files"], "tiny_colors": str(path)})
    with pytest.raises(CheckpointError, match=r"wide.safetensors.*'class_embedding'.*\(32,\).*\(48,\)"):
        pool.expert_state("tiny_colors")


def test_bad_pretrained_files_name_file_and_key(setup):
    s = setup
    state = s["base"].state_dict()
    bad = s["tmp"] / "nan.safetensors"
    save_file({**state, "ln_final.weight": torch.full((32,), float("nan"))}, str(bad))
    with pytest.raises(CheckpointError, match=r"nan.safetensors.*'ln_final.weight'.*NaN"):
        _pool(s, pretrained=str(bad))
    visual_only = s["tmp"] / "visual_only.safetensors"
    save_file(s["base"].visual.state_dict(), str(visual_only))
    with pytest.raises(CheckpointError, match=r"visual_only.safetensors.*full adamerge-tiny-test CLIP.*missing key"):
        _pool(s, pretrained=str(visual_only))
    with pytest.raises(CheckpointError, match="not found"):
        _pool(s, pretrained=str(s["tmp"] / "absent.pt"))


def test_pickled_pretrained_refused(setup):
    s = setup
    path = s["tmp"] / "pretrained_module.pt"
    torch.save(make_tiny_clip(), path)
    with pytest.raises(PickledCheckpointError, match="pretrained_module.pt"):
        _pool(s, pretrained=str(path))


# ---- export ----------------------------------------------------------------------------------------
def test_export_round_trips_through_open_clip_create_model(setup):
    s = setup
    pool = _pool(s)
    states = [pool.expert_state(t) for t in pool.tasks]
    merged = {k: sum(st[k] for st in states) / len(states) for k in states[0]}
    path = pool.export(merged, s["tmp"] / "out" / "merged.safetensors")
    loaded = open_clip.create_model(NAME, pretrained=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.visual(_images()), pool.build_encoder(merged)(_images()), rtol=0, atol=0)
        tokens = SimpleTokenizer(context_length=16)(["a red thing."])
        torch.testing.assert_close(loaded.encode_text(tokens), s["base"].encode_text(tokens), rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ["merged.safetensors"]


def test_export_with_a_bare_clip_and_bad_states_write_nothing(setup):
    s = setup
    clip = make_tiny_clip(seed=0)
    out = s["tmp"] / "exports"
    good = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    export_merged(clip, good, out / "ok.safetensors")
    assert set(read_state_dict(out / "ok.safetensors")) == set(clip.state_dict())
    bad = dict(good, proj=torch.full_like(good["proj"], float("nan")))
    with pytest.raises(CheckpointError, match="'proj'.*NaN"):
        export_merged(clip, bad, out / "nan.safetensors")
    wrong = dict(good, proj=torch.zeros(3, 3))
    with pytest.raises(CheckpointError, match=r"'proj'.*\(32, 16\).*\(3, 3\)"):
        export_merged(clip, wrong, out / "shape.safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        export_merged(clip, good, out / "model.pt")
    assert sorted(os.listdir(out)) == ["ok.safetensors"]


def test_base_pool_export_visual_only(tmp_path):
    pool = make_tiny_pool()
    state = pool.expert_state("task1")
    path = pool.export(state, tmp_path / "enc.pt")
    back = read_state_dict(path)
    assert set(back) == set(state)
    torch.testing.assert_close(back["proj"], state["proj"])
    with pytest.raises(MergeError, match="'ln_post.bias'"):
        pool.export({k: v for k, v in state.items() if k != "ln_post.bias"}, tmp_path / "bad.pt")
    assert sorted(os.listdir(tmp_path)) == ["enc.pt"]


# ---- LightningCLI / jsonargparse -------------------------------------------------------------------
def test_instantiable_as_class_path(setup):
    from jsonargparse import ArgumentParser

    s = setup
    parser = ArgumentParser()
    parser.add_argument("--pool", type=ModelPool)
    cfg = parser.parse_object({"pool": {
        "class_path": "adamerge.models.open_clip_pool.OpenCLIPPool",
        "init_args": {"model_name": NAME, "pretrained": s["pretrained"], "experts": s["files"],
                      "model_config": s["cfg"], "tasks": ["tiny_colors"],
                      "task_info": {t: {"classnames": c, "templates": p} for t, (c, p) in TASKS.items()}},
    }})
    pool = parser.instantiate(cfg).pool
    assert isinstance(pool, OpenCLIPPool) and pool.tasks == ["tiny_colors"]
    # The lookup named by its import path, as a YAML config writes it.
    cfg = parser.parse_object({"pool": {
        "class_path": "adamerge.models.open_clip_pool.OpenCLIPPool",
        "init_args": {"model_name": NAME, "pretrained": s["pretrained"], "experts": s["files"],
                      "model_config": s["cfg"], "task_info": "adamerge.data.registry.get_task"},
    }})
    pool = parser.instantiate(cfg).pool
    assert pool.tasks == list(TASKS)


def test_streamed_experts_are_not_kept(setup, monkeypatch):
    """After a task vector is consumed and dropped, nothing in the pool still references its expert."""
    import gc
    import weakref

    import adamerge.models.open_clip_pool as ocp

    refs = []
    real = ocp.load_visual_state

    def tracked(path, **kw):
        state = real(path, **kw)
        refs.extend(weakref.ref(t) for t in state.values())
        return state

    monkeypatch.setattr(ocp, "load_visual_state", tracked)
    pool = _pool(setup)
    for _, tau in pool.task_vectors():
        del tau
    gc.collect()
    assert refs and all(r() is None for r in refs)


def _to_hf_clip_model(clip) -> dict:
    """A whole open_clip CLIP → HF CLIPModel keys (inverse mapping, written out independently)."""
    from test_models_checkpoints import hf_resblock, to_hf

    sd = clip.state_dict()
    out = to_hf({k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")})
    out.update({
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
    })
    for i in range(TINY_TEXT["layers"]):
        hf_resblock(sd, f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", out)
    return out


def test_hf_clip_model_folder_as_pretrained(setup):
    """FusionBench keeps θ_0 as an HF CLIPModel folder: both towers convert, heads and features match."""
    s = setup
    folder = s["tmp"] / "clip-vit-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "model_type": "clip",
                                                    "vision_config": {"hidden_act": "gelu"}}))
    save_file({k: v.contiguous() for k, v in _to_hf_clip_model(s["base"]).items()},
              str(folder / "model.safetensors"))
    pool = _pool(s, pretrained=str(folder))
    reference = _pool(s)
    torch.testing.assert_close(pool.encoder(_images()), s["base"].visual(_images()), rtol=0, atol=0)
    for t in TASKS:
        torch.testing.assert_close(pool.head(t), reference.head(t), rtol=0, atol=0)
    assert pool.logit_scale == reference.logit_scale
    broken = s["tmp"] / "clip-no-text-proj"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    state = {k: v.contiguous() for k, v in _to_hf_clip_model(s["base"]).items() if k != "text_projection.weight"}
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="clip-no-text-proj.*'text_projection.weight'"):
        _pool(s, pretrained=str(broken))


def test_hf_clip_model_conversion_matches_transformers_when_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_models_checkpoints import HF_VISION_CONFIG

    from adamerge.models.hf_clip import convert_hf_clip_state

    clip = make_tiny_clip(seed=8)
    text_cfg = {"vocab_size": TINY_TEXT["vocab_size"], "hidden_size": 32, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                "hidden_act": "gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407}
    cfg = transformers.CLIPConfig(text_config=text_cfg, vision_config=HF_VISION_CONFIG, projection_dim=16)
    hf = transformers.CLIPModel(cfg).eval()
    missing, unexpected = hf.load_state_dict(_to_hf_clip_model(clip), strict=False)
    assert not [k for k in missing + unexpected if "position_ids" not in k]
    tokens = SimpleTokenizer(context_length=16)(["a red thing.", "one"])

    def features(out):  # a tensor in transformers 4, an output object (projected pooler_output) in 5
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    torch.testing.assert_close(features(hf.get_text_features(input_ids=tokens)), clip.encode_text(tokens),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features(hf.get_image_features(pixel_values=_images())),
                               clip.encode_image(_images()), rtol=1e-4, atol=1e-5)
    back = make_tiny_clip(seed=9)
    back.load_state_dict(convert_hf_clip_state(hf.state_dict()), strict=True)
    torch.testing.assert_close(back.encode_text(tokens), clip.encode_text(tokens), rtol=0, atol=0)


def test_no_false_random_init_warning_for_local_weights(setup, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        _pool(setup)
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # a genuinely random model still says so
        load_clip(NAME, None)
    assert [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
