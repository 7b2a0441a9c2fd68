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


# ---- session 8: what the loaders do on files from elsewhere -----------------------------------------
def test_an_error_without_a_message_is_reported_by_its_class(tmp_path):
    # an empty .pt file: torch.load(weights_only=True) raises EOFError with an empty message, so the report
    # must fall back to the exception's class name (not index an empty line list, not name NoneType)
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert str(err.value) == f"{path}: corrupt or truncated checkpoint: EOFError"


@pytest.mark.parametrize("pickled", [False, True])
def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch, pickled):
    # torch.save records each storage's device; tagging them "cuda:0" (as a GPU run does) makes a plain
    # torch.load restore them to CUDA: on a CPU-only machine that raises, on a GPU machine the tensors end
    # up on the GPU. The loaders must map every storage to the CPU, for state dicts and pickled modules.
    import torch.serialization

    path = tmp_path / ("module.pt" if pickled else "sd.pt")
    torch.manual_seed(0)
    obj = Wrapper() if pickled else {"w": torch.arange(3.0)}
    want = obj.state_dict() if pickled else obj
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)
    got = read_state_dict(path, allow_pickle=pickled)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].device.type == "cpu" and torch.equal(got[k], v), k


def test_a_sharded_hf_index_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    # shard names with non-ASCII letters, and an open() whose default encoding is latin-1 (a Windows or
    # POSIX-C locale): only an explicit encoding="utf-8" finds the shard the index names
    from safetensors.torch import save_file

    import adamerge.models.checkpoints as ckpt

    folder = tmp_path / "hf"
    folder.mkdir()
    cfg = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **HF_VISION_CONFIG}
    (folder / "config.json").write_text(json.dumps(cfg))
    shards = {"modèle-00001.safetensors": {"a": torch.ones(2)}, "modèle-00002.safetensors": {"b": torch.zeros(3)}}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    index = {"weight_map": {"a": "modèle-00001.safetensors", "b": "modèle-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")

    real_open = open

    def latin1_by_default(file, mode="r", *args, encoding=None, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "latin-1"
        return real_open(file, mode, *args, encoding=encoding, **kwargs)

    monkeypatch.setattr(ckpt, "open", latin1_by_default, raising=False)
    got = read_state_dict(folder)
    assert sorted(got) == ["a", "b"]
    assert torch.equal(got["a"], torch.ones(2)) and torch.equal(got["b"], torch.zeros(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_state_dict_is_written_as_cpu_tensors(tmp_path):
    # the saved file must not record CUDA storages: a plain torch.load (no map_location) of it gives CPU
    # tensors, so it opens on a machine without a GPU
    state = {"w": torch.arange(4.0, device="cuda"), "b": torch.ones(2, device="cuda")}
    path = save_state_dict(state, tmp_path / "gpu.pt")
    back = torch.load(str(path), weights_only=True)
    assert {k: v.device.type for k, v in back.items()} == {"w": "cpu", "b": "cpu"}
    assert torch.equal(back["w"], torch.arange(4.0))


def test_pickles_stay_refused_when_the_environment_relaxes_torchs_default(tmp_path, monkeypatch):
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch.load's *default* weights_only into False (it only
    # yields to an explicit weights_only=True): the safe reader must pass True itself, so a pickle is
    # still refused and no code from the file runs
    _pickled(tmp_path / "m.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(PickledCheckpointError):
        read_state_dict(tmp_path / "m.pt")


def test_the_pickle_refusal_is_worded_exactly(tmp_path):
    path = tmp_path / "m.pt"
    _pickled(path)
    with pytest.raises(PickledCheckpointError) as err:
        read_state_dict(path)
    assert str(err.value) == (
        f"{path} is a pickled checkpoint (e.g. a task_vectors ImageEncoder module), which "
        "torch.load(weights_only=True) refuses. Unpickling runs arbitrary code from the file: "
        "pass allow_pickle=True only if you trust it.")


def test_a_refused_legacy_pickle_ends_with_torchs_first_line(tmp_path):
    # the refusal of a non-zip file carries the first line of torch's own UnpicklingError as its detail
    path = tmp_path / "old.pt"
    _pickled(path, legacy=True)
    try:
        torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raises, its first line is the detail
        first = str(e).strip().splitlines()[0]
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert str(err.value) == (
        f"{path}: not a readable torch checkpoint (corrupt, truncated, or a legacy non-zip pickle; for the latter "
        f"pass allow_pickle=True only if you trust the file): {first}")
    assert first and first != "None"


def test_hf_conversion_errors_name_the_source(tmp_path):
    # an HF-layout dict with a key no CLIP has: the error names what was converted, by default "state dict",
    # else the name given (load_visual_state gives the file's path)
    from safetensors.torch import save_file

    state = {"vision_model.bogus.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError) as err:
        to_visual_state(state)
    assert str(err.value) == "state dict: unknown HF key 'vision_model.bogus.weight'"
    with pytest.raises(CheckpointError) as err:
        to_visual_state(state, source="expert A")
    assert str(err.value) == "expert A: unknown HF key 'vision_model.bogus.weight'"
    path = tmp_path / "hf_like.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_visual_state(path)
    assert str(err.value) == f"{path}: unknown HF key 'vision_model.bogus.weight'"


def test_the_recorded_activation_is_checked_against_the_given_model_and_config(tmp_path):
    # a file whose metadata says QuickGELU; ViT-B-32's own open_clip config runs GELU. With a config that
    # says quick_gelu it loads (so the config given is the one used, not open_clip's); with one that does
    # not, the refusal names the model given
    from safetensors.torch import save_file

    from adamerge.models.activation import ActivationMismatchError

    path = tmp_path / "q.safetensors"
    save_file({"proj": torch.ones(2)}, str(path), metadata={"activation": "quick_gelu"})
    got = load_visual_state(path, model_name="ViT-B-32", model_config={"embed_dim": 512, "quick_gelu": True})
    assert torch.equal(got["proj"], torch.ones(2))
    with pytest.raises(ActivationMismatchError) as err:
        load_visual_state(path, model_name="ViT-B-32", model_config={"embed_dim": 512})
    assert f"{path}:" in str(err.value) and "open_clip model 'ViT-B-32' runs GELU" in str(err.value)
    load_visual_state(path)  # no model given: nothing to check against


class GeluNet(nn.Module):
    """A pickled module running GELU (importable from this test module): its activation is on record."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.act = nn.GELU()


def test_read_checkpoint_records_a_pickled_modules_activation_and_refuses_by_default(tmp_path):
    from adamerge.models.activation import Activation
    from adamerge.models.checkpoints import read_checkpoint

    path = tmp_path / "gelu.pt"
    torch.manual_seed(0)
    torch.save(GeluNet(), path)
    with pytest.raises(PickledCheckpointError):
        read_checkpoint(path)  # allow_pickle defaults to False here too
    state, found = read_checkpoint(path, allow_pickle=True)
    assert set(state) == {"lin.weight", "lin.bias"}
    assert found == Activation("gelu", str(path), "its pickled modules are torch.nn.modules.activation.GELU")
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    assert read_checkpoint(plain)[1] is None  # a plain state dict records none


def test_unknown_suffixes_and_empty_safetensors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(odd)
    assert str(err.value) == (f"{odd}: unknown checkpoint suffix '.onnx'; expected .safetensors, .pt, .pth, .bin, "
                              ".ckpt or a folder")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(empty)
    assert str(err.value) == f"{empty}: expected a state dict (name → tensor), got dict"
