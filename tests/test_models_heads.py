"""Zero-shot heads: the task_vectors recipe checked prompt by prompt, and the disk cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_clip
from open_clip import SimpleTokenizer

from adamerge.models.heads import (
    build_zero_shot_head,
    cached_zero_shot_head,
    head_cache_path,
    logit_scale_of,
    text_tower_fingerprint,
)

CLASSES = ["cat", "dog", "traffic sign"]
TEMPLATES = ["a photo of a {}.", 'a "{}" in the wild!', "{}"]


@pytest.fixture
def tok():
    return SimpleTokenizer(context_length=16)


def test_head_matches_per_class_computation(tok):
    clip = make_tiny_clip(seed=0)
    head = build_zero_shot_head(clip, tok, CLASSES, TEMPLATES, batch_size=4)  # batches cross classes
    assert head.shape == (3, 16) and head.dtype == torch.float32
    with torch.no_grad():
        for i, c in enumerate(CLASSES):
            rows = []
            for t in TEMPLATES:
                e = clip.encode_text(tok([t.replace("{}", c)]))[0]
                rows.append(e / e.norm())
            mean = torch.stack(rows).mean(0)
            torch.testing.assert_close(head[i], mean / mean.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))


def test_head_restores_training_mode_and_logit_scale(tok):
    clip = make_tiny_clip().train()
    build_zero_shot_head(clip, tok, CLASSES, TEMPLATES)
    assert clip.training
    assert logit_scale_of(clip) == pytest.approx(float(clip.logit_scale.detach().exp()))
    assert logit_scale_of(clip) == pytest.approx(1 / 0.07, rel=1e-5)


def test_head_rejects_empty_inputs(tok):
    with pytest.raises(ValueError, match="at least one"):
        build_zero_shot_head(make_tiny_clip(), tok, [], TEMPLATES)


def test_cache_miss_then_hit(tmp_path, tok, monkeypatch):
    clip = make_tiny_clip(seed=1)
    head = cached_zero_shot_head(clip, tok, "pets", CLASSES, TEMPLATES, tmp_path)
    path = head_cache_path(tmp_path, text_tower_fingerprint(clip), "pets", CLASSES, TEMPLATES)
    assert path.is_file()

    def boom(*a, **k):
        raise AssertionError("text tower ran on a cache hit")

    monkeypatch.setattr(clip, "encode_text", boom)
    torch.testing.assert_close(cached_zero_shot_head(clip, tok, "pets", CLASSES, TEMPLATES, tmp_path), head)


def test_cache_keys_on_model_and_prompts(tmp_path, tok):
    a, b = make_tiny_clip(seed=1), make_tiny_clip(seed=2)
    assert text_tower_fingerprint(a) == text_tower_fingerprint(make_tiny_clip(seed=1))
    assert text_tower_fingerprint(a) != text_tower_fingerprint(b)
    ha = cached_zero_shot_head(a, tok, "pets", CLASSES, TEMPLATES, tmp_path)
    hb = cached_zero_shot_head(b, tok, "pets", CLASSES, TEMPLATES, tmp_path)
    assert not torch.allclose(ha, hb)
    hc = cached_zero_shot_head(a, tok, "pets", CLASSES, TEMPLATES[:1], tmp_path)
    torch.testing.assert_close(hc, build_zero_shot_head(a, tok, CLASSES, TEMPLATES[:1]))
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3


def test_fingerprint_ignores_the_visual_tower(tok):
    a = make_tiny_clip(seed=1)
    before = text_tower_fingerprint(a)
    with torch.no_grad():
        a.visual.proj.add_(1.0)
    assert text_tower_fingerprint(a) == before


def test_corrupt_cache_entry_is_rebuilt(tmp_path, tok):
    clip = make_tiny_clip(seed=3)
    path = head_cache_path(tmp_path, "m", "pets", CLASSES, TEMPLATES)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    head = cached_zero_shot_head(clip, tok, "pets", CLASSES, TEMPLATES, tmp_path, model_id="m")
    torch.testing.assert_close(head, build_zero_shot_head(clip, tok, CLASSES, TEMPLATES))
    torch.testing.assert_close(
        cached_zero_shot_head(clip, tok, "pets", CLASSES, TEMPLATES, tmp_path, model_id="m"), head
    )
