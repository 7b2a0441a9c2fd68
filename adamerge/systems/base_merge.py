"""One way to name the frozen merge a method builds on (Surgery's base, WEMoE's non-MLP weights).

A ``base_merge`` is one of

* a static method name, ``"task_arithmetic"`` (its defaults);
* a mapping ``{"method": name, **kwargs}``, e.g. ``{"method": "ties", "keep": 0.2, "lam": 0.3}``,
  passed to :func:`adamerge.merging.merge_pool`;
* a path to a merged image-encoder state dict (any format
  :func:`adamerge.models.checkpoints.load_visual_state` reads: an AdaMerging export's
  ``merged.safetensors``, a tensors-only ``.pt``, a full-CLIP export);
* the Hugging Face id of a repository holding one (``org/name[@revision]``, read through the Hugging
  Face cache: :func:`adamerge.models.hub.resolve_checkpoint`).

A string is a path when it names an existing file or folder, contains a path separator, or ends in
a checkpoint suffix (:func:`adamerge.models.checkpoints.is_path`, re-exported here), and a Hub id when
it is none of those but reads ``org/name`` (:func:`adamerge.models.hub.is_repo_id`); otherwise it is a
method name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from adamerge.files import read_manifest
from adamerge.merging import merge_pool
from adamerge.merging.registry import LABELS
from adamerge.models.checkpoints import CheckpointError, is_path, load_visual_state
from adamerge.models.hub import is_repo_id, parse_ref, resolve_checkpoint
from adamerge.models.pool import ModelPool

__all__ = ["BaseMerge", "base_merge_label", "base_merge_state", "is_path"]

BaseMerge = str | dict[str, Any]


def base_merge_state(
    pool: ModelPool, base_merge: BaseMerge | os.PathLike, tasks: Sequence[str] | None = None,
    option: str = "base_merge",
) -> dict[str, Tensor]:
    """The merged encoder state ``base_merge`` names, validated against θ_0 (errors name ``option``).

    Args:
        pool: the model pool.
        base_merge: a method name, a ``{"method": ..., **kwargs}`` mapping, or a file path.
        tasks: the tasks whose experts are merged (default: every task of the pool).
        option: how errors call the option.
    """
    if isinstance(base_merge, str) and is_repo_id(base_merge):
        base_merge = resolve_checkpoint(base_merge, label=f"{option}: {base_merge}")
    if is_path(base_merge):
        try:
            return load_visual_state(base_merge, reference=pool.pretrained_state(),  # activation checked too
                                     model_name=pool.model_name, model_config=pool.model_config)
        except CheckpointError as e:
            raise CheckpointError(f"{option}: {e}") from None
    if isinstance(base_merge, str):
        method, kwargs = base_merge, {}
    elif isinstance(base_merge, Mapping):
        kwargs = dict(base_merge)
        method = kwargs.pop("method", None)
        if not isinstance(method, str):
            raise ValueError(f"{option}: a mapping needs a 'method' name, got {dict(base_merge)}")  # noqa: TRY004
    else:
        raise TypeError(f"{option} must be a method name, a mapping or a file path, got {type(base_merge).__name__}")
    if tasks is not None and list(tasks) != pool.tasks:
        kwargs.setdefault("tasks", list(tasks))
    return merge_pool(pool, method, **kwargs)


def base_merge_label(base_merge: BaseMerge | os.PathLike) -> str:
    """The short row name of a base merge: the method's registered label (``TA``, ``TIES``), or for a
    file the ``method`` its export's ``manifest.json`` records (``AdaMerging``), else the file's stem; for a
    Hub id, the repository's name."""
    if isinstance(base_merge, str) and is_repo_id(base_merge):
        return parse_ref(base_merge)[0].split("/", 1)[1]
    if is_path(base_merge):
        path = Path(base_merge)
        try:
            manifest = read_manifest(path.parent, verify=False) if path.is_file() else None
        except ValueError:
            manifest = None
        method = (manifest or {}).get("method")
        return method if isinstance(method, str) and method else path.stem
    method = base_merge.get("method", "task_arithmetic") if isinstance(base_merge, Mapping) else base_merge
    return LABELS.get(str(method), str(method))
