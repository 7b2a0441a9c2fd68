"""Image folders on disk as a :class:`~adamerge.data.source.TaskSource`.

Layout: ``<root>/<task>/<split>/<class>/*.png|jpg`` (torchvision ``ImageFolder``), e.g.
``data/mnist/test/3/00017.png``. Labels follow the task registry's class order, not the folders'
alphabetical order:

1. if every class folder names one registry class, the folder gets that class's index, whatever the
   sort order (``Cars`` folders named after the cars). Names are compared by their lower-case words
   (``T-shirt_top`` is FashionMNIST's ``T-shirt/top``); a folder whose words lie within exactly one
   class name also names it (FER2013's ``happy`` is ``['happy', 'smiling']``);
2. otherwise, if the folder names are all integers (``0``, ``1``, …, ``42`` or ``00042``), folder
   ``i`` is class ``i``;
3. otherwise the folders in sorted order are the registry's classes in order (the task_vectors
   convention: SUN397's ``a_abbey`` …, EuroSAT's ``AnnualCrop`` …), which needs the same count, and
   is refused when a folder names a class other than the one its position gives (a silent mislabel).

A missing task or split folder, or a class count that differs from the registry, is an error naming
the folder. Images go through the open_clip preprocess (``preprocess="ViT-B-32"`` builds open_clip's
eval transform for that model; a callable is used as is; None converts to a tensor only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from adamerge.data.registry import check_tasks, get_task
from adamerge.data.source import check_split

__all__ = ["ImageFolderSource", "class_by_name", "open_clip_preprocess"]


def open_clip_preprocess(model_name: str) -> Callable:
    """open_clip's evaluation transform (resize, centre crop, normalise) for ``model_name``, an
    open_clip model name, an ``hf-hub:org/name`` id (its ``open_clip_config.json``, through the Hugging
    Face cache) or the path of a model-config JSON (registered here if needed)."""
    import open_clip

    from adamerge.models.hub import hub_open_clip_config, is_hub_id

    if is_hub_id(model_name):
        config = hub_open_clip_config(model_name)
        pp = config.get("preprocess_cfg", {})
        size = config["model_cfg"]["vision_cfg"].get("image_size", 224)
        return open_clip.image_transform(size, is_train=False, mean=pp.get("mean"), std=pp.get("std"))
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config not found: {path}")
        open_clip.add_model_config(path)
        model_name = path.stem
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r} for the preprocess")
    size = cfg["vision_cfg"].get("image_size", 224)
    pp = cfg.get("preprocess_cfg", {})
    return open_clip.image_transform(size, is_train=False, mean=pp.get("mean"), std=pp.get("std"))


def _words(name: str) -> frozenset[str]:
    """The lower-case words of a folder or class name (``T-shirt_top`` and ``T-shirt/top`` agree)."""
    return frozenset(re.findall(r"[a-z0-9]+", name.lower()))


def class_by_name(name: str, classnames: Sequence[str]) -> int | None:
    """The index of the class in ``classnames`` that ``name`` (a folder name, a dataset's class name)
    names: the one with the same words, else the only one whose words include the name's (FER2013's
    ``happy`` in ``['happy', 'smiling']``); None if none or several."""
    words = _words(name)
    if not words:
        return None
    same = [i for i, c in enumerate(classnames) if _words(c) == words]
    if len(same) == 1:
        return same[0]
    within = [i for i, c in enumerate(classnames) if words <= _words(c)]
    return within[0] if len(within) == 1 and not same else None


def _label_map(folders: Sequence[str], classnames: Sequence[str], where: Path) -> dict[str, int]:
    """Folder name → registry label (see the module docstring for the rules)."""
    named = {f: class_by_name(f, classnames) for f in folders}
    if None not in named.values() and len(set(named.values())) == len(folders):
        return {f: int(i) for f, i in named.items()}
    if all(f.isdigit() for f in folders):
        bad = [f for f in folders if int(f) >= len(classnames)]
        if bad:
            raise ValueError(f"{where}: class folder {bad[0]!r} ≥ the registry's {len(classnames)} classes")
        return {f: int(f) for f in folders}
    if len(folders) != len(classnames):
        raise ValueError(
            f"{where}: {len(folders)} class folders but the registry's task has {len(classnames)} classes"
        )
    by_position = {f: i for i, f in enumerate(sorted(folders))}
    clash = next((f for f in sorted(folders) if named[f] is not None and named[f] != by_position[f]), None)
    if clash is not None:
        raise ValueError(
            f"{where}: class folder {clash!r} names class {named[clash]} ({classnames[named[clash]]!r}) but "
            f"would get label {by_position[clash]} by sorted position; name every folder after its registry "
            "class or its label number"
        )
    return by_position


class _RegistryImageFolder(ImageFolder):
    """ImageFolder whose class indices follow the registry, not the sorted folder names."""

    def __init__(self, root: str, classnames: Sequence[str], transform: Callable | None):
        self._classnames = list(classnames)
        super().__init__(root, transform=transform)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        folders = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        if not folders:
            raise FileNotFoundError(f"{directory}: no class folders")
        mapping = _label_map(folders, self._classnames, Path(directory))
        return self._classnames, mapping


class ImageFolderSource:
    """Per-task image folders: ``<root>/<task>/<split>/<class>/*``.

    Args:
        root: the folder holding one sub-folder per task.
        tasks: registered task names to serve.
        preprocess: an open_clip model name or model-config JSON path (its eval transform), a
            callable transform, or None (``ToTensor`` only; images must then share one size).
    """

    def __init__(self, root: str, tasks: list[str], preprocess: str | Callable | None = None) -> None:
        self.root = Path(root)
        self._tasks = check_tasks(tasks)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image-folder root not found: {self.root}")
        missing = [t for t in self._tasks if not (self.root / t).is_dir()]
        if missing:
            raise FileNotFoundError(f"task {missing[0]!r}: folder {self.root / missing[0]} not found")
        if isinstance(preprocess, str):
            preprocess = open_clip_preprocess(preprocess)
        self.transform = preprocess if preprocess is not None else T.ToTensor()

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def dataset(self, task: str, split: str) -> Dataset:
        """The labelled images of ``task`` / ``split`` (labels in registry order)."""
        check_split(split)
        if task not in self._tasks:
            raise ValueError(f"task {task!r} is not served by this source (tasks: {self._tasks})")
        folder = self.root / task / split
        if not folder.is_dir():
            raise FileNotFoundError(f"task {task!r}: split folder {folder} not found")
        return _RegistryImageFolder(str(folder), get_task(task).classnames, self.transform)
