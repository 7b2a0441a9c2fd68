"""The setup every method of a reproduce run shares, checked before anything is downloaded.

:func:`resolve` turns the command line into a :class:`Setup` (which checkpoint and which data per task);
:func:`setup_config` writes it as the configuration ``adamerge fit`` reads (``setup.yaml``): the paper
setup of the model and task set (``configs/paper/<model>/tasks<N>.yaml``) with the Hub's checkpoints
and data in place of its paths.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adamerge.reproduce.catalog import (
    CONFIGS,
    FUSIONBENCH_TASKS,
    METHODS,
    MODELS,
    Method,
    ReproduceError,
    method,
)

__all__ = ["Setup", "build", "record_path", "resolve", "setup_config", "source_config", "write_setup"]


def _pairs(items: Sequence[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        task, sep, value = item.partition("=")
        if not sep or not task or not value:
            raise ReproduceError(f"{option} {item!r}: expected TASK=VALUE")
        out[task] = value
    return out


@dataclass
class Setup:
    """Everything the methods share: checkpoints, data, where results go."""

    model: str
    arch: str
    model_config: str | None
    pretrained: str
    experts: dict[str, str]
    datasets: dict[str, str]
    folders: str | None
    folder_tasks: list[str]
    tasks: list[str]
    task_set: str
    methods: list[Method]
    out: Path
    devices: int
    steps: int | None
    eval_batch_size: int | None
    num_workers: int | None

    @property
    def benchmark(self) -> str:
        return f"{self.model} × {self.task_set}"


def _tasks(value: str) -> tuple[list[str], str]:
    from adamerge.data.registry import UnknownTaskError, check_tasks, task_set

    if value.isdigit():
        try:
            return task_set(value), f"{value} tasks"
        except UnknownTaskError as e:
            raise ReproduceError(str(e)) from None
    try:
        tasks = check_tasks([t.strip() for t in value.split(",") if t.strip()])
    except (UnknownTaskError, ValueError) as e:
        raise ReproduceError(f"--tasks: {e}") from None
    return tasks, f"{len(tasks)} tasks"


def _methods(keys: Sequence[str] | None) -> list[Method]:
    if keys is None:
        return list(METHODS)
    wanted = {method(k).key for k in keys}
    return [m for m in METHODS if m.key in wanted]  # in table order


def resolve(args: argparse.Namespace) -> Setup:
    """The setup of a request, checked before anything is downloaded."""
    from adamerge.data.hub_datasets import FUSIONBENCH_DATASETS

    custom = args.arch is not None
    if args.model not in MODELS and not custom:
        raise ReproduceError(f"--model {args.model!r}: known models are {', '.join(MODELS)} (or give --arch, "
                             "--pretrained and --experts)")
    spec = MODELS.get(args.model, MODELS["ViT-B-32"])
    if custom and (args.pretrained is None or (args.experts is None and not args.expert)):
        raise ReproduceError("--arch needs --pretrained and --experts (or --expert TASK=ID per task)")
    tasks, task_set = _tasks(str(args.tasks))
    folders = Path(args.image_folders) if args.image_folders else None
    if folders is not None and not folders.is_dir():
        raise ReproduceError(f"--image-folders: {folders} is not a folder")
    folder_tasks = [t for t in tasks if folders is not None and (folders / t).is_dir()]
    pattern = args.experts or spec.experts
    named = _pairs(args.expert, "--expert")
    experts = {}
    for t in tasks:
        name = FUSIONBENCH_TASKS.get(t, t)
        if t not in named and name is None:
            raise ReproduceError(f"task {t!r}: FusionBench publishes no expert for it; give one with --expert {t}=ID")
        experts[t] = named.get(t) or pattern.format(task=name)
    chosen = _pairs(args.dataset, "--dataset")
    datasets = {}
    for t in tasks:
        if t in folder_tasks:
            continue
        if t not in chosen and t not in FUSIONBENCH_DATASETS:
            raise ReproduceError(f"task {t!r}: no dataset repository on the Hub in parquet form; give its images "
                                 f"with --image-folders DIR (DIR/{t}/test/<class>/*) or a repo with --dataset {t}=REPO")
        datasets[t] = chosen.get(t, FUSIONBENCH_DATASETS.get(t))
    model = args.model if not custom else args.arch
    out = Path(args.out) if args.out else Path("runs") / "reproduce" / f"{model}-tasks{len(tasks)}"
    return Setup(model=model, arch=args.arch or spec.arch, model_config=args.model_config,
                 pretrained=args.pretrained or spec.pretrained, experts=experts, datasets=datasets,
                 folders=str(folders) if folders else None, folder_tasks=folder_tasks, tasks=tasks, task_set=task_set,
                 methods=_methods(args.methods), out=out, devices=args.devices, steps=args.steps,
                 eval_batch_size=args.eval_batch_size, num_workers=args.num_workers)


def _paper_yaml(setup: Setup) -> dict:
    spec = MODELS.get(setup.model, MODELS["ViT-B-32"])
    n = len(setup.tasks)
    path = CONFIGS / "paper" / spec.paper / f"tasks{n if n in (8, 14, 20) else 8}.yaml"
    if not path.is_file():
        path = CONFIGS / "paper" / spec.paper / "tasks8.yaml"
    return yaml.safe_load(path.read_text())


def source_config(setup: Setup) -> dict:
    """The data source of the setup as a class_path dict: the Hub's parquet datasets, image folders, or both."""
    preprocess = setup.model_config or setup.arch
    parts = []
    if setup.datasets:
        parts.append({"class_path": "adamerge.data.hub_datasets.HubDatasetSource",
                      "init_args": {"tasks": list(setup.datasets), "repos": dict(setup.datasets),
                                    "preprocess": preprocess}})
    if setup.folder_tasks:
        parts.append({"class_path": "adamerge.data.imagefolder.ImageFolderSource",
                      "init_args": {"root": setup.folders, "tasks": setup.folder_tasks, "preprocess": preprocess}})
    if len(parts) == 1:
        return parts[0]
    return {"class_path": "adamerge.data.source.CombinedSource", "init_args": {"sources": parts}}


def setup_config(setup: Setup) -> dict:
    """The shared run setup (``setup.yaml``): the paper setup with the Hub's checkpoints and data."""
    config = _paper_yaml(setup)
    config["trainer"]["devices"] = setup.devices
    pool = config["model"]["init_args"]["pool"]["init_args"]
    pool.update(model_name=setup.arch, pretrained=setup.pretrained, experts=dict(setup.experts),
                cache_dir=str(setup.out / "heads"))
    if setup.model_config:
        pool["model_config"] = setup.model_config
    data = config["data"]["init_args"]
    data["source"] = source_config(setup)
    data["tasks"] = list(setup.tasks)  # the set's order, whichever source serves a task
    if setup.eval_batch_size is not None:
        data["eval_batch_size"] = setup.eval_batch_size
    if setup.num_workers is not None:
        data["num_workers"] = setup.num_workers
    return config


def build(spec: dict) -> Any:
    """An object from a class_path dict (nested class_path dicts in lists are built too)."""
    import importlib

    module, _, name = spec["class_path"].rpartition(".")
    args = {k: ([build(v) if isinstance(v, dict) and "class_path" in v else v for v in val]
                if isinstance(val, list) else val) for k, val in spec.get("init_args", {}).items()}
    return getattr(importlib.import_module(module), name)(**args)


def record_path(setup: Setup, method: Method) -> Path:
    """Where a method's ``metrics.json`` is (a test-time method's is in its export set)."""
    from adamerge.records import METRICS_FILE

    folder = setup.out / method.key
    return (folder / "export" / METRICS_FILE) if method.trains else (folder / METRICS_FILE)


def write_setup(setup: Setup) -> Path:
    """Write ``setup.yaml``; a folder holding another setup is refused (its records are not this setup's)."""
    from adamerge.files import write_text

    text = yaml.safe_dump(setup_config(setup), sort_keys=False, allow_unicode=True)
    path = setup.out / "setup.yaml"
    if path.exists() and path.read_text() != text:
        raise ReproduceError(f"{setup.out} holds the results of another setup ({path} differs: other model, tasks, "
                             "checkpoints or data): give another --out, or delete the folder to start over")
    if not path.exists():
        write_text(path, text)
    return path
