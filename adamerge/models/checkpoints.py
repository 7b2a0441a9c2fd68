"""Reading and writing image-encoder checkpoints, normalised to open_clip ``model.visual`` keys.

Formats read by :func:`load_visual_state` (each error names the file):

* ``.safetensors`` (safetensors.torch);
* ``.pt`` / ``.pth`` / ``.bin`` through ``torch.load(weights_only=True)``: plain state dicts, full
  open_clip CLIP state dicts (``visual.*`` keys, the text tower is dropped), ``{"state_dict": ...}``
  wrappers and ``module.``-prefixed DDP dicts;
* pickled modules, e.g. task_vectors / AdaMerging / Surgery ``ImageEncoder`` files (``model.visual.*``
  after ``.state_dict()``; their text-tower leftovers are dropped). Unpickling runs arbitrary code, so
  these are refused unless the caller passes ``allow_pickle=True``. Pickled classes that no longer
  import (``src.modeling.ImageEncoder`` without the task_vectors repo, classes renamed in newer
  open_clip) are rebuilt as stand-in modules: their tensors load, a warning names them;
* folders: HF ``CLIPVisionModel`` / ``CLIPModel`` (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``, optionally sharded; see :mod:`adamerge.models.hf_clip`) and open_clip
  ``local-dir`` folders (``open_clip_config.json`` + a checkpoint).

Validation against a reference (θ_0's visual state dict): same keys and shapes (the error names the
key and both shapes), finite values (the error names the key). Given the configured open_clip model,
the activation a file records (HF ``hidden_act``, pickled QuickGELU / GELU modules, adamerge export
metadata; :mod:`adamerge.models.activation`) must be the model's; a plain state dict records none.

:func:`save_state_dict` writes ``.safetensors`` or ``.pt`` atomically: a temporary file in the target's
folder, then ``os.replace``; a failure leaves no file behind and never half a file.
"""

from __future__ import annotations

import json
import os
import pickle
import types
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adamerge.errors import AdaMergeError
from adamerge.files import atomic_path
from adamerge.merging.task_vectors import MergeError, check_compatible, check_finite
from adamerge.models.activation import Activation, activation_of, activation_of_module, check_activation
from adamerge.models.hf_clip import (
    HF_WEIGHT_FILES,
    HFConversionError,
    convert_hf_vision_state,
    hf_vision_config,
    is_hf_state,
)

__all__ = [
    "CheckpointError",
    "PickledCheckpointError",
    "check_finite",
    "is_path",
    "load_visual_state",
    "read_checkpoint",
    "read_state_dict",
    "save_state_dict",
    "to_visual_state",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(AdaMergeError):
    """A checkpoint file that is missing, corrupt, of the wrong architecture or holds NaN/Inf.

    Not a :class:`~adamerge.merging.task_vectors.MergeError` (a file is no merging input); catch
    :class:`~adamerge.errors.AdaMergeError` for both.
    """


class PickledCheckpointError(CheckpointError):
    """A pickled checkpoint refused because ``allow_pickle`` was not given."""


def is_path(value: object) -> bool:
    """Whether ``value`` names a checkpoint file or folder rather than a name (an open_clip tag such as
    ``openai``, a merging method such as ``task_arithmetic``).

    A path-like object always does; a string does when it contains a path separator, ends in a
    checkpoint suffix (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``) or names an existing
    file or folder.
    """
    if isinstance(value, os.PathLike):
        return True
    if not isinstance(value, str):
        return False
    return os.sep in value or value.endswith((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)) or os.path.exists(value)


# ---- reading ---------------------------------------------------------------------------------------
def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from None


def _load_torch(path: Path, allow_pickle: bool) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {_first_line(e)}") from None
    if allow_pickle:
        return _load_pickled(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (corrupt, truncated, or a legacy non-zip pickle; "
            f"for the latter pass allow_pickle=True only if you trust the file): {_first_line(refused)}"
        )
    raise PickledCheckpointError(
        f"{path} is a pickled checkpoint (e.g. a task_vectors ImageEncoder module), which "
        "torch.load(weights_only=True) refuses. Unpickling runs arbitrary code from the file: "
        "pass allow_pickle=True only if you trust it."
    )


def _stand_in(module: str, name: str) -> type:
    """An nn.Module class standing in for a pickled class that is not importable here."""

    def __init__(self, *args, **kwargs):
        nn.Module.__init__(self)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{module}.{name} was loaded through a stand-in: use its state_dict() only")

    return type(name, (nn.Module,), {"__module__": module, "__qualname__": name,
                                     "__init__": __init__, "forward": forward})


def _lenient_pickle(missing: list[str]) -> types.ModuleType:
    """A ``pickle_module`` for torch.load whose unpickler replaces classes it cannot import (e.g.
    task_vectors' ``src.modeling.ImageEncoder``) by :func:`_stand_in` modules, recording their names."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except (ModuleNotFoundError, AttributeError):
                missing.append(f"{module}.{name}")
                return _stand_in(module, name)

    mod = types.ModuleType("adamerge_lenient_pickle")
    mod.Unpickler = Unpickler
    mod.load = pickle.load
    return mod


def _load_pickled(path: Path) -> object:
    missing: list[str] = []
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_lenient_pickle(missing))
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError,
            TypeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {_first_line(e)}") from None
    if missing:
        warnings.warn(
            f"{path}: classes {sorted(set(missing))} are not importable; their tensors were read through "
            "stand-in modules (state_dict only)",
            UserWarning,
            stacklevel=4,
        )
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _as_tensor_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """Unwrap modules, ``{"state_dict": ...}`` and ``module.`` prefixes into a flat tensor dict."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (name → tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _hf_weight_files(folder: Path) -> list[Path]:
    for name in HF_WEIGHT_FILES:  # the same order as a Hub repository's (adamerge.models.hub)
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [folder / s for s in shards]
        return [path]
    raise CheckpointError(f"{folder}: HF folder without model.safetensors or pytorch_model.bin")


def _read_folder(folder: Path, allow_pickle: bool) -> dict[str, Tensor]:
    if (folder / "config.json").is_file():
        try:
            hf_vision_config(folder)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: unreadable HF config: {e}") from None
        state: dict[str, Tensor] = {}
        for f in _hf_weight_files(folder):
            state.update(read_state_dict(f, allow_pickle=allow_pickle))
        return state
    from open_clip.factory import _find_checkpoint_in_dir  # open_clip's own local-dir rule

    found = _find_checkpoint_in_dir(folder)
    if found is None:
        raise CheckpointError(f"{folder}: folder holds no config.json (HF) and no checkpoint file")
    return read_state_dict(found, allow_pickle=allow_pickle)


def read_checkpoint(
    path: str | os.PathLike, allow_pickle: bool = False
) -> tuple[dict[str, Tensor], Activation | None]:
    """The raw tensor dict stored at ``path`` (keys as stored, after unwrapping) and the activation the
    file records (:mod:`adamerge.models.activation`; None for a plain state dict).

    Args:
        path: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, an HF folder or an open_clip folder.
        allow_pickle: allow ``torch.load(weights_only=False)`` for pickled files (runs their code).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        return _read_folder(p, allow_pickle), activation_of(p)
    if p.suffix == SAFETENSORS_SUFFIX:
        return _as_tensor_dict(_load_safetensors(p), p), activation_of(p)
    if p.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{p}: unknown checkpoint suffix {p.suffix!r}; expected .safetensors, {', '.join(TORCH_SUFFIXES)} "
            "or a folder"
        )
    obj = _load_torch(p, allow_pickle)
    found = activation_of_module(obj, str(p)) if isinstance(obj, nn.Module) else None
    return _as_tensor_dict(obj, p), found


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The raw tensor dict stored at ``path`` (file or folder), keys as stored (after unwrapping).

    Args:
        path: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, an HF folder or an open_clip folder.
        allow_pickle: allow ``torch.load(weights_only=False)`` for pickled files (runs their code).
    """
    return read_checkpoint(path, allow_pickle)[0]


def to_visual_state(
    state: Mapping[str, Tensor], projection: Tensor | None = None, source: str = "state dict"
) -> dict[str, Tensor]:
    """Normalise any supported layout to open_clip ``model.visual.state_dict()`` keys.

    Layouts: HF (``vision_model.*``), task_vectors ImageEncoder (``model.visual.*``), full open_clip CLIP
    (``visual.*``), or already-visual keys (returned as they are). Text-tower keys are dropped.

    Args:
        state: the raw tensor dict.
        projection: for HF CLIPVisionModel states without ``visual_projection``: open_clip ``proj``.
        source: how the state dict is called in error messages.
    """
    if is_hf_state(state):
        try:
            return convert_hf_vision_state(state, projection=projection, source=source)
        except HFConversionError as e:
            raise CheckpointError(str(e)) from None
    for prefix in ("model.visual.", "visual."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_visual_state(
    path: str | os.PathLike,
    reference: Mapping[str, Tensor] | None = None,
    allow_pickle: bool = False,
    projection: Tensor | None = None,
    model_name: str | None = None,
    model_config: Mapping | None = None,
) -> dict[str, Tensor]:
    """Load an image encoder's state dict from ``path`` in open_clip visual keys, validated.

    Args:
        path: checkpoint file or folder (see the module docstring for the formats).
        reference: θ_0's visual state dict; when given, keys and shapes must match it exactly and
            tensors are cast to its dtypes.
        allow_pickle: accept pickled files (``torch.load(weights_only=False)`` runs code from the file).
        projection: open_clip ``proj`` for HF CLIPVisionModel folders (which do not store it).
        model_name: the configured open_clip model; when given, an activation the file records must be
            its (:class:`~adamerge.models.activation.ActivationMismatchError` names both otherwise).
        model_config: that model's open_clip config (None: ``open_clip.get_model_config(model_name)``).
    """
    name = str(path)
    raw, found = read_checkpoint(path, allow_pickle=allow_pickle)
    if model_name is not None:
        check_activation(model_name, model_config, found)
    state = to_visual_state(raw, projection, source=name)
    if reference is not None:
        try:
            check_compatible(reference, state, name=f"checkpoint {name}")
        except MergeError as e:
            raise CheckpointError(str(e)) from None
        state = {k: state[k].to(reference[k].dtype) for k in reference}
    try:
        check_finite(state, name=f"checkpoint {name}")
    except MergeError as e:
        raise CheckpointError(str(e)) from None
    return state


# ---- writing ---------------------------------------------------------------------------------------
def _standalone(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU tensors that each own their storage (safetensors refuses shared or partial storage);
    only the tensors that need it are copied."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu")
        storage = v.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or not v.is_contiguous() or v.storage_offset() or storage.nbytes() != v.nbytes:
            v = v.contiguous().clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``state`` to ``path`` (``.safetensors`` or ``.pt``/``.pth``/``.bin``) atomically.

    Refuses (writing nothing) non-tensor values and NaN/Inf weights, naming the key.

    Args:
        state: name → tensor. Tensors are copied contiguous (shared storage is fine).
        path: target file; the suffix picks the format.
        metadata: string → string metadata stored in the safetensors header.
    """
    target = Path(path)
    if target.suffix != SAFETENSORS_SUFFIX and target.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{target}: unknown suffix {target.suffix!r}; use .safetensors or .pt")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"cannot save {target}: entry {bad[0]!r} is not a tensor")
    try:
        check_finite(state, name=f"state dict for {target}")
    except MergeError as e:
        raise CheckpointError(f"refusing to save: {e}") from None
    tensors = _standalone(state)
    with atomic_path(target) as tmp:
        if target.suffix == SAFETENSORS_SUFFIX:
            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, str(tmp))
    return target
