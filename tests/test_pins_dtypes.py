"""Dtypes pinned: checkpoints are cast to the model's dtypes on load, experts stay in the precision the pool
was asked for, and exported files hold the model's dtypes.

The reference models here have *mixed* dtypes, as open_clip's ``fp16`` / ``bf16`` precisions make them
(linear and conv weights in low precision, norms and embeddings in float32): a loader that leaves the
file's float32, or casts everything to one dtype, gets some keys wrong.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_EMBED, TINY_TEXT, TINY_VISION, make_tiny_clip, make_tiny_pool
from safetensors.torch import load_file, save_file

from adamerge.components.adamerging import AdaMergingModel
from adamerge.models.checkpoints import load_visual_state
from adamerge.models.open_clip_pool import OpenCLIPPool
from adamerge.models.pool import ModelPool
from adamerge.systems.adamerging import AdaMerging

LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _mixed(state: dict[str, torch.Tensor], low: torch.dtype) -> dict[str, torch.Tensor]:
    """open_clip's low-precision layout: 2-D and 4-D weights in ``low``, everything else float32."""
    return {k: v.to(low) if v.dim() >= 2 and k.endswith("weight") else v.clone() for k, v in state.items()}


def _dtypes(state) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in state.items()}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_float32_checkpoint_is_cast_to_each_reference_dtype(tmp_path, precision, suffix):
    expert = make_tiny_clip(seed=1).visual.state_dict()  # float32 on disk
    path = tmp_path / f"expert{suffix}"
    save_file(expert, str(path)) if suffix == ".safetensors" else torch.save(expert, path)
    reference = _mixed(make_tiny_clip(seed=0).visual.state_dict(), LOW[precision])
    assert len(set(_dtypes(reference).values())) == 2  # both dtypes present: a single cast would show
    got = load_visual_state(path, reference=reference)
    assert _dtypes(got) == _dtypes(reference)
    for k, v in got.items():
        assert torch.equal(v, expert[k].to(reference[k].dtype)), k


@pytest.fixture
def tiny_files(tmp_path):
    """A tiny open_clip config, its float32 pretrained CLIP and two float32 expert files."""
    cfg = tmp_path / "adamerge-pins-dtype-tiny.json"
    cfg.write_text(json.dumps({"embed_dim": TINY_EMBED, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}))
    save_file(make_tiny_clip(seed=0).state_dict(), str(tmp_path / "pre.safetensors"))
    save_file(make_tiny_clip(seed=1).visual.state_dict(), str(tmp_path / "a.safetensors"))
    torch.save(make_tiny_clip(seed=2).state_dict(), tmp_path / "b.pt")  # a full CLIP state dict
    info = {t: SimpleNamespace(classnames=["x", "y", "z"][: 2 + i], templates=["a {}."])
            for i, t in enumerate(("a", "b"))}
    return {"model_name": None, "model_config": str(cfg), "pretrained": str(tmp_path / "pre.safetensors"),
            "experts": {"a": str(tmp_path / "a.safetensors"), "b": str(tmp_path / "b.pt")}, "task_info": info}


@pytest.mark.parametrize("precision", ["fp16", "bf16", "pure_bf16"])
def test_experts_of_a_half_precision_pool_stay_in_its_dtypes(tiny_files, precision):
    pool = OpenCLIPPool(precision=precision, **tiny_files)
    theta0 = pool.pretrained_state()
    low = torch.bfloat16 if "bf16" in precision else torch.float16
    assert low in set(_dtypes(theta0).values())
    files = {"a": make_tiny_clip(seed=1).visual.state_dict(),
             "b": {k[len("visual."):]: v for k, v in make_tiny_clip(seed=2).state_dict().items()
                   if k.startswith("visual.")}}
    for task in ("a", "b"):
        expert = pool.expert_state(task)
        assert _dtypes(expert) == _dtypes(theta0), task
        for k, v in expert.items():
            assert torch.equal(v, files[task][k].to(theta0[k].dtype)), (task, k)
        tau = pool.task_vector(task)
        assert {k: v.dtype for k, v in tau.items()} == {k: theta0[k].dtype for k in tau}


def test_an_open_clip_pool_exports_the_models_dtypes(tiny_files, tmp_path):
    pool = OpenCLIPPool(precision="bf16", **tiny_files)
    merged = {k: v.float() + 0.01 for k, v in pool.pretrained_state().items()}  # float32, as a merge may give
    path = pool.export(merged, tmp_path / "merged.safetensors")
    back = load_file(str(path))
    assert _dtypes(back) == _dtypes(pool.clip.state_dict())
    for k, v in merged.items():
        assert torch.equal(back[f"visual.{k}"], v.to(pool.clip.visual.state_dict()[k].dtype)), k


def _bf16_model_pool() -> ModelPool:
    p = make_tiny_pool(2)
    enc = p.encoder.to(torch.bfloat16)
    experts = {t: {k: v.to(torch.bfloat16) for k, v in p.expert_state(t).items()} for t in p.tasks}
    return ModelPool(enc, experts, p.heads, name="tiny-bf16")


def test_a_model_pool_exports_the_models_dtypes(tmp_path):
    pool = _bf16_model_pool()
    merged = {k: v.float() for k, v in pool.pretrained_state().items()}
    back = load_file(str(pool.export(merged, tmp_path / "merged.safetensors")))
    assert _dtypes(back) == _dtypes(pool.pretrained_state())


def test_a_systems_export_holds_the_models_dtypes(tiny_files, tmp_path):
    pool = OpenCLIPPool(precision="bf16", **tiny_files)
    system = AdaMerging(pool)
    system.export(tmp_path / "out")
    back = load_file(str(tmp_path / "out" / "merged.safetensors"))
    assert _dtypes(back) == _dtypes(pool.clip.state_dict())
    learned = load_file(str(tmp_path / "out" / "learned.safetensors"))
    assert {v.dtype for v in learned.values()} == {torch.float32}  # λ learn in float32 whatever the model
    merged = AdaMergingModel(_bf16_model_pool()).merged_state_dict()
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
