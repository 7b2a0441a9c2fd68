"""Pins for the zero-shot heads (adamerge/models/heads.py): which prompts reach the text tower, on which
device, and the on-disk cache keys (file name, prompt hash, text-tower fingerprint, safetensors metadata).

The data are chosen so that the near misses disagree: a template with a second ``{}`` (filling every
``{}``, or two, would change the prompt); a stub text tower that records the device of its tokens, asked
for a device other than its own (a dropped ``device`` would run on the model's device); a task name with a
space, a slash, a dot, a dash and an underscore (each kept or replaced on its own, so a flipped condition or
another filler shows, and a slash must not open a sub-folder); hashes recomputed here byte by byte from the
documented scheme (a renamed section marker, another separator or digest size gives another key, and every
existing cache entry would silently be rebuilt); an empty tensor (hashed as no bytes); a non-visual tensor
whose name sorts after ``visual.*`` (stopping at the visual tower instead of skipping it would miss it).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch
from conftest import make_tiny_clip
from open_clip import SimpleTokenizer
from safetensors import safe_open
from torch import nn

from adamerge.models.heads import (
    build_zero_shot_head,
    cached_zero_shot_head,
    head_cache_path,
    prompts_hash,
    text_tower_fingerprint,
)


class RecordingTokenizer:
    """open_clip's tokenizer, remembering every prompt it was given."""

    def __init__(self) -> None:
        self.tok = SimpleTokenizer(context_length=16)
        self.prompts: list[str] = []

    def __call__(self, texts):
        self.prompts.extend(texts)
        return self.tok(texts)


class DeviceProbe(nn.Module):
    """A text tower on the CPU that records the device its tokens arrive on and returns, for each prompt,
    a fixed CPU embedding (so it runs whatever that device is, "meta" included)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.seen: list[torch.device] = []

    def encode_text(self, tokens):
        self.seen.append(tokens.device)
        return torch.tensor([[3.0, 4.0]]).expand(tokens.shape[0], 2)


def test_only_the_first_brace_pair_of_a_template_is_the_class_slot():
    # a second "{}" stays as written: replacing every "{}" (or two) would give "a cat, not cat"
    tok = RecordingTokenizer()
    build_zero_shot_head(make_tiny_clip(), tok, ["cat", "dog"], ["a {}, not {}", "{}!"])
    assert tok.prompts == ["a cat, not {}", "cat!", "a dog, not {}", "dog!"]


def test_the_text_tower_runs_on_the_device_asked_for_with_or_without_a_cache(tmp_path):
    # "meta" is a device other than the model's own (CPU) that a CPU-only machine has: a call that drops
    # `device` would send the tokens to the CPU
    expected = torch.tensor([[0.6, 0.8]])
    model = DeviceProbe()
    head = cached_zero_shot_head(model, RecordingTokenizer(), "pets", ["cat"], ["a {}"], None, device="meta")
    assert model.seen == [torch.device("meta")]
    torch.testing.assert_close(head, expected)
    model = DeviceProbe()
    head = cached_zero_shot_head(model, RecordingTokenizer(), "pets", ["cat"], ["a {}"], tmp_path, model_id="m",
                                 device="meta")
    assert model.seen == [torch.device("meta")]
    torch.testing.assert_close(head, expected)
    model = DeviceProbe()
    cached_zero_shot_head(model, RecordingTokenizer(), "pets", ["cat"], ["a {}"], tmp_path, model_id="m")
    assert model.seen == []  # the cache hit runs nothing


def test_a_cached_head_records_its_task_and_model_in_the_safetensors_metadata(tmp_path):
    cached_zero_shot_head(DeviceProbe(), RecordingTokenizer(), "pets", ["cat"], ["a {}"], tmp_path,
                          model_id="model-7")
    path = head_cache_path(tmp_path, "model-7", "pets", ["cat"], ["a {}"])
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"task": "pets", "model_id": "model-7"}
        assert list(f.keys()) == ["head"]


def test_the_cache_file_name_keeps_only_safe_characters_of_the_task():
    # alphanumerics, "-", "_" and "." are kept one for one; the space and the slash become one "_" each
    # (the slash must not open a sub-folder under the model's folder)
    classes, templates = ["cat"], ["a {}"]
    path = head_cache_path("/cache", "m", "my task/v1.2-a_b", classes, templates)
    assert path == Path("/cache/m") / f"my_task_v1.2-a_b-{prompts_hash(classes, templates)}.safetensors"
    assert path.parent == Path("/cache/m")


def test_the_prompt_hash_is_blake2b_8_over_marked_nul_separated_parts():
    # the documented scheme, recomputed from bytes: cache entries written by earlier versions stay found
    expected = hashlib.blake2b(b"classnames\0cat\0traffic sign\0templates\0a {}.\0{}\0", digest_size=8)
    got = prompts_hash(["cat", "traffic sign"], ["a {}.", "{}"])
    assert got == expected.hexdigest() and len(got) == 16


class TextTower(nn.Module):
    """Tensors on both sides of ``visual.*`` in name order: ``empty`` (no entries), ``visual.x`` (ignored)
    and ``w`` (sorts after ``visual.``, so it is reached only if the visual tensors are skipped, not a stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("empty", torch.zeros(0))
        self.visual = nn.Module()
        self.visual.x = nn.Parameter(torch.tensor([9.0]))
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))


def test_the_fingerprint_hashes_each_non_visual_tensor_name_shape_dtype_and_bytes():
    # recomputed with struct (little-endian float32), not torch: an empty tensor adds no bytes
    h = hashlib.blake2b(digest_size=16)
    h.update(b"empty:(0,):torch.float32")
    h.update(b"")
    h.update(b"w:(2,):torch.float32")
    h.update(struct.pack("<2f", 1.0, 2.0))
    got = text_tower_fingerprint(TextTower())
    assert got == h.hexdigest() and len(got) == 32


def test_a_tensor_named_after_the_visual_tower_is_still_fingerprinted():
    model = TextTower()
    before = text_tower_fingerprint(model)
    with torch.no_grad():
        model.visual.x.add_(1.0)
    assert text_tower_fingerprint(model) == before
    with torch.no_grad():
        model.w.add_(1.0)
    assert text_tower_fingerprint(model) != before


def test_the_fingerprint_tells_a_2x3_from_a_3x2_tensor_with_the_same_bytes():
    """The same six values as a 2×3 or a 3×2 text projection are two models: their heads differ, so their
    cache entries must too (the shape used to be taken after flattening, (6,) for both)."""
    def tower(shape):
        m = nn.Module()
        m.register_buffer("text_projection", torch.arange(6.0).reshape(shape))
        return m

    assert text_tower_fingerprint(tower((2, 3))) != text_tower_fingerprint(tower((3, 2)))
    h = hashlib.blake2b(digest_size=16)  # and the shape hashed is the tensor's own, as documented
    h.update(b"text_projection:(2, 3):torch.float32")
    h.update(struct.pack("<6f", *range(6)))
    assert text_tower_fingerprint(tower((2, 3))) == h.hexdigest()
