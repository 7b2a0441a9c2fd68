"""Real-size check (``-m slow``): a ViT-B-32 OpenCLIPPool over expert files and its export loaded back
by ``open_clip.create_model("ViT-B-32", pretrained=PATH)``. Random weights (``pretrained=None``)."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from adamerge.data.registry import get_task
from adamerge.models.open_clip_pool import OpenCLIPPool

pytestmark = pytest.mark.slow


@torch.no_grad()
def test_vit_b32_pool_and_export_round_trip(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    pretrained = tmp_path / "vitb32.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(pretrained))
    visual = clip.visual.state_dict()
    noisy = {k: v + 1e-3 * torch.randn_like(v) for k, v in visual.items()}
    save_file(noisy, str(tmp_path / "mnist.safetensors"))
    torch.save({f"visual.{k}": v - 1e-3 for k, v in visual.items()}, tmp_path / "eurosat.pt")
    del clip, noisy

    t0 = time.perf_counter()
    pool = OpenCLIPPool("ViT-B-32", str(pretrained), {"mnist": str(tmp_path / "mnist.safetensors"),
                                                       "eurosat": str(tmp_path / "eurosat.pt")}, task_info=get_task)
    t_pool = time.perf_counter() - t0
    assert pool.head("mnist").shape == (10, 512) and pool.head("eurosat").shape == (10, 512)

    t0 = time.perf_counter()
    taus = dict(pool.task_vectors())
    t_stream = time.perf_counter() - t0
    base = pool.pretrained_state()
    merged = {k: base[k] + 0.5 * (taus["mnist"][k] + taus["eurosat"][k]) for k in base}

    t0 = time.perf_counter()
    path = pool.export(merged, tmp_path / "merged.safetensors")
    t_export = time.perf_counter() - t0
    loaded = open_clip.create_model("ViT-B-32", pretrained=str(path)).eval()
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(loaded.visual(images), pool.build_encoder(merged)(images), rtol=0, atol=0)
    print(f"\nViT-B-32: pool {t_pool:.1f}s, 2 task vectors streamed {t_stream:.1f}s, export {t_export:.1f}s, "
          f"export size {path.stat().st_size / 2**20:.0f} MiB")
