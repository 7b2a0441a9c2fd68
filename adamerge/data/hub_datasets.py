"""Datasets by Hugging Face Hub id (FusionBench's parquet test sets) as a :class:`~adamerge.data.source.TaskSource`.

FusionBench publishes the image-classification sets on the Hub as parquet repositories (what
``datasets.load_dataset(repo, split=...)`` reads); :data:`FUSIONBENCH_DATASETS` names them per task. A
task's dataset is ``org/name[@revision][:subset]``. Only the shards of the split asked for are fetched,
through huggingface_hub's cache (:func:`adamerge.models.hub.hub_snapshot`: ``HF_HOME``,
``HF_HUB_OFFLINE=1``, ``HF_TOKEN`` behave as usual), so a test-time run downloads the test split only.

Shards of a split, by the ``datasets`` library's default rules, below the subset's folder if any: the
``push_to_hub`` shards ``<split>-00000-of-00002*.parquet`` if there are some, else the parquet files whose
path has the split name between separators (``-._/``, spaces, digits, the ends): ``test/0000.parquet``,
``my_test.parquet``, not ``latest.parquet``.

Rows are read lazily with pyarrow, one row group at a time with a small cache, so a dataset of gigabytes
(SUN397) costs a few row groups of memory per process; files are opened per process (DataLoader
workers fork). Images are the ``Image`` feature's ``{bytes, path}`` structs, decoded with PIL.

Labels follow the task registry: a ``ClassLabel`` must have the registry's class count; its names are
matched to registry classes like image-folder names (:func:`~adamerge.data.imagefolder.class_by_name`),
so a dataset in another class order is remapped; integer names are label numbers; otherwise labels are
kept, refused when a name plainly names another class than its label. Labels outside the registry's
classes are refused. pyarrow is the optional ``hub`` extra.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torch.utils.data import Dataset
from torchvision import transforms as T

from adamerge.data.imagefolder import class_by_name, open_clip_preprocess
from adamerge.data.registry import check_tasks, get_task
from adamerge.data.source import SPLITS, check_split
from adamerge.errors import AdaMergeError
from adamerge.models.hub import HubError, hub_snapshot

__all__ = ["FUSIONBENCH_DATASETS", "FUSIONBENCH_SPLITS", "DatasetSpec", "HubDatasetSource", "ParquetImageDataset",
           "class_label_map", "split_shards"]

# FusionBench's config/dataset/image_classification/test/*.yaml: registry task → Hub dataset.
FUSIONBENCH_DATASETS: dict[str, str] = {
    "sun397": "tanganke/sun397", "cars": "tanganke/stanford_cars", "resisc45": "tanganke/resisc45",
    "eurosat": "tanganke/eurosat", "svhn": "ufldl-stanford/svhn:cropped_digits", "gtsrb": "tanganke/gtsrb",
    "mnist": "ylecun/mnist", "dtd": "tanganke/dtd", "flowers102": "dpdl-benchmark/oxford_flowers102",
    "pcam": "1aurent/PatchCamelyon", "oxford_pets": "timm/oxford-iiit-pet", "stl10": "tanganke/stl10",
    "cifar100": "tanganke/cifar100", "cifar10": "tanganke/cifar10", "food101": "ethz/food101",
    "fashion_mnist": "zalando-datasets/fashion_mnist", "kmnist": "tanganke/kmnist",
    "rendered_sst2": "nateraw/rendered-sst2", "emnist_digits": "tanganke/emnist_mnist",
}
# Where a catalog repository names a split otherwise (applies while the task reads the catalog's repo).
FUSIONBENCH_SPLITS: dict[str, dict[str, str]] = {"food101": {"test": "validation"}}
_REPO_SPLITS = {"train": "train", "val": "validation", "test": "test"}
_NO_PARQUET = {"fer2013": "FusionBench reads clip-benchmark/wds_fer2013, a webdataset, which this source can't read"}
_IMAGE_NAMES, _LABEL_NAMES = ("image", "img", "jpg", "png"), ("label", "labels", "cls")
_CACHED_ROW_GROUPS = 4


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("datasets by Hub id are read with pyarrow: pip install 'adamerge[hub]'") from None
    return pq


@dataclass(frozen=True)
class DatasetSpec:
    """A Hub dataset: ``org/name[@revision][:subset]`` (revision: a branch, tag or commit)."""

    repo: str
    revision: str | None = None
    subset: str | None = None

    @classmethod
    def parse(cls, text: str, task: str) -> DatasetSpec:
        rest, _, subset = text.partition(":")
        repo, _, revision = rest.partition("@")
        empty_part = (":" in text and not subset) or ("@" in rest and not revision)
        if repo.count("/") != 1 or not all(repo.split("/")) or empty_part:
            raise AdaMergeError(f"task {task!r}: dataset {text!r} is not org/name[@revision][:subset]")
        return cls(repo, revision or None, subset or None)

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.subset}" if self.subset else "")


_SEP = r"[-._/ 0-9]"


def split_shards(files: Iterable[str], split: str, subset: str | None = None) -> list[str]:
    """The parquet files (paths relative to the repository, ``/``-separated) of ``split``, sorted: below
    ``<subset>/`` (if given), the ``push_to_hub`` shards ``<split>-00000-of-00002*.parquet`` if there are
    any, else the files whose path below the subset has ``split`` between separators (module docstring)."""
    prefix = f"{subset}/" if subset else ""
    paths = [f[len(prefix):] for f in files if f.endswith(".parquet") and f.startswith(prefix)]
    for pattern in (rf"(^|/){re.escape(split)}-\d{{5}}-of-\d{{5}}[^/]*$", rf"(^|{_SEP}){re.escape(split)}({_SEP}|$)"):
        found = sorted(prefix + f for f in paths if re.search(pattern, f))
        if found:
            return found
    return []


def _split_names(files: Iterable[str], subset: str | None) -> list[str]:
    """The split names a repository's parquet files suggest (for an error message)."""
    prefix, names = (f"{subset}/" if subset else ""), set()
    for f in files:
        if f.endswith(".parquet") and f.startswith(prefix):
            path = PurePosixPath(f[len(prefix):])
            stem = re.sub(r"-\d{5}-of-\d{5}.*$", "", path.name.split(".")[0])
            names.add(path.parent.name if stem.isdigit() and path.parent.name else stem)
    return sorted(names)


def class_label_map(names: Sequence[str], classnames: Sequence[str], where: str) -> list[int] | None:
    """Dataset label → registry label for a ``ClassLabel`` with ``names``, or None where they agree.

    Names that each name a different registry class give that permutation; integer names are label
    numbers; otherwise labels are kept, unless a name names another class than its label."""
    n = len(classnames)
    if len(names) != n:
        raise AdaMergeError(f"{where}: its label feature has {len(names)} classes but the registry's task has {n}: "
                            "is this the task's dataset (or the right label_column)?")
    named = [class_by_name(str(name), classnames) for name in names]
    if None not in named and len(set(named)) == n:
        mapping = [int(i) for i in named]
    elif all(str(name).isdigit() for name in names):
        mapping = [int(name) for name in names]
        bad = next((name for name, i in zip(names, mapping, strict=True) if i >= n), None)
        if bad is not None:
            raise AdaMergeError(f"{where}: class name {bad!r} is ≥ the registry's {n} classes")
    else:
        clash = next((i for i, c in enumerate(named) if c is not None and c != i), None)
        if clash is not None:
            c = named[clash]
            raise AdaMergeError(f"{where}: class name {names[clash]!r} (label {clash}) names registry class {c} "
                                f"({classnames[c]!r}): its labels would be wrong; register the task with the "
                                "dataset's class names in its order (register_task(..., overwrite=True))")
        return None
    return None if mapping == list(range(n)) else mapping


def _features(schema) -> dict:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    try:
        return dict(json.loads(meta).get("info", {}).get("features") or {})
    except (ValueError, AttributeError):
        return {}


def _pick(kind: str, given: str | None, columns: Sequence[str], typed: list[str], names: Sequence[str],
          where: str) -> str:
    """The image or label column: ``given``, else the one of its feature type, else a usual name."""
    option = f"{kind}_column"
    if given is not None:
        if given not in columns:
            raise AdaMergeError(f"{where}: no column {given!r} ({option}); its columns: {list(columns)}")
        return given
    candidates = typed if len(typed) == 1 else [c for c in (typed or columns) if c in names]
    if len(candidates) != 1:
        found = f"several ({candidates or typed})" if (candidates or typed) else "none"
        raise AdaMergeError(f"{where}: can't tell its {kind} column, {found} among {list(columns)}: set {option}")
    return candidates[0]


class ParquetImageDataset(Dataset):
    """``(image, registry label)`` pairs from parquet shards in the ``datasets`` library's form, read lazily.

    Args:
        files: the shards, in order.
        classnames: the task's class names (registry order); ``classes`` holds them.
        transform: applied to each PIL RGB image (None: ``ToTensor``).
        image_column: the image column (None: detect it).
        label_column: the label column (None: detect it).
        where: how errors name the data (task, repo, split; default: the first file).
    """

    def __init__(self, files: Sequence[str | os.PathLike], classnames: Sequence[str], transform: Callable | None = None,
                 image_column: str | None = None, label_column: str | None = None, where: str = "") -> None:
        pq = _parquet()
        self.files = [str(f) for f in files]
        if not self.files:
            raise AdaMergeError(f"{where or 'ParquetImageDataset'}: no parquet files")
        where = where or self.files[0]
        self.classes = list(classnames)
        self.transform = transform if transform is not None else T.ToTensor()
        self._offsets: list[int] = []  # the first row of each (file, row group) block, then the length
        self._blocks: list[tuple[int, int]] = []
        features, columns, row = None, [], 0
        for k, f in enumerate(self.files):
            meta = pq.read_metadata(f)
            schema = meta.schema.to_arrow_schema()
            if features is None:
                features, columns = _features(schema), schema.names
            elif _features(schema) != features or schema.names != columns:
                raise AdaMergeError(f"{where}: {f} has other columns or features than {self.files[0]}")
            for rg in range(meta.num_row_groups):
                self._offsets.append(row)
                self._blocks.append((k, rg))
                row += meta.row_group(rg).num_rows
        self._offsets.append(row)
        typed = {t: [c for c, v in features.items() if isinstance(v, dict) and v.get("_type") == t]
                 for t in ("Image", "ClassLabel")}
        self.image_column = _pick("image", image_column, columns, typed["Image"], _IMAGE_NAMES, where)
        self.label_column = _pick("label", label_column, columns, typed["ClassLabel"], _LABEL_NAMES, where)
        names = (features.get(self.label_column) or {}).get("names")
        self.label_map = class_label_map(names, self.classes, where) if names else None
        self._check_labels(pq, where)
        self._pid, self._handles, self._cache = None, {}, OrderedDict()

    def _check_labels(self, pq, where: str) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        n = len(self.classes)
        for f in self.files:
            column = pq.read_table(f, columns=[self.label_column]).column(0)
            if not (pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):  # bool: PCam's
                raise AdaMergeError(f"{where}: label column {self.label_column!r} of {f} is {column.type}, not "
                                    "integer class ids: set label_column")
            if column.null_count:
                raise AdaMergeError(f"{where}: {column.null_count} rows of {f} have no label "
                                    f"({self.label_column!r}): an unlabelled split can't be evaluated")
            low_high = pc.min_max(column)
            lo, hi = low_high["min"].as_py(), low_high["max"].as_py()
            if lo is not None and (lo < 0 or hi >= n):
                bad = lo if lo < 0 else hi
                raise AdaMergeError(f"{where}: label {bad} in {f} is outside the registry's {n} classes (0..{n - 1}): "
                                    "is this the task's dataset (or the right label_column)?")

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getstate__(self) -> dict:  # open files and cached row groups stay in their process
        return {**self.__dict__, "_pid": None, "_handles": {}, "_cache": OrderedDict()}

    def _row_group(self, block: int):
        if self._pid != os.getpid():  # a forked worker: its own files and cache
            self._pid, self._handles, self._cache = os.getpid(), {}, OrderedDict()
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block]
        k, rg = self._blocks[block]
        if k not in self._handles:
            self._handles[k] = _parquet().ParquetFile(self.files[k])
        table = self._handles[k].read_row_group(rg, columns=[self.image_column, self.label_column])
        self._cache[block] = table
        if len(self._cache) > _CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return table

    def __getitem__(self, i: int):
        from PIL import Image

        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n}")
        i %= n
        block = bisect.bisect_right(self._offsets, i) - 1
        table = self._row_group(block)
        row = i - self._offsets[block]
        value = table.column(self.image_column)[row].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if not data:
            raise AdaMergeError(f"{self.files[self._blocks[block][0]]}: row {i} holds no image bytes")
        image = Image.open(io.BytesIO(data)).convert("RGB")
        label = int(table.column(self.label_column)[row].as_py())
        return self.transform(image), (self.label_map[label] if self.label_map is not None else label)


def _local_files(root: str) -> list[str]:
    """The files of a snapshot folder, ``/``-separated and relative to it."""
    out = []
    for folder, _, names in os.walk(root):
        rel = Path(folder).relative_to(root)
        out += [(rel / n).as_posix() for n in names]
    return out


def _repo_files(spec: DatasetSpec, root: str) -> list[str]:
    """The files a repository holds: those cached, and when online the repository's listing."""
    from huggingface_hub import constants, list_repo_files

    files = set(_local_files(root))
    if not constants.HF_HUB_OFFLINE:
        with contextlib.suppress(Exception):  # the listing only improves an error message
            files.update(list_repo_files(spec.repo, revision=spec.revision, repo_type="dataset"))
    return sorted(files)


class HubDatasetSource:
    """Per-task datasets from Hugging Face Hub parquet repositories (FusionBench's by default).

    Args:
        tasks: registered task names to serve.
        repos: task → Hub dataset ``org/name[@revision][:subset]``; a task not named here reads its
            :data:`FUSIONBENCH_DATASETS` entry (every task of the 20-task set but fer2013, which has
            no parquet repository: serve it from an image folder and join the sources with
            :class:`~adamerge.data.source.CombinedSource`).
        preprocess: an open_clip model name or model-config JSON path (its eval transform), a
            callable transform, or None (``ToTensor`` only; images must then share one size).
        splits: task → our split (``train``/``val``/``test``) → the repository's split name; by
            default the same name (``val``: ``validation``), food101's test is its ``validation``.
        image_column: the image column, for every task (a str) or per task (a dict); default: the
            ``Image`` feature in the parquet schema, else a column named image/img/jpg/png.
        label_column: the label column, likewise; default: the ``ClassLabel`` feature, else a
            column named label/labels/cls.
    """

    def __init__(self, tasks: list[str], repos: dict[str, str] | None = None,
                 preprocess: str | Callable | None = None, splits: dict[str, dict[str, str]] | None = None,
                 image_column: str | dict[str, str] | None = None,
                 label_column: str | dict[str, str] | None = None) -> None:
        _parquet()
        self._tasks = check_tasks(tasks)
        for option, value in (("repos", repos), ("splits", splits), ("image_column", image_column),
                              ("label_column", label_column)):
            extra = sorted(set(value) - set(self._tasks)) if isinstance(value, dict) else []
            if extra:
                raise AdaMergeError(f"{option} names task {extra[0]!r}, which is not in tasks {self._tasks}")
        self.specs: dict[str, DatasetSpec] = {}
        self.splits: dict[str, dict[str, str]] = {}
        for task in self._tasks:
            text = (repos or {}).get(task) or FUSIONBENCH_DATASETS.get(task)
            if text is None:
                why = _NO_PARQUET.get(task, "it is not in FusionBench's catalog")
                raise AdaMergeError(f"task {task!r}: no Hub dataset known ({why}): name one in repos "
                                    f"({{{task!r}: 'org/name'}}), or serve the task from an image folder "
                                    "(ImageFolderSource) joined to this source with CombinedSource")
            self.specs[task] = spec = DatasetSpec.parse(text, task)
            catalog = FUSIONBENCH_DATASETS.get(task, "").split(":")[0].split("@")[0]
            mapped = {**_REPO_SPLITS, **(FUSIONBENCH_SPLITS.get(task, {}) if spec.repo == catalog else {})}
            given = (splits or {}).get(task, {})
            unknown = sorted(set(given) - set(SPLITS))
            if unknown:
                raise AdaMergeError(f"splits[{task!r}] names split {unknown[0]!r}; ours are {SPLITS}")
            self.splits[task] = {**mapped, **given}
        self._columns = {
            task: tuple(c.get(task) if isinstance(c, dict) else c for c in (image_column, label_column))
            for task in self._tasks
        }
        if isinstance(preprocess, str):
            preprocess = open_clip_preprocess(preprocess)
        self.transform = preprocess if preprocess is not None else T.ToTensor()
        self._datasets: dict[tuple[str, str], ParquetImageDataset] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def num_classes(self, task: str) -> int:
        """The task's class count (the registry's: labels are mapped to its classes)."""
        return get_task(task).num_classes

    def dataset(self, task: str, split: str) -> Dataset:
        """The labelled images of ``task`` / ``split`` (labels in registry order); only that split is fetched."""
        check_split(split)
        if task not in self._tasks:
            raise ValueError(f"task {task!r} is not served by this source (tasks: {self._tasks})")
        if (task, split) not in self._datasets:
            self._datasets[task, split] = self._load(task, split)
        return self._datasets[task, split]

    def _load(self, task: str, split: str) -> ParquetImageDataset:
        spec, name = self.specs[task], self.splits[task][split]
        prefix = f"{spec.subset}/" if spec.subset else ""
        label = f"task {task!r}: dataset {spec}"
        root = hub_snapshot(spec.repo, allow_patterns=[f"{prefix}*{name}*.parquet"], revision=spec.revision,
                            repo_type="dataset", label=label)
        shards = split_shards(_local_files(root), name, spec.subset)
        if not shards:
            present = _split_names(_repo_files(spec, root), spec.subset)
            raise HubError(f"{label}: no parquet shard of split {name!r} (our {split!r})"
                           + (f" in subset {spec.subset!r}" if spec.subset else "")
                           + f"; splits present: {', '.join(present) or 'none'}: name the repository's split "
                           f"with splits={{{task!r}: {{{split!r}: '<split>'}}}}", missing=True)
        image_column, label_column = self._columns[task]
        return ParquetImageDataset([Path(root) / f for f in shards], get_task(task).classnames, self.transform,
                                   image_column, label_column, where=f"{label}, split {name!r}")
