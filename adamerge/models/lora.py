"""A PEFT LoRA adapter folder as an expert: its weights are the base's plus s·B·A, per tensor on the fly.

    θ_k[W] = W_0 + s · B A           (an nn.Linear; ``fan_in_fan_out``: (B A)ᵀ)
    θ_k[E] = E_0 + s · (B A)ᵀ        (an nn.Embedding: ``lora_embedding_A`` [r, V], ``_B`` [d, r])
    s = α / r, or α / √r with ``use_rslora``; r and α per module from ``rank_pattern`` / ``alpha_pattern``

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv 2106.09685; the
layout and scaling are PEFT's (``peft/tuners/lora/layer.py`` ``update_layer`` / ``get_delta_weight``).
Full tensors an adapter saves (``modules_to_save``, an embedding's ``base_layer`` with a resized
vocabulary) replace the base's tensor before the delta is added. So the task vector of a LoRA expert
is s·B·A on the adapted weights and (saved − base) on saved modules, computed one tensor at a time:
no merged copy of the model is ever made. Variants whose weights are not W_0 + s·B·A (DoRA, LoRA
biases, conv adapters, parameter targets, replicated layers) are refused with the option named.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from adamerge.models.safetensors_folder import FolderError, SafetensorsFolder

__all__ = ["ADAPTER_CONFIG", "LoraExpert", "is_adapter_folder"]

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBED = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
# adapter_config options under which a weight is not W_0 + s·B·A: refused, named
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "layer_replication": "replicated layers",
                "target_parameters": "LoRA on parameters", "trainable_token_indices": "trainable token indices",
                "use_qalora": "QA-LoRA", "alora_invocation_tokens": "aLoRA"}


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local folder holding a PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``module`` (a dotted name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraExpert:
    """The weights of a model fine-tuned with LoRA, given the base model and the adapter folder.

    Reads like :class:`~adamerge.models.safetensors_folder.SafetensorsFolder` (``keys``, ``shape``,
    ``dtype``, ``get``): ``get(key)`` is the base tensor (or the adapter's full copy) plus the LoRA
    delta, in float32.

    Args:
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) or its Hub id.
        base: the base model the adapter was trained on.
        label: how errors name it (e.g. ``"expert 'math'"``).
    """

    def __init__(self, path: str | os.PathLike, base: SafetensorsFolder, label: str = "adapter") -> None:
        self.label = label
        self.base = base
        self.adapter = SafetensorsFolder(path, label, weights="adapter_model.safetensors")
        self.path = self.adapter.path
        self.config = self._read_config()
        self._full: dict[str, str] = {}  # base key → adapter key of a saved full tensor
        parts: dict[str, dict[str, str]] = {}
        for name in self.adapter.keys():  # noqa: SIM118
            key = name.removeprefix(_PREFIX)
            m = _LORA.match(key) or _EMBED.match(key)
            if m is not None:
                parts.setdefault(m["module"], {})[m["part"].replace("_embedding", "")] = name
                parts[m["module"]]["embedding"] = "1" if "embedding" in m["part"] else ""
                continue
            if ".lora_" in key:
                raise FolderError(f"{label}: adapter tensor {name!r} is not a LoRA A/B weight of a linear or "
                                  "embedding layer (only those are supported)")
            self._full[self._base_key(key.replace(".base_layer.", "."), name)] = name
        self._lora: dict[str, tuple[str, str, bool, float]] = {}  # base key → (A, B, embedding, scale)
        for module, p in parts.items():
            if "lora_A" not in p or "lora_B" not in p:
                raise FolderError(f"{label}: module {module!r} has only one of its LoRA A/B weights")
            key = self._base_key(f"{module}.weight", p["lora_A"])
            self._lora[key] = (p["lora_A"], p["lora_B"], bool(p["embedding"]), self._scale(module, p))

    def _read_config(self) -> dict:
        path = self.path / ADAPTER_CONFIG
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FolderError(f"{self.label}: {path} is not readable JSON ({e})") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise FolderError(f"{self.label}: {path}: peft_type {config.get('peft_type')!r} is not supported "
                              "(LoRA adapters only)")
        for option, what in _UNSUPPORTED.items():
            if config.get(option):
                raise FolderError(f"{self.label}: {path}: {option}={config[option]!r} ({what}) is not supported: "
                                  "its weights are not W + s·B·A")
        return config

    def _base_key(self, key: str, name: str) -> str:
        if key not in self.base:
            raise FolderError(f"{self.label}: adapter tensor {name!r} adapts {key!r}, which the base model "
                              f"{self.base.source} does not have (an adapter of another model?)")
        return key

    def _scale(self, module: str, parts: dict[str, str]) -> float:
        r_file = self.adapter.shape(parts["lora_A"])[0]
        r = int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", r_file)))
        if r != r_file:
            raise FolderError(f"{self.label}: {module}: lora_A has rank {r_file} but the adapter config says r={r}")
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", r)))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    # ---- the expert's weights -----------------------------------------------------------------
    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        return self.adapter.shape(self._full[key]) if key in self._full else self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def adapted(self) -> list[str]:
        """Base keys this adapter changes (LoRA deltas and saved full tensors)."""
        return sorted(set(self._lora) | set(self._full))

    def delta(self, key: str, rows: slice | None = None) -> Tensor | None:
        """s·B·A for ``key`` in float32, or its ``rows`` (None when the adapter has no LoRA weights for it)."""
        if key not in self._lora:
            return None
        a_name, b_name, embedding, scale = self._lora[key]
        a, b = self.adapter.get(a_name).float(), self.adapter.get(b_name).float()
        if embedding or self.config.get("fan_in_fan_out"):  # the weight is (B·A)ᵀ: its rows are A's columns
            return (b @ (a if rows is None else a[:, rows])).t().mul_(scale)
        return ((b if rows is None else b[rows]) @ a).mul_(scale)

    def get(self, key: str, rows: slice | None = None) -> Tensor:
        """θ_k[key] (or its ``rows``) in float32: the saved full tensor or the base's, plus the LoRA delta."""
        w = (self.adapter.get(self._full[key], rows) if key in self._full else self.base.get(key, rows)).float()
        d = self.delta(key, rows)
        if d is None:
            return w
        if d.shape != w.shape:
            raise FolderError(f"{self.label}: the LoRA delta of {key!r} has shape {tuple(d.shape)} but the weight "
                              f"{tuple(w.shape)}")
        return w.add_(d)

    def side_files(self) -> list[Path]:
        return self.adapter.side_files()

    def __repr__(self) -> str:
        return f"LoraExpert({self.adapter.source!r}, {len(self._lora)} LoRA weights, {len(self._full)} full)"
