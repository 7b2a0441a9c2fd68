"""Zero-shot classification heads from CLIP's text tower (the task_vectors recipe).

For class c with templates t_1..t_T (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", arXiv 2103.00020; Ilharco et al., arXiv 2212.04089)::

    e_{c,j} = normalize(text_encoder(t_j.format(c)))
    w_c     = normalize( (1/T) Σ_j e_{c,j} )          head = [w_1; …; w_C]   ∈ R^{C×D}
    logits  = exp(logit_scale) · normalize(f(x)) @ headᵀ

where t_j.format(c) fills a template's first ``{}`` with the class name (other braces stay as written).
Heads are cached on disk (safetensors) under ``cache_dir/<model fingerprint>/<task>-<prompt hash>``:
the fingerprint hashes the text tower's weights, the prompt hash the class names and templates, so a
changed model, class list or template set never reads a stale head.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.models.checkpoints import CheckpointError, read_state_dict, save_state_dict

__all__ = [
    "ZeroShotTask",
    "build_zero_shot_head",
    "cached_zero_shot_head",
    "head_cache_path",
    "logit_scale_of",
    "prompts_hash",
    "text_tower_fingerprint",
]

Tokenizer = Callable[[list[str]], Tensor]


class ZeroShotTask(Protocol):
    """What a zero-shot head needs to know about a task; the task registry's ``TaskInfo`` is one.

    Loaders are handed these (or a ``task name → ZeroShotTask`` lookup) and never look them up.
    """

    @property
    def classnames(self) -> Sequence[str]:
        """One human-readable name per class, in label order."""
        ...

    @property
    def templates(self) -> Sequence[str]:
        """Prompt format strings with one ``{}`` for the class name."""
        ...


def logit_scale_of(clip_model: nn.Module) -> float:
    """CLIP's temperature as a multiplier: ``clip_model.logit_scale.exp()``."""
    return float(clip_model.logit_scale.detach().float().exp())


def _fill(template: str, classname: str) -> str:
    return template.replace("{}", classname, 1)


@torch.no_grad()
def build_zero_shot_head(
    clip_model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> Tensor:
    """The ``[C, D]`` head (rows L2-normalised, float32, on CPU) for ``classnames`` and ``templates``.

    Args:
        clip_model: an open_clip CLIP (anything with ``encode_text(tokens)``); its mode is restored.
        tokenizer: open_clip tokenizer: list of strings → token tensor.
        classnames: one name per class, in label order.
        templates: prompt format strings with one ``{}``.
        batch_size: prompts encoded per forward pass.
        device: where to run the text tower (defaults to the model's device).
    """
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError("a zero-shot head needs at least one class name and one template")
    if device is None:
        device = next(clip_model.parameters()).device
    prompts = [_fill(t, c) for c in classnames for t in templates]
    was_training = clip_model.training
    clip_model.eval()
    try:
        chunks = []
        for i in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[i : i + batch_size]).to(device)
            chunks.append(clip_model.encode_text(tokens).float().cpu())
    finally:
        clip_model.train(was_training)
    emb = F.normalize(torch.cat(chunks), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def text_tower_fingerprint(clip_model: nn.Module) -> str:
    """A hash of every non-visual tensor (text tower, projections, logit scale) of a CLIP model."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(clip_model.state_dict().items()):
        if name.startswith("visual."):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())  # the shape before flattening: 2×3 is not 3×2
        flat = t.reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def prompts_hash(classnames: Sequence[str], templates: Sequence[str]) -> str:
    """A hash of the class names and templates, in order."""
    h = hashlib.blake2b(digest_size=8)
    for part in ("classnames", *classnames, "templates", *templates):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def head_cache_path(cache_dir: str | os.PathLike, model_id: str, task: str, classnames, templates) -> Path:
    """Where the head of ``task`` for the model ``model_id`` is cached."""
    safe_task = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in task)
    return Path(cache_dir) / model_id / f"{safe_task}-{prompts_hash(classnames, templates)}.safetensors"


def cached_zero_shot_head(
    clip_model: nn.Module,
    tokenizer: Tokenizer,
    task: str,
    classnames: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | os.PathLike | None,
    model_id: str | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """:func:`build_zero_shot_head` with a disk cache (no cache when ``cache_dir`` is None).

    Args:
        clip_model: the CLIP model whose text tower builds the head.
        tokenizer: its open_clip tokenizer.
        task: the task name (part of the cache key).
        classnames: class names in label order.
        templates: prompt templates.
        cache_dir: cache folder, or None to always compute.
        model_id: the model's identity in the cache key; defaults to :func:`text_tower_fingerprint`.
        device: where to run the text tower.
    """
    if cache_dir is None:
        return build_zero_shot_head(clip_model, tokenizer, classnames, templates, device=device)
    model_id = model_id or text_tower_fingerprint(clip_model)
    path = head_cache_path(cache_dir, model_id, task, classnames, templates)
    if path.is_file():
        try:
            head = read_state_dict(path)["head"]
        except (CheckpointError, KeyError):
            head = None  # unreadable cache entry: rebuild and overwrite it
        if head is not None and head.shape[0] == len(classnames):
            return head
    head = build_zero_shot_head(clip_model, tokenizer, classnames, templates, device=device)
    save_state_dict({"head": head}, path, metadata={"task": task, "model_id": model_id})
    return head
