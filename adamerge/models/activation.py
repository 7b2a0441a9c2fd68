"""Which MLP activation a checkpoint needs, read from wherever its source records it, checked against
the configured open_clip model.

OpenAI's CLIP (and the task_vectors / AdaMerging / FusionBench experts fine-tuned from it) was trained
with QuickGELU, ``x·σ(1.702x)``; open_clip's plain ``ViT-B-32`` config builds ``nn.GELU`` and only
``ViT-B-32-quickgelu`` (model config ``"quick_gelu": true``) builds QuickGELU. The activation is no
weight: such weights load strictly into either model and the wrong one silently costs accuracy. So
every source that records it is read, and a mismatch is refused (:func:`check_activation`):

* HF folders: ``config.json`` ``hidden_act`` (a CLIPModel's ``vision_config``): ``quick_gelu`` or
  ``gelu`` (its tanh approximations ``gelu_new`` / ``gelu_pytorch_tanh`` / ``gelu_fast`` count as
  GELU);
* open_clip ``local-dir`` folders: ``open_clip_config.json`` ``model_cfg.quick_gelu`` (absent: GELU,
  as open_clip builds it);
* pickled modules (task_vectors' ``ImageEncoder``, a pickled open_clip CLIP): the class of the
  activation modules in the visual tower. open_clip's ``ResidualAttentionBlock`` holds
  ``mlp.gelu = act_layer()``, where ``act_layer`` is ``QuickGELU if quick_gelu else nn.GELU``
  (open_clip ``model.py``; task_vectors pins open_clip 2.0.2, whose ``create_model(name,
  pretrained="openai")`` builds QuickGELU through ``build_model_from_openai_state_dict``). The class
  is known by name, so stand-ins for classes that no longer import count too;
* open_clip pretrained tags: the tag's ``quick_gelu`` in ``open_clip.pretrained.get_pretrained_cfg``
  (absent: GELU, as open_clip's own mismatch warning reads it);
* adamerge exports (``.safetensors`` metadata written by :func:`export_metadata`): ``activation``,
  else ``open_clip_config``'s ``quick_gelu``.

A plain state dict (``.safetensors`` without that metadata, tensors-only ``.pt``) records nothing, so
nothing can be checked: it is accepted as it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from adamerge.errors import AdaMergeError
from adamerge.models.hf_clip import hf_vision_config

__all__ = [
    "GELU",
    "QUICK_GELU",
    "Activation",
    "ActivationMismatchError",
    "activation_of",
    "activation_of_module",
    "activation_of_tag",
    "check_activation",
    "configured_activation",
    "export_metadata",
]

QUICK_GELU = "quick_gelu"
GELU = "gelu"
_NAMES = {QUICK_GELU: "QuickGELU", GELU: "GELU"}
_HF_ACTS = {"quick_gelu": QUICK_GELU, "gelu": GELU, "gelu_new": GELU, "gelu_pytorch_tanh": GELU,
            "gelu_fast": GELU}
_MODULE_ACTS = {"QuickGELU": QUICK_GELU, "GELU": GELU}  # class names (open_clip / torch.nn)


class ActivationMismatchError(AdaMergeError):
    """A checkpoint that needs another activation than the configured model has.

    Not a :class:`~adamerge.models.checkpoints.CheckpointError`: the file is sound, the configuration
    is what has to change (the message names the model to use).
    """


@dataclass(frozen=True)
class Activation:
    """The activation a source records.

    Args:
        name: ``"quick_gelu"`` or ``"gelu"``.
        source: the file, folder or tag it was read from.
        says: what the source says, as written there (for error messages).
    """

    name: str
    source: str
    says: str


def _from_hf_config(folder: Path) -> Activation | None:
    try:
        act = hf_vision_config(folder).get("hidden_act")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # the reader reports an unreadable config
    name = _HF_ACTS.get(act) if isinstance(act, str) else None
    return None if name is None else Activation(name, str(folder), f"config.json hidden_act={act!r}")


def _from_open_clip_config(folder: Path) -> Activation | None:
    try:
        with open(folder / "open_clip_config.json", encoding="utf-8") as f:
            cfg = json.load(f).get("model_cfg")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(cfg, Mapping):
        return None
    quick = bool(cfg.get("quick_gelu", False))
    return Activation(QUICK_GELU if quick else GELU, str(folder), f"open_clip_config.json quick_gelu={quick}")


def _from_metadata(path: Path) -> Activation | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None  # the reader reports an unreadable file
    act = meta.get("activation")
    if act in _NAMES:
        return Activation(act, str(path), f"safetensors metadata activation={act!r}")
    try:
        cfg = json.loads(meta["open_clip_config"])
    except (KeyError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, Mapping):
        return None
    quick = bool(cfg.get("quick_gelu", False))
    model = meta.get("open_clip_model", "?")
    return Activation(QUICK_GELU if quick else GELU, str(path),
                      f"safetensors metadata open_clip_model={model!r} with quick_gelu={quick}")


def activation_of(path: str | Path) -> Activation | None:
    """The activation a checkpoint file or folder records without loading its tensors, or None.

    Reads an HF ``config.json``, an open_clip ``open_clip_config.json`` or a ``.safetensors`` header's
    metadata. Pickled files record theirs in their modules (:func:`activation_of_module`, applied by
    :func:`adamerge.models.checkpoints.read_checkpoint` when it unpickles them); plain state dicts
    record none.

    Args:
        path: a checkpoint file or folder.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return _from_hf_config(p)
        if (p / "open_clip_config.json").is_file():
            return _from_open_clip_config(p)
        return None
    if p.suffix == ".safetensors" and p.is_file():
        return _from_metadata(p)
    return None


def activation_of_module(module: nn.Module, source: str = "module") -> Activation | None:
    """The activation an (unpickled) open_clip model's modules run: the class names of its GELU /
    QuickGELU modules, in the visual tower when there is one. None when there are none or both.

    Args:
        module: an open_clip CLIP, its ``visual``, or a wrapper holding one (task_vectors' ImageEncoder).
        source: the file it came from (for error messages).
    """
    found = {}
    for name, m in module.named_modules():
        kind = _MODULE_ACTS.get(type(m).__name__)
        if kind is not None:
            found.setdefault("visual" in name.split("."), {})[kind] = type(m)
    kinds = found.get(True) or found.get(False) or {}
    if len(kinds) != 1:
        return None
    (kind, cls), = kinds.items()
    return Activation(kind, source, f"its pickled modules are {cls.__module__}.{cls.__qualname__}")


def activation_of_tag(model_name: str, tag: str) -> Activation | None:
    """The activation open_clip's pretrained ``tag`` of ``model_name`` was trained with (None: a tag
    open_clip does not know, e.g. a file path)."""
    import open_clip  # imported where used: ``adamerge merge`` of HF models loads this module without it

    cfg = open_clip.pretrained.get_pretrained_cfg(model_name, tag)
    if not cfg:
        return None
    quick = bool(cfg.get("quick_gelu", False))
    return Activation(QUICK_GELU if quick else GELU, f"open_clip pretrained tag {tag!r}",
                      f"open_clip's pretrained config has quick_gelu={quick}")


def configured_activation(model_name: str, cfg: Mapping | None = None) -> str:
    """``"quick_gelu"`` or ``"gelu"``: what open_clip builds for ``model_name`` (or ``cfg``)."""
    if cfg is None:
        import open_clip

        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; register a config JSON with model_config=")
    return QUICK_GELU if cfg.get("quick_gelu", False) else GELU


def _fix(model_name: str, needed: str) -> str:
    import open_clip

    known = open_clip.list_models()
    if needed == QUICK_GELU:
        other = f"{model_name}-quickgelu"
        if other in known:
            return f"use model_name {other!r}"
        return "use an open_clip model config with \"quick_gelu\": true (like open_clip's '-quickgelu' models)"
    other = model_name.removesuffix("-quickgelu")
    if other != model_name and other in known:
        return f"use model_name {other!r}"
    return "use an open_clip model config without \"quick_gelu\": true"


def check_activation(model_name: str, cfg: Mapping | None, found: Activation | None) -> None:
    """Refuse a checkpoint whose recorded activation is not the configured model's.

    Args:
        model_name: the configured open_clip model (named in the message, with the fix).
        cfg: its open_clip model config (None: ``open_clip.get_model_config(model_name)``).
        found: what the checkpoint records (None: nothing, then nothing is checked).

    Raises:
        ActivationMismatchError: naming the file, what it says, the model, its activation and the fix.
    """
    if found is None:
        return
    have = configured_activation(model_name, cfg)
    if found.name == have:
        return
    raise ActivationMismatchError(
        f"{found.source}: {found.says}, so it needs {_NAMES[found.name]}, but open_clip model "
        f"{model_name!r} runs {_NAMES[have]} (quick_gelu={have == QUICK_GELU}); {_fix(model_name, found.name)}"
    )


def export_metadata(model: nn.Module, model_name: str | None = None, cfg: Mapping | None = None) -> dict[str, str]:
    """Safetensors metadata recording what ``model`` runs: ``activation`` (from its modules) and, when
    the model is known, ``open_clip_model`` and ``open_clip_config`` (JSON, ``quick_gelu`` explicit).

    Args:
        model: the open_clip model (or visual tower) whose weights are written.
        model_name: its open_clip name, if known.
        cfg: its open_clip model config (None: ``open_clip.get_model_config(model_name)``).
    """
    meta = {}
    found = activation_of_module(model)
    if found is not None:
        meta["activation"] = found.name
    if model_name is not None:
        if cfg is None:
            import open_clip

            cfg = open_clip.get_model_config(model_name)
        meta["open_clip_model"] = model_name
        if cfg is not None:
            meta["open_clip_config"] = json.dumps({**cfg, "quick_gelu": bool(cfg.get("quick_gelu", False))})
    return meta
