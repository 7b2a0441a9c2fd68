"""Checkpoint reading and writing: the messages and layouts adamerge/models/checkpoints.py promises,
pinned exactly (each error names the file and the problem), with the layouts that tell a wrong unwrapping
apart (a full CLIP holding ``visual.*`` next to text keys, a task_vectors ``model.visual.*`` dict,
non-contiguous and offset views that safetensors refuses unless copied)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_models_checkpoints import HF_VISION_CONFIG
from torch import nn

from adamerge.models.checkpoints import (
    CheckpointError,
    PickledCheckpointError,
    _load_pickled,
    load_visual_state,
    read_state_dict,
    save_state_dict,
    to_visual_state,
)


class Wrapper(nn.Module):
    """A pickled module of a class importable from this test module (``test_pins_checkpoints.Wrapper``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)


def _pickled(path, legacy: bool = False):
    torch.manual_seed(0)
    module = Wrapper()
    torch.save(module, path, _use_new_zipfile_serialization=not legacy)
    return module.state_dict()


# ---- reading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("obj, kind", [([torch.zeros(1)], "list"), ({}, "dict"), (torch.zeros(2), "Tensor")])
def test_a_file_that_is_not_a_state_dict_is_named(tmp_path, obj, kind):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: expected a state dict \(name → tensor\), got {kind}$"):
        read_state_dict(path)


def test_a_non_tensor_entry_is_named_with_its_type(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"w": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: entry 'epoch' is a int, not a tensor$"):
        read_state_dict(path)


def test_a_state_dict_wrapper_is_unwrapped(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module.w": torch.ones(2), "module.b": torch.zeros(1)}, "epoch": 3}, path)
    got = read_state_dict(path)
    assert list(got) == ["w", "b"] and torch.equal(got["w"], torch.ones(2))


def test_folder_errors_name_what_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=rf"^{empty}: folder holds no config.json \(HF\) and no checkpoint file$"):
        read_state_dict(empty)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match=rf"^{hf}: HF folder without model.safetensors or pytorch_model.bin$"):
        read_state_dict(hf)
    (hf / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable HF config"):
        read_state_dict(hf)


def test_to_visual_state_keeps_only_the_image_tower():
    w = torch.ones(2)
    full_clip = {"visual.conv1.weight": w, "visual.proj": w, "token_embedding.weight": w, "text_projection": w}
    assert list(to_visual_state(full_clip)) == ["conv1.weight", "proj"]
    encoder = {"model.visual.conv1.weight": w, "model.token_embedding.weight": w, "model.logit_scale": w}
    assert list(to_visual_state(encoder)) == ["conv1.weight"]
    plain = {"conv1.weight": w, "proj": w}
    out = to_visual_state(plain)
    assert out == plain and out is not plain  # already visual: a new dict with the same tensors


def test_non_finite_values_are_blamed_on_the_checkpoint(tmp_path):
    path = save_state_dict({"w": torch.ones(2)}, tmp_path / "ok.pt")
    torch.save({"w": torch.tensor([1.0, float("inf")])}, path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}: key 'w' contains Inf values$"):
        load_visual_state(path)


# ---- writing ----------------------------------------------------------------------------------------
def test_save_errors_name_the_target_and_the_entry(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.onnx: unknown suffix '\.onnx'; use \.safetensors or \.pt$"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "model.onnx")
    target = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match=rf"^cannot save {target}: entry 'n' is not a tensor$"):
        save_state_dict({"w": torch.ones(1), "n": 3}, target)
    with pytest.raises(CheckpointError, match=rf"^refusing to save: state dict for {target}: key 'w' contains NaN"):
        save_state_dict({"w": torch.tensor([float("nan")])}, target)
    assert not target.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_views_are_saved_as_their_values(tmp_path, suffix):
    # a transposed (non-contiguous) weight, a row slice with a storage offset, and a view of part of a
    # storage: safetensors refuses all three unless each is made its own contiguous copy
    base = torch.arange(24.0).view(4, 6)
    state = {"t": base.t(), "row": base[2], "head": base.view(-1)[:5], "int": torch.arange(3)}
    path = save_state_dict(state, tmp_path / f"views{suffix}", metadata={"k": "v"} if suffix == ".safetensors" else None)
    back = read_state_dict(path)
    assert set(back) == set(state)  # safetensors stores keys sorted
    for k, v in state.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype, k
    assert torch.equal(base, torch.arange(24.0).view(4, 6))
    if suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"k": "v"}


# ---- pickles: refused unless allowed, everywhere ------------------------------------------------------
def test_read_state_dict_refuses_a_pickle_unless_allowed(tmp_path):
    want = _pickled(tmp_path / "m.pt")
    with pytest.raises(PickledCheckpointError, match="allow_pickle=True only if you trust it"):
        read_state_dict(tmp_path / "m.pt")  # the default is to refuse
    got = read_state_dict(tmp_path / "m.pt", allow_pickle=True)
    assert set(got) == set(want) and torch.equal(got["lin.weight"], want["lin.weight"])


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_allow_pickle_reaches_the_file_inside_a_folder(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "hf":
        cfg = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **HF_VISION_CONFIG}
        (folder / "config.json").write_text(json.dumps(cfg))
    want = _pickled(folder / ("pytorch_model.bin" if kind == "hf" else "open_clip_pytorch_model.bin"))
    with pytest.raises(PickledCheckpointError):
        read_state_dict(folder)
    got = read_state_dict(folder, allow_pickle=True)
    assert torch.equal(got["lin.weight"], want["lin.weight"])


def test_a_legacy_non_zip_pickle_loads_only_with_the_opt_in(tmp_path):
    want = _pickled(tmp_path / "old.pt", legacy=True)
    with pytest.raises(CheckpointError, match="legacy non-zip pickle"):
        read_state_dict(tmp_path / "old.pt")
    got = read_state_dict(tmp_path / "old.pt", allow_pickle=True)  # torch's legacy reader calls pickle_module.load
    assert torch.equal(got["lin.bias"], want["lin.bias"])


def test_a_class_that_no_longer_imports_becomes_a_named_stand_in(tmp_path):
    path = tmp_path / "gone.pt"
    _pickled(path)
    raw = path.read_bytes()
    assert b"test_pins_checkpoints" in raw
    path.write_bytes(raw.replace(b"test_pins_checkpoints", b"src_missing_xxxxxxxxx"))  # same length: zip intact
    with pytest.warns(UserWarning) as caught:
        obj = _load_pickled(path)
    assert str(caught[0].message) == (f"{path}: classes ['src_missing_xxxxxxxxx.Wrapper'] are not importable; their "
                                      "tensors were read through stand-in modules (state_dict only)")
    assert (type(obj).__module__, type(obj).__qualname__) == ("src_missing_xxxxxxxxx", "Wrapper")
    assert set(obj.state_dict()) == {"lin.weight", "lin.bias"}
    with pytest.raises(RuntimeError, match=r"^src_missing_xxxxxxxxx\.Wrapper was loaded through a stand-in: use its "
                                           r"state_dict\(\) only$"):
        obj(torch.zeros(1, 3))


def test_a_corrupt_pickle_is_reported_with_the_loaders_first_line(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x80\x02garbage after a pickle header" * 8)
    try:
        torch.load(str(path), weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever torch raises, its first line is the detail
        first = str(e).strip().splitlines()[0]
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path, allow_pickle=True)
    assert str(err.value) == f"{path}: corrupt or truncated checkpoint: {first}"


def test_a_small_view_of_a_large_tensor_is_saved_alone(tmp_path):
    # the first 5 entries of a 4 MB tensor: contiguous, at offset 0, but owning a fraction of its storage;
    # torch.save would write the whole storage unless the view is copied first
    big = torch.zeros(1_000_000)
    path = save_state_dict({"head": big[:5]}, tmp_path / "head.pt")
    assert path.stat().st_size < 20_000
    assert torch.equal(read_state_dict(path)["head"], torch.zeros(5))
