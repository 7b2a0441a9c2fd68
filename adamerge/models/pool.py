"""The model pool: one pretrained image encoder, K experts, and a frozen zero-shot head per task.

Everything downstream (static merges, AdaMerging, WEMoE, Surgery, evaluation) reads models through
this class, so loaders only have to produce one. Experts are *sources*: a state dict, or a callable
returning one (loaded on demand and dropped after use), so a pool of 8-20 ViT-B/32 experts streams
task vectors one at a time instead of holding every full model.

Encoder convention: ``encoder(images) -> features [B, D]`` (open_clip's ``model.visual``, which
already applies the projection). Head of task k: ``[C_k, D]``, rows L2-normalised. Logits:
``logit_scale · normalize(features) @ headᵀ`` (:func:`zero_shot_logits`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.files import file_fingerprint
from adamerge.merging.task_vectors import MergeError, check_compatible, state_fingerprint, task_vector
from adamerge.models.activation import export_metadata
from adamerge.models.checkpoints import check_finite

ExpertSource = Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]]

__all__ = ["ExpertSource", "ModelPool", "check_task_list", "zero_shot_logits"]


def check_task_list(tasks: Sequence[str], known: Sequence[str]) -> list[str]:
    """``tasks`` as a list: non-empty, no task twice, each one of ``known`` (a pool's tasks), else a
    :class:`MergeError` naming the task."""
    tasks = list(tasks)
    if not tasks:
        raise MergeError("empty task list")
    dup = next((t for i, t in enumerate(tasks) if t in tasks[:i]), None)
    if dup is not None:
        raise MergeError(f"task {dup!r} is listed twice in {tasks}")
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise MergeError(f"task {unknown[0]!r} has no expert in the pool (pool tasks: {list(known)})")
    return tasks


def zero_shot_logits(features: Tensor, head: Tensor, logit_scale: float | Tensor) -> Tensor:
    """logit_scale · normalize(features) @ headᵀ (head rows already normalised)."""
    return logit_scale * F.normalize(features, dim=-1) @ head.t().to(features.dtype)


class ModelPool:
    """A pretrained encoder, expert sources and zero-shot heads, keyed by task name.

    Args:
        encoder: the pretrained image encoder θ_0 (never modified; copies are made when needed).
        experts: task name → expert state dict (same keys as ``encoder.state_dict()``) or a
            zero-argument callable that loads it.
        heads: task name → zero-shot head ``[num_classes, D]`` with L2-normalised rows.
        logit_scale: the multiplier applied to cosine similarities (CLIP's ``logit_scale.exp()``).
        name: a short identifier (model name), used in cache keys and checkpoints.
    """

    model_name: str | None = None
    """The open_clip model the encoder is, when known (OpenCLIPPool): files read for this pool (a base
    merge) are checked against its activation, and exports record it."""
    model_config: dict | None = None
    """That model's open_clip config (None: ``open_clip.get_model_config(model_name)``)."""

    def __init__(
        self,
        encoder: nn.Module,
        experts: Mapping[str, ExpertSource],
        heads: Mapping[str, Tensor],
        logit_scale: float = 100.0,
        name: str = "pool",
        benchmark: str | None = None,
    ) -> None:
        if len(experts) == 0:
            raise ValueError("empty expert list: a model pool needs at least one expert")
        missing = [t for t in experts if t not in heads]
        if missing:
            raise ValueError(f"no zero-shot head for task {missing[0]!r}")
        self.encoder = encoder.eval().requires_grad_(False)
        self._experts = dict(experts)
        self.heads = {t: heads[t].detach() for t in experts}
        self.logit_scale = float(logit_scale)
        self.name = name
        # What results tables group by: the same for every seed of one benchmark (default: the name).
        self.benchmark_id = benchmark or name
        self._pretrained = {k: v.detach() for k, v in encoder.state_dict().items()}
        self._fingerprints: dict | None = None

    # ---- tasks ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self._experts)

    def check_tasks(self, tasks: Sequence[str]) -> list[str]:
        """Validate that ``tasks`` is a non-empty list of tasks this pool has experts for."""
        return check_task_list(tasks, self.tasks)

    def head(self, task: str) -> Tensor:
        self.check_tasks([task])
        return self.heads[task]

    # ---- weights -------------------------------------------------------------------------
    def pretrained_state(self) -> dict[str, Tensor]:
        """A detached copy of θ_0's state dict."""
        return {k: v.clone() for k, v in self._pretrained.items()}

    def expert_state(self, task: str) -> dict[str, Tensor]:
        """θ_k for ``task``, loaded from its source and validated against θ_0 (keys, shapes, finite)."""
        self.check_tasks([task])
        src = self._experts[task]
        state = src() if callable(src) else src
        state = {k: v.detach() for k, v in state.items()}
        try:
            check_compatible(self._pretrained, state, name=f"expert {task!r}")
            check_finite(state, name=f"expert {task!r}")
        except MergeError as e:
            raise MergeError(str(e)) from None
        return state

    def fingerprints(self) -> dict:
        """``{"pretrained": hash, "experts": {task: hash}}``: cheap content hashes that tell whether two
        pools hold the same weights. A file source (one with a ``path``) is hashed from its file
        (:func:`adamerge.files.file_fingerprint`, about half a megabyte read per file), an in-memory
        one from sampled tensor entries. Computed once per pool."""
        if self._fingerprints is None:
            experts = {}
            for task, src in self._experts.items():
                path = getattr(src, "path", None)
                if path is not None:
                    experts[task] = file_fingerprint(path)
                else:
                    experts[task] = state_fingerprint(src() if callable(src) else src)
            self._fingerprints = {"pretrained": state_fingerprint(self._pretrained), "experts": experts}
        return self._fingerprints

    def task_vector(self, task: str) -> dict[str, Tensor]:
        """τ_k = θ_k − θ_0 (float keys only)."""
        return task_vector(self.expert_state(task), self._pretrained)

    def task_vectors(self, tasks: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """Stream (task, τ_k) pairs; only one expert is materialised at a time."""
        for t in self.check_tasks(self.tasks if tasks is None else tasks):
            yield t, self.task_vector(t)

    def export(self, visual_state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
        """Save a merged encoder state dict to ``path`` (``.safetensors`` or ``.pt``), atomically.

        The base pool writes the encoder's state dict only (a ``.safetensors`` file records the
        encoder's activation in its metadata); :class:`~adamerge.models.open_clip_pool.OpenCLIPPool`
        writes a full open_clip CLIP that ``open_clip.create_model(name, pretrained=path)`` loads.
        Tensors are written in the encoder's dtypes. Keys, shapes and finiteness are checked first; on
        error nothing is written.
        """
        from adamerge.models.checkpoints import save_state_dict

        check_compatible(self._pretrained, visual_state, name="merged state dict")
        # written in the model's dtypes (a float32 merge of a bf16 encoder is saved bf16), as OpenCLIPPool does
        visual_state = {k: visual_state[k].detach().to(ref.dtype) for k, ref in self._pretrained.items()}
        return save_state_dict(visual_state, path,
                               metadata=export_metadata(self.encoder, self.model_name, self.model_config))

    def build_encoder(self, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        """A new encoder (deep copy of θ_0's module) with ``state`` loaded strictly, frozen, eval mode."""
        enc = copy.deepcopy(self.encoder)
        if state is not None:
            check_compatible(self._pretrained, state, name="merged state dict")
            enc.load_state_dict(state, strict=True)
        return enc.eval().requires_grad_(False)
