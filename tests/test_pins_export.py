"""Full-CLIP export (adamerge/models/export.py) pinned on a tiny stand-in CLIP: which tensors come from
where, in which dtype, under which metadata, and the exact errors. The stand-in holds a half-precision
visual tower next to float32 text weights, so a merge written in float32 (or a text tower cast along)
is told apart, and text keys that sort before and after ``visual.`` so a wrong filter is seen."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from adamerge.models.checkpoints import CheckpointError
from adamerge.models.export import export_merged, full_clip_state


class TinyClip(nn.Module):
    """``visual`` (fp16 Linear + GELU) and text-side parameters around it: ``logit_scale`` (sorts before
    ``visual.``), ``token_embedding`` and ``zz_text`` (after it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.token_embedding = nn.Embedding(3, 2)
        self.visual = nn.Sequential(nn.Linear(2, 3), nn.GELU()).half()
        self.zz_text = nn.Linear(2, 2)


class Pool:
    """A pool holding the CLIP as ``.clip`` (what OpenCLIPPool exposes)."""

    def __init__(self, clip):
        self.clip = clip


def _merged(clip, fill=0.25):
    # float32 values that are exact in fp16, requiring grad: the export must detach and cast them
    return {k: torch.full(v.shape, fill, dtype=torch.float32, requires_grad=True)
            for k, v in clip.visual.state_dict().items()}


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict


@pytest.mark.parametrize("wrap", [False, True])
def test_full_clip_state_replaces_only_the_visual_tower_in_its_dtype(wrap):
    clip = TinyClip()
    full = full_clip_state(Pool(clip) if wrap else clip, _merged(clip))
    want_keys = [k for k in clip.state_dict() if not k.startswith("visual.")] + \
        [f"visual.{k}" for k in clip.visual.state_dict()]
    assert list(full) == want_keys
    for k in ("logit_scale", "token_embedding.weight", "zz_text.weight", "zz_text.bias"):
        assert torch.equal(full[k], clip.state_dict()[k]) and full[k].dtype == torch.float32, k
    for k in clip.visual.state_dict():
        t = full[f"visual.{k}"]
        assert t.dtype == torch.float16 and not t.requires_grad, k
        assert torch.equal(t, torch.full(t.shape, 0.25, dtype=torch.float16)), k


def test_not_a_clip_is_a_type_error_naming_what_was_given():
    with pytest.raises(TypeError, match=r"^export needs an open_clip CLIP model or a pool holding one \(\.clip\), "
                                        r"got int$"):
        full_clip_state(3, {})
    with pytest.raises(TypeError, match=r"got Linear$"):  # a module without a .visual module
        full_clip_state(nn.Linear(2, 2), {})
    with pytest.raises(TypeError, match=r"got Pool$"):  # a pool whose .clip is no module
        full_clip_state(Pool("clip"), {})


def test_bad_visual_states_are_checkpoint_errors_naming_the_merge():
    clip = TinyClip()
    bad = dict(_merged(clip), **{"0.bias": torch.tensor([1.0, float("inf"), 0.0])})
    with pytest.raises(CheckpointError, match=r"^merged visual state dict: key '0\.bias' contains Inf values$"):
        full_clip_state(clip, bad)
    wrong = dict(_merged(clip), **{"0.bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"^merged visual state dict: shape mismatch at key '0\.bias'"):
        full_clip_state(clip, wrong)


def test_export_writes_the_full_clip_with_adamerge_metadata(tmp_path):
    clip = TinyClip()
    path = export_merged(Pool(clip), _merged(clip, 0.5), tmp_path / "m.safetensors")
    assert path == tmp_path / "m.safetensors"
    meta, tensors = _meta(path)
    assert meta == {"format": "open_clip", "producer": "adamerge", "activation": "gelu"}
    assert set(tensors) == set(clip.state_dict())
    assert tensors["visual.0.weight"].dtype == torch.float16
    assert torch.equal(tensors["visual.0.weight"], torch.full((3, 2), 0.5, dtype=torch.float16))
    assert torch.equal(tensors["zz_text.weight"], clip.zz_text.weight.detach())


def test_export_records_the_model_name_and_its_config(tmp_path):
    clip = TinyClip()
    cfg = {"embed_dim": 2}
    path = export_merged(clip, _merged(clip), tmp_path / "n.safetensors", model_name="tiny", model_config=cfg)
    meta, _ = _meta(path)
    assert meta["open_clip_model"] == "tiny" and meta["format"] == "open_clip" and meta["producer"] == "adamerge"
    assert json.loads(meta["open_clip_config"]) == {"embed_dim": 2, "quick_gelu": False}


def test_a_non_safetensors_target_is_refused_before_anything_is_written(tmp_path):
    clip = TinyClip()
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'm.pt'}: a full CLIP export is written as "
                                              r"\.safetensors; rename the target$"):
        export_merged(clip, _merged(clip), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
