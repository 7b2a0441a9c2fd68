"""A mini-benchmark export is a full CLIP that open_clip itself loads."""

from __future__ import annotations

import open_clip
import torch

from adamerge.data.mini import MiniBenchmarkPool
from adamerge.merging import merge_pool


def test_export_loads_with_open_clip_create_model(tmp_path, mini_tiny_cache):
    pool = MiniBenchmarkPool("tiny", 0, cache_dir=str(mini_tiny_cache))
    merged = merge_pool(pool, "task_arithmetic", lam=0.5)
    target = pool.export(merged, tmp_path / "export" / "merged.safetensors")
    open_clip.add_model_config(tmp_path / "export" / f"{pool.name}.json")
    clip = open_clip.create_model(pool.name, pretrained=str(target)).eval()  # strict load of every key
    x = torch.randn(3, 3, *clip.visual.image_size)
    with torch.no_grad():
        torch.testing.assert_close(clip.visual(x), pool.build_encoder(merged)(x))
        # the text tower is the pretrained one
        tokens = open_clip.get_tokenizer(pool.name)(["a photo of a digit"])
        torch.testing.assert_close(clip.encode_text(tokens), pool.clip.encode_text(tokens))
