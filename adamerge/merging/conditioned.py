"""Task-conditioned merges: one shared task vector plus a tiny part per task, used *with the task id*.

    θ_k = θ_0 + λ_k (m_k ⊙ τ_uni)        τ_uni shared, m_k a bool mask and λ_k a scalar of task k

EMR-Merging (:mod:`adamerge.merging.emr`) and TALL masks' compressed form
(:func:`adamerge.merging.consensus.tall_mask_merge`) return a :class:`TaskConditionedMerge` instead of
one state dict: evaluating task k needs its id, so they are registered here with
:func:`register_conditioned` and run by :func:`merge_pool_conditioned`, not by ``merge_pool``.

Storage (:meth:`TaskConditionedMerge.storage_bytes`), with N the entries of the shared keys and K tasks:

    θ_0 (its own dtypes) + τ_uni (N · 4 bytes in float32) + K masks (1 bit per entry: Σ_key ⌈n_key/8⌉
    bytes each) + K scalars (4 bytes each),  next to K full experts = K · bytes(θ_0).

With θ_0 in float32 and every key shared that is (2 + K/32) / K of the experts: 0.28 for 8 tasks, 0.13
for 20 (ViT-B/32's 88 M-entry tower: 0.79 GB against 2.8 GB for 8 tasks). :meth:`~TaskConditionedMerge.save`
writes exactly this: τ_uni, the masks bit-packed, the scalars and task names in the metadata (θ_0 is
not written; :meth:`~TaskConditionedMerge.load` takes it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from adamerge.files import atomic_path
from adamerge.merging.registry import TaskVectorSource
from adamerge.merging.task_vectors import MergeError, StateDict, check_finite, is_mergeable

__all__ = [
    "CONDITIONED",
    "CONDITIONED_LABELS",
    "CONDITIONED_PRESETS",
    "TaskConditionedMerge",
    "merge_pool_conditioned",
    "register_conditioned",
]

FORMAT = "adamerge.task_conditioned_merge"
_VERSION = 1
_SCALE_BYTES = 4  # one float32 per task


def _scale(value: Any, i: int) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"scales[{i}] must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise MergeError(f"scales[{i}] must be finite, got {value!r}")
    return v


@dataclass(frozen=True, eq=False)
class TaskConditionedMerge:
    """θ_0, a shared task vector and one (bool mask, scale) per task; :meth:`state_for` builds model k.

    Args:
        pretrained: θ_0 (every key of the models built; held, never modified).
        vector: the shared task vector τ_uni over float keys of θ_0 (any float dtype; float32 from the
            merges here).
        masks: one dict of bool tensors per task, with exactly ``vector``'s keys and shapes.
        scales: one finite scale λ_k per task.
        tasks: the task names, one per mask (unique), or None.
        method: the label of the merge that made it ("EMR-Merging", "TALL masks").
    """

    pretrained: Mapping[str, Tensor]
    vector: Mapping[str, Tensor]
    masks: Sequence[Mapping[str, Tensor]]
    scales: Sequence[float]
    tasks: Sequence[str] | None = None
    method: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.masks, Mapping):
            raise MergeError("masks must be a list with one mask dict per task, got a single dict")
        fixed = {"pretrained": dict(self.pretrained), "vector": dict(self.vector),
                 "masks": tuple(dict(m) for m in self.masks),
                 "scales": tuple(_scale(s, i) for i, s in enumerate(self.scales)),
                 "tasks": None if self.tasks is None else tuple(self.tasks)}
        for name, value in fixed.items():  # frozen: set once, here
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        for key, v in self.vector.items():
            base = self.pretrained.get(key)
            if base is None:
                raise MergeError(f"shared task vector key {key!r} is missing from the pretrained state dict")
            if not (is_mergeable(v) and is_mergeable(base)):
                raise MergeError(f"shared task vector key {key!r}: {v.dtype} over pretrained {base.dtype}; "
                                 "both must be floating point")
            if tuple(v.shape) != tuple(base.shape):
                raise MergeError(f"shared task vector: shape mismatch at key {key!r}: pretrained "
                                 f"{tuple(base.shape)}, vector {tuple(v.shape)}")
        check_finite(self.vector, name="shared task vector")
        if not self.masks:
            raise MergeError("no task masks: need at least one task")
        for i, mask in enumerate(self.masks):
            if mask.keys() != self.vector.keys():
                odd = min(mask.keys() ^ self.vector.keys())
                raise MergeError(f"mask {i} and the shared task vector differ at key {odd!r}")
            for key, m in mask.items():
                if m.dtype != torch.bool or tuple(m.shape) != tuple(self.vector[key].shape):
                    raise MergeError(f"mask {i} at key {key!r} must be bool of shape "
                                     f"{tuple(self.vector[key].shape)}, got {m.dtype} {tuple(m.shape)}")
        if len(self.scales) != len(self.masks):
            raise MergeError(f"got {len(self.scales)} scales for {len(self.masks)} task masks")
        if self.tasks is not None:
            if len(self.tasks) != len(self.masks):
                raise MergeError(f"got {len(self.tasks)} task names for {len(self.masks)} task masks")
            if not all(isinstance(t, str) for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
                raise MergeError(f"task names must be unique strings, got {list(self.tasks)}")

    def __len__(self) -> int:
        return len(self.masks)

    def index(self, task: int | str) -> int:
        """The position of ``task`` (its index 0..K-1 or its name)."""
        if isinstance(task, str):
            if self.tasks is None:
                raise MergeError(f"this {self.method or 'merge'} has no task names: pass task {task!r} by index")
            if task not in self.tasks:
                raise MergeError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self):
            raise MergeError(f"task index must be an int in [0, {len(self)}), got {task!r}")
        return task

    @torch.no_grad()
    def state_for(self, task: int | str) -> dict[str, Tensor]:
        """Model k: θ_0 + λ_k (m_k ⊙ τ_uni), computed in float32 and returned in θ_0's dtypes; keys
        outside the shared vector (and non-float keys) are copied from θ_0.

        Args:
            task: the task's index 0..K-1 or its name.
        """
        k = self.index(task)
        mask, lam = self.masks[k], self.scales[k]
        out: dict[str, Tensor] = {}
        for key, base in self.pretrained.items():
            if key not in self.vector:
                out[key] = base.clone()
                continue
            delta = self.vector[key].to(base.device).float() * mask[key].to(base.device)
            out[key] = (base.float() + lam * delta).to(base.dtype)
        return out

    def storage_bytes(self, dtype: torch.dtype | None = None) -> dict[str, int | float]:
        """Bytes to store the merge next to K full experts (see the module docstring for the formula).

        Args:
            dtype: count the shared vector in this dtype (default: its own, float32 from the merges).

        Returns ``tasks`` (K), ``entries`` (N), ``pretrained``, ``vector``, ``masks`` (1 bit per entry,
        each key rounded up to whole bytes, as :meth:`save` packs them), ``scales``, ``total`` (their sum),
        ``experts`` (K · bytes(θ_0)) and ``ratio`` (total / experts).
        """
        pre = sum(t.numel() * t.element_size() for t in self.pretrained.values())
        vec = sum(v.numel() * (dtype or v.dtype).itemsize for v in self.vector.values())
        masks = len(self) * sum((v.numel() + 7) // 8 for v in self.vector.values())
        scales = _SCALE_BYTES * len(self)
        total, experts = pre + vec + masks + scales, len(self) * pre
        return {"tasks": len(self), "entries": sum(v.numel() for v in self.vector.values()), "pretrained": pre,
                "vector": vec, "masks": masks, "scales": scales, "total": total, "experts": experts,
                "ratio": total / experts if experts else math.inf}

    def save(self, path: str | os.PathLike) -> None:
        """Write one ``.safetensors`` file atomically: τ_uni as ``vector/<key>``, mask k of a key as
        ``mask/<k>/<key>`` (``numpy.packbits`` of the flattened mask, uint8), and in the metadata (JSON
        under ``"adamerge"``) the keys, their shapes, the scales, the task names and the method. θ_0 is
        not written."""
        tensors = {f"vector/{key}": v.detach().cpu().contiguous() for key, v in self.vector.items()}
        for k, mask in enumerate(self.masks):
            for key, m in mask.items():
                bits = np.packbits(m.detach().cpu().reshape(-1).numpy())
                tensors[f"mask/{k}/{key}"] = torch.from_numpy(bits)
        meta = {"format": FORMAT, "version": _VERSION, "method": self.method,
                "tasks": None if self.tasks is None else list(self.tasks), "scales": list(self.scales),
                "shapes": {key: list(v.shape) for key, v in self.vector.items()}}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"adamerge": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, pretrained: StateDict) -> TaskConditionedMerge:
        """Read a file :meth:`save` wrote, exactly; tensors go to the device of θ_0's key.

        Args:
            path: the ``.safetensors`` file.
            pretrained: θ_0, checked against the file's keys and shapes.
        """
        try:
            handle = safe_open(str(path), framework="pt")
        except SafetensorError as e:
            raise MergeError(f"{path} is not a readable .safetensors file: {e}") from None
        with handle as f:
            meta = _metadata(f.metadata(), path)
            if meta.get("version") != _VERSION:
                raise MergeError(f"{path}: unsupported format version {meta.get('version')!r}")
            shapes = {key: tuple(s) for key, s in meta["shapes"].items()}
            missing = [key for key in shapes if key not in pretrained]
            if missing:
                raise MergeError(f"{path}: key {missing[0]!r} is missing from the pretrained state dict")
            vector = {key: f.get_tensor(f"vector/{key}").to(pretrained[key].device) for key in shapes}
            masks = [{key: _unpack(f.get_tensor(f"mask/{k}/{key}"), shape).to(pretrained[key].device)
                      for key, shape in shapes.items()} for k in range(len(meta["scales"]))]
        return cls(pretrained, vector, masks, meta["scales"], meta["tasks"], meta["method"])


def _metadata(header: dict[str, str] | None, path: str | os.PathLike) -> dict[str, Any]:
    try:
        meta = json.loads((header or {}).get("adamerge", ""))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MergeError(f"{path} is not a task-conditioned merge file (no {FORMAT!r} metadata)")
    return meta


def _unpack(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    bits = np.unpackbits(packed.numpy(), count=math.prod(shape)).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


# ---- registry ---------------------------------------------------------------------------------------
ConditionedFn = Callable[..., TaskConditionedMerge]
CONDITIONED: dict[str, ConditionedFn] = {}  # name → fn(pool, tasks=None, **kwargs)
CONDITIONED_LABELS: dict[str, str] = {}
CONDITIONED_PRESETS: dict[str, dict[str, dict[str, Any]]] = {}
_ORIGINS: dict[str, str] = {}


def register_conditioned(
    name: str, label: str | None = None, presets: dict[str, dict[str, Any]] | None = None,
) -> Callable[[ConditionedFn], ConditionedFn]:
    """Register ``fn(pretrained, task_vectors, **kwargs) -> TaskConditionedMerge`` under ``name``
    (returns it unchanged); on a pool it runs with the pool's task names filled in.

    Args:
        name: the name :func:`merge_pool_conditioned` knows it by.
        label: the short name results tables use (default ``name``).
        presets: named official settings, ``{"official": {...}}``: the arguments of one published run.
    """

    def decorate(fn: ConditionedFn) -> ConditionedFn:
        origin = f"{fn.__module__}.{fn.__qualname__}"
        if name in CONDITIONED and _ORIGINS[name] != origin:
            raise ValueError(f"conditioned merge {name!r} is registered twice: by {_ORIGINS[name]} and {origin}")

        def run(pool: TaskVectorSource, tasks: Sequence[str] | None = None, **kwargs: Any) -> TaskConditionedMerge:
            names, taus = [], []
            for task, tau in pool.task_vectors(tasks):
                names.append(task)
                taus.append(tau)
            return dataclasses.replace(fn(pool.pretrained_state(), taus, **kwargs), tasks=names)

        run.__doc__, run.__wrapped__ = fn.__doc__, fn  # type: ignore[attr-defined]
        CONDITIONED[name], _ORIGINS[name] = run, origin
        CONDITIONED_LABELS[name] = label or name
        CONDITIONED_PRESETS[name] = {k: dict(v) for k, v in (presets or {}).items()}
        return fn

    return decorate


@torch.no_grad()
def merge_pool_conditioned(
    pool: TaskVectorSource, name: str, tasks: Sequence[str] | None = None, preset: str | None = None,
    **kwargs: Any,
) -> TaskConditionedMerge:
    """Run a task-conditioned merge chosen by name on a pool; the result carries the pool's task names.

    Args:
        pool: the model pool (θ_0 and the experts, read as task vectors).
        name: a registered conditioned merge (``CONDITIONED``: emr, tall_masks).
        tasks: the tasks merged, in this order (default all, pool order).
        preset: a named official setting (``CONDITIONED_PRESETS``); ``kwargs`` override its values.
        **kwargs: the method's own arguments.
    """
    from adamerge.merging.dispatch import call_registered

    return call_registered(CONDITIONED, CONDITIONED_PRESETS, "conditioned merge", name, pool, tasks, preset, kwargs)
