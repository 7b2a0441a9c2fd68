"""Hugging Face CLIP vision weights → open_clip ``model.visual`` keys, without ``transformers``.

FusionBench ships its experts as HF ``CLIPVisionModel`` folders (``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``, keys ``vision_model.*``; transformers ≥ 5 writes the
same keys without the ``vision_model.`` prefix, which is accepted too). This module reads those
files directly and renames / reshapes the tensors into open_clip's ``VisionTransformer`` layout, so
the optional ``transformers`` package is never imported.

Mapping (``L`` = ``vision_model.encoder.layers.{i}``, ``R`` = ``transformer.resblocks.{i}``)::

    vision_model.embeddings.class_embedding        → class_embedding
    vision_model.embeddings.patch_embedding.weight → conv1.weight
    vision_model.embeddings.position_embedding.weight → positional_embedding
    vision_model.pre_layrnorm.*                    → ln_pre.*
    L.self_attn.{q,k,v}_proj.{weight,bias}          → R.attn.in_proj_{weight,bias} (concatenated q;k;v)
    L.self_attn.out_proj.*                          → R.attn.out_proj.*
    L.layer_norm1.* / L.layer_norm2.*               → R.ln_1.* / R.ln_2.*
    L.mlp.fc1.* / L.mlp.fc2.*                       → R.mlp.c_fc.* / R.mlp.c_proj.*
    vision_model.post_layernorm.*                   → ln_post.*
    visual_projection.weight  [E, W]                → proj [W, E]  (transposed)

The projection lives in ``CLIPModel`` / ``CLIPVisionModelWithProjection``, not in a plain
``CLIPVisionModel``. A CLIPModel folder carries it (its text-tower keys are dropped); for a
CLIPVisionModel folder the caller passes ``projection`` (open_clip's ``proj``, ``[W, E]``): FusionBench
fine-tunes only ``vision_model``, so its experts share the pretrained model's projection, and
:class:`~adamerge.models.open_clip_pool.OpenCLIPPool` passes the pretrained ``proj``.

The activation is not a weight: HF ``hidden_act="quick_gelu"`` (OpenAI CLIP) matches open_clip
configs with ``quick_gelu: true`` (e.g. ``ViT-B-32-quickgelu``); :func:`hf_vision_config` exposes the
config, and :mod:`adamerge.models.activation` refuses a mismatch with the configured model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["HF_WEIGHT_FILES", "convert_hf_clip_state", "convert_hf_vision_state", "hf_vision_config", "is_hf_state"]

# The weight files of an HF model folder or repository, in the order they are looked for (transformers'):
# sharded safetensors (the index), one safetensors file, then the same as pickles.
HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")

_PREFIX = "vision_model."
_BARE = ("embeddings.", "encoder.layers.", "pre_layrnorm.", "post_layernorm.")
_BARE_MARKER = "embeddings.patch_embedding.weight"
_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_IN_LAYER = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_TEXT_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# buffers HF keeps (or kept) that open_clip has no counterpart for
_IGNORED = ("embeddings.position_ids",)


class HFConversionError(ValueError):
    """An HF CLIP state dict that cannot be mapped onto open_clip's visual tower."""


def _with_prefix(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """transformers ≥ 5 saves a CLIPVisionModel without the ``vision_model.`` prefix: add it back."""
    if _BARE_MARKER not in state or any(k.startswith(_PREFIX) for k in state):
        return state
    return {(_PREFIX + k if k.startswith(_BARE) else k): v for k, v in state.items()}


def is_hf_state(state: Mapping[str, Tensor]) -> bool:
    """True if ``state`` looks like an HF CLIPModel / CLIPVisionModel state dict (either key layout)."""
    return _BARE_MARKER in state or any(k.startswith(_PREFIX) for k in state)


def hf_vision_config(folder: str | Path) -> dict:
    """The vision part of an HF CLIP ``config.json`` (CLIPConfig or CLIPVisionConfig)."""
    path = Path(folder) / "config.json"
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if "vision_config" in cfg:  # CLIPModel
        cfg = cfg["vision_config"] or {}
    return cfg


def _convert_layer(prefix: str, i: int, rest: str, t: Tensor, out: dict, qkv: dict) -> None:
    m = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
    if m:
        qkv.setdefault((i, m.group(2)), {})[m.group(1)] = t
        return
    if rest not in _IN_LAYER:
        raise HFConversionError(f"unknown HF key '{prefix}encoder.layers.{i}.{rest}'")
    out[f"transformer.resblocks.{i}.{_IN_LAYER[rest]}"] = t


def _convert_tower(state: Mapping[str, Tensor], prefix: str, top: Mapping[str, str], source: str) -> dict:
    """One transformer tower (``vision_model.`` or ``text_model.``) → open_clip keys, q/k/v fused."""
    layer = re.compile(rf"^{re.escape(prefix)}encoder\.layers\.(\d+)\.(.+)$")
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, t in state.items():
        if not key.startswith(prefix):
            continue
        m = layer.match(key)
        if m:
            _convert_layer(prefix, int(m.group(1)), m.group(2), t, out, qkv)
            continue
        rest = key[len(prefix):]
        if rest in _IGNORED:
            continue
        if rest not in top:
            raise HFConversionError(f"{source}: unknown HF key {key!r}")
        out[top[rest]] = t
    for (i, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise HFConversionError(
                f"{source}: layer {i} lacks 'self_attn.{missing[0]}_proj.{kind}' (needed for in_proj_{kind})"
            )
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def convert_hf_vision_state(
    state: Mapping[str, Tensor], projection: Tensor | None = None, source: str = "HF state dict"
) -> dict[str, Tensor]:
    """Convert HF ``vision_model.*`` (+ ``visual_projection.weight``) keys to open_clip visual keys.

    Args:
        state: an HF CLIPModel, CLIPVisionModelWithProjection or CLIPVisionModel state dict.
            Text-tower keys (``text_model.*``, ``text_projection``, ``logit_scale``) are dropped.
        projection: open_clip ``proj`` ``[W, E]`` used when ``state`` has no ``visual_projection``.
        source: how the state dict is called in error messages (usually its file name).
    """
    state = _with_prefix(state)
    out = _convert_tower(state, _PREFIX, _TOP, source)
    if "visual_projection.weight" in state:
        out["proj"] = state["visual_projection.weight"].t().contiguous()
    elif projection is not None:
        out["proj"] = projection.detach().clone()
    else:
        raise HFConversionError(
            f"{source} has no 'visual_projection.weight' (a CLIPVisionModel keeps it in CLIPModel): "
            "pass projection= (open_clip's proj [width, embed_dim], e.g. the pretrained model's)"
        )
    return out


def convert_hf_clip_state(state: Mapping[str, Tensor], source: str = "HF state dict") -> dict[str, Tensor]:
    """A whole HF ``CLIPModel`` state dict → an open_clip ``CLIP`` state dict (both towers).

    Text tower: ``text_model.embeddings.token_embedding`` → ``token_embedding``, ``position_embedding``
    → ``positional_embedding``, layers as for vision, ``final_layer_norm`` → ``ln_final``,
    ``text_projection.weight [E, W]`` → ``text_projection [W, E]``, ``logit_scale`` as is.

    Args:
        state: an HF CLIPModel state dict (``vision_model.*``, ``text_model.*``, both projections).
        source: how the state dict is called in error messages.
    """
    need = [k for k in ("text_projection.weight", "logit_scale", "visual_projection.weight") if k not in state]
    if need:
        raise HFConversionError(f"{source}: not a full HF CLIPModel (no {need[0]!r})")
    out = {f"visual.{k}": v for k, v in convert_hf_vision_state(state, source=source).items()}
    out.update(_convert_tower(state, "text_model.", _TEXT_TOP, source))
    out["text_projection"] = state["text_projection.weight"].t().contiguous()
    out["logit_scale"] = state["logit_scale"].reshape(())
    return out
