"""What makes a run safe to resume, kill or repeat: identity checks, a guarded export folder, atomic writes.

* A checkpoint restores state, never configuration. It records what made it (:func:`compare_identity`
  checks every field against the run being configured: system, tasks, class counts, method settings,
  a content fingerprint of θ_0 and of every expert) and holds only finite learnable tensors
  (:func:`check_learnable_state`).
* No run overwrites another: :func:`check_export_dir` refuses an ``export_dir`` that holds another
  run's files, unless it is the same run being resumed (same ``run_id``) or ``overwrite`` is set, and
  refuses an ``export_dir`` that would swallow the run's own logs or checkpoints.
* Checkpoints and exports are written atomically (:class:`AtomicCheckpointIO`,
  :func:`adamerge.files.atomic_dir`); temporaries a killed run left are swept at the next start.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

from adamerge.files import MANIFEST, atomic_path, read_manifest, sweep_temporaries

__all__ = [
    "MAX_LR",
    "AtomicCheckpointIO",
    "CheckpointMismatchError",
    "ConfigError",
    "RunExistsError",
    "check_data",
    "check_export_dir",
    "check_learnable_state",
    "check_learning_rates",
    "compare_identity",
]

MAX_LR = 10.0


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another pool, task list or method than the system loading it."""


class ConfigError(ValueError):
    """A configuration value that cannot work (named in the message); the CLI prints it in one line."""


class RunExistsError(FileExistsError):
    """An output folder that holds another run's files (pass overwrite to replace them)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, through :func:`adamerge.files.atomic_path`: a killed save
    leaves the previous checkpoint intact and a temporary that the next start sweeps."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":  # remote stores: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def compare_identity(theirs: Mapping, mine: Mapping, field: str = "") -> None:
    """Raise :class:`CheckpointMismatchError` naming the first field where ``theirs`` differs from ``mine``."""
    for key, value in mine.items():
        name = f"{field}.{key}" if field else str(key)
        if key not in theirs:
            raise CheckpointMismatchError(f"cannot resume: the checkpoint does not record {name} (this run: {value!r})")
        other = theirs[key]
        if isinstance(value, Mapping) and isinstance(other, Mapping):
            compare_identity(other, value, name)
        elif other != value:
            raise CheckpointMismatchError(
                f"cannot resume: the checkpoint was made with {name} = {other!r}, this run has {value!r}"
            )


def check_learnable_state(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Refuse a checkpoint state that is not finite or whose dtypes or shapes differ from the learnable ones."""
    for key, t in state.items():
        if not isinstance(t, Tensor):
            raise CheckpointMismatchError(f"checkpoint state {key!r} is not a tensor ({type(t).__name__})")
        ref = expected.get(key)
        if ref is not None and (t.dtype != ref.dtype or t.shape != ref.shape):
            raise CheckpointMismatchError(
                f"checkpoint state {key!r} is {t.dtype} {tuple(t.shape)}, this run learns {ref.dtype} {tuple(ref.shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointMismatchError(f"checkpoint state {key!r} holds NaN or Inf: refusing to resume from it")


def check_data(
    tasks: list[str], num_classes: Mapping[str, int], data_tasks: list[str], data_classes: Mapping[str, int] | None
) -> None:
    """The datamodule's tasks must be the model's, and each task's class count its head's (the error names
    the task)."""
    extra = [t for t in data_tasks if t not in tasks]
    if extra:
        raise ValueError(f"the data has task {extra[0]!r} that the model does not (model tasks: {tasks})")
    missing = [t for t in tasks if t not in data_tasks]
    if missing:
        raise ValueError(f"the model has task {missing[0]!r} that the data does not (data tasks: {data_tasks})")
    for task, count in (data_classes or {}).items():
        if count is not None and task in num_classes and int(count) != num_classes[task]:
            raise ValueError(
                f"task {task!r}: the zero-shot head has {num_classes[task]} classes but the data has {count}"
            )


def check_learning_rates(optimizer: torch.optim.Optimizer, owner: str) -> None:
    """Every param group's ``lr`` must be a finite number in (0, MAX_LR]."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        value = float(lr) if isinstance(lr, (int, float, Tensor)) and not isinstance(lr, bool) else None
        if value is None or not math.isfinite(value) or not 0 < value <= MAX_LR:
            raise ConfigError(
                f"{owner}: optimizer lr (param group {i}) must be a positive finite number at most {MAX_LR:g}, "
                f"got {lr!r}"
            )


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_export_dir(
    export_dir: str | os.PathLike, run_id: str, overwrite: bool, run_paths: Mapping[str, str | None]
) -> None:
    """Refuse, before training, an ``export_dir`` this run may not replace; sweep dead runs' temporaries.

    Args:
        export_dir: where the export set will be swapped in.
        run_id: this run's id (a resumed run keeps the id of the run it continues).
        overwrite: replace another run's export.
        run_paths: what else the run writes (``{"log dir": ..., "checkpoint dir": ...}``); none may lie
            inside ``export_dir``, since the whole folder is replaced at the end.
    """
    target = Path(export_dir)
    for what, path in run_paths.items():
        if path is not None and _inside(Path(path), target):
            raise ValueError(
                f"export_dir {target} would contain the run's {what} {path}: the export replaces the whole "
                "folder at the end of fit; point the logger / checkpoints elsewhere (e.g. its parent)"
            )
    sweep_temporaries(target.parent)
    if target.exists() and not target.is_dir():
        raise RunExistsError(f"export_dir {target} is a file")
    if not target.is_dir() or not any(target.iterdir()) or overwrite:
        return
    try:
        manifest = read_manifest(target, verify=False)
    except ValueError:
        manifest = None
    if manifest is not None and manifest.get("run_id") == run_id:
        return  # the same run, resumed
    owner = f"run {manifest.get('run_id')}" if manifest else "files not written by an adamerge export"
    raise RunExistsError(
        f"export_dir {target} already holds {owner} ({MANIFEST if manifest else 'no manifest'}); "
        "choose another export_dir or pass --overwrite=true to replace it"
    )
