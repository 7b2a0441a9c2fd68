"""Task registry: class names and zero-shot prompt templates per task.

A task is known by a name (``"mnist"``, ``"eurosat"``, ...). Its class names and templates feed the
zero-shot heads (:mod:`adamerge.models.heads`; a pool is handed :func:`get_task` or the
:class:`TaskInfo` values, it never looks them up here itself); its datasets come from a data source.
The eight standard vision-merging tasks (:mod:`adamerge.data.standard_tasks`) and the twelve
further tasks of TALL-masks' 14- and 20-task sets (:mod:`adamerge.data.tall_tasks`) are registered
when this module is imported, and :func:`task_set` names those sets (``"8"``, ``"14"``, ``"20"``); a
benchmark registers its own tasks when it is imported (the mini benchmark: ``import
adamerge.data.mini``), so the registry knows no benchmark; users add tasks with :func:`register_task`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from adamerge.data import standard_tasks, tall_tasks

__all__ = [
    "TaskInfo", "UnknownTaskError", "check_tasks", "get_task", "list_tasks", "register_task", "task_set",
]


class UnknownTaskError(KeyError):
    """A task name (or task-set name) that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class TaskInfo:
    """What a zero-shot head needs to know about a task.

    Args:
        name: the task's registry name.
        classnames: one human-readable name per class, in label order.
        templates: prompt format strings with one ``{}`` for the class name.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


_REGISTRY: dict[str, TaskInfo] = {}


def register_task(
    name: str, classnames: Sequence[str], templates: Sequence[str], overwrite: bool = False
) -> TaskInfo:
    """Register (or, with ``overwrite=True``, replace) a task and return its :class:`TaskInfo`."""
    if not name or not isinstance(name, str):
        raise ValueError("task name must be a non-empty string")
    if len(classnames) < 2:
        raise ValueError(f"task {name!r}: need at least 2 class names, got {len(classnames)}")
    if len(templates) == 0:
        raise ValueError(f"task {name!r}: need at least one template")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"task {name!r}: template {t!r} must contain exactly one '{{}}'")
    info = TaskInfo(name, tuple(classnames), tuple(templates))
    if name in _REGISTRY and not overwrite and _REGISTRY[name] != info:
        raise ValueError(f"task {name!r} is already registered with other class names or templates")
    _REGISTRY[name] = info
    return info


for _name in standard_tasks.STANDARD_TASKS:
    register_task(_name, standard_tasks.CLASSNAMES[_name], standard_tasks.TEMPLATES[_name])
for _name in tall_tasks.TALL_TASKS:
    register_task(_name, tall_tasks.CLASSNAMES[_name], tall_tasks.TEMPLATES[_name])


def get_task(name: str) -> TaskInfo:
    """The registered task ``name``; the error lists the known tasks."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}") from None


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def task_set(name: str | int) -> list[str]:
    """The tasks of a named set, in order: ``"8"`` (the standard eight), ``"14"`` or ``"20"``
    (TALL-masks'); an int is read as its digits. The error lists the known sets."""
    try:
        return list(tall_tasks.TASK_SETS[str(name)])
    except KeyError:
        known = ", ".join(repr(k) for k in tall_tasks.TASK_SETS)
        raise UnknownTaskError(f"unknown task set {name!r}; known sets: {known}") from None


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """Validate a task list: non-empty, no duplicates, every name registered."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("empty task list: name at least one task")
    dup = {t for t in tasks if tasks.count(t) > 1}
    if dup:
        raise ValueError(f"task list names {min(dup)!r} more than once")
    for t in tasks:
        get_task(t)
    return tasks
